package main

import "github.com/urfave/cli/v2"

// kbcCommands returns the CLI commands of this area.
func kbcCommands() []*cli.Command { return nil }

var kbcExitCodes = []exitMapping{}
