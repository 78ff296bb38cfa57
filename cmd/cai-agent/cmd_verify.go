package main

import "github.com/urfave/cli/v2"

// verifyCommands returns the CLI commands of this area.
func verifyCommands() []*cli.Command { return nil }

var verifyExitCodes = []exitMapping{}
