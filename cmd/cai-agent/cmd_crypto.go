package main

import "github.com/urfave/cli/v2"

// cryptoCommands returns the CLI commands of this area.
func cryptoCommands() []*cli.Command { return nil }

var cryptoExitCodes = []exitMapping{}
