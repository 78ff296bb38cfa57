package main

import "github.com/urfave/cli/v2"

// serveCommands returns the CLI commands of this area.
func serveCommands() []*cli.Command { return nil }

var serveExitCodes = []exitMapping{}
