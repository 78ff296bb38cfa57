package main

import (
	"io"
	"testing"

	"github.com/urfave/cli/v2"
)

// No flag sets urfave/cli's Required: its check prints the whole help on stdout and exits 1,
// where a missing flag must be a usage error (exit 2) from requireFlags.
func TestNoFlagIsRequired(t *testing.T) {
	app := newApp(nil, io.Discard, io.Discard)
	var walk func(cmds []*cli.Command)
	walk = func(cmds []*cli.Command) {
		for _, c := range cmds {
			for _, f := range c.Flags {
				if r, ok := f.(cli.RequiredFlag); ok && r.IsRequired() {
					t.Errorf("%s --%s sets Required; check it with requireFlags", c.Name, f.Names()[0])
				}
			}
			walk(c.Subcommands)
		}
	}
	walk(app.Commands)
}
