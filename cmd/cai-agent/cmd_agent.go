package main

import "github.com/urfave/cli/v2"

// agentCommands returns the CLI commands of this area.
func agentCommands() []*cli.Command { return nil }

var agentExitCodes = []exitMapping{}
