package main

import "github.com/urfave/cli/v2"

// evidenceCommands returns the CLI commands of this area.
func evidenceCommands() []*cli.Command { return nil }

var evidenceExitCodes = []exitMapping{}
