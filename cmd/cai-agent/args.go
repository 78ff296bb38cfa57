package main

import (
	"flag"
	"io"
	"strings"

	"github.com/urfave/cli/v2"
)

// positionalArgs returns the positional arguments of c, applying to c any flags that follow
// them: urfave/cli stops parsing flags at the first positional argument, but the documented
// forms put flags after it (`quote inspect FILE --json`, `measure --file A B --json`).
// Everything after "--" is positional. A --help among them shows the command's help, and
// the returned error then ends the command with exit 0.
func positionalArgs(c *cli.Context) ([]string, error) {
	var pos []string
	rest := c.Args().Slice()
	for len(rest) > 0 {
		a := rest[0]
		if a == "--" {
			pos = append(pos, rest[1:]...)
			break
		}
		if a == "-" || !strings.HasPrefix(a, "-") {
			pos = append(pos, a)
			rest = rest[1:]
			continue
		}
		fs := flag.NewFlagSet(cmdName(c), flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		for _, f := range c.Command.Flags {
			if err := f.Apply(fs); err != nil {
				return nil, err
			}
		}
		if err := fs.Parse(rest); err != nil {
			return nil, usagef("%s: %v", cmdName(c), err)
		}
		var setErr error
		fs.Visit(func(f *flag.Flag) {
			vals := []string{f.Value.String()}
			if s, ok := f.Value.(interface{ Value() []string }); ok {
				vals = s.Value()
			}
			for _, v := range vals {
				if err := c.Set(f.Name, v); err != nil && setErr == nil {
					setErr = usagef("%s: --%s: %v", cmdName(c), f.Name, err)
				}
			}
		})
		if setErr != nil {
			return nil, setErr
		}
		if help := fs.Lookup("help"); help != nil && help.Value.String() == "true" {
			// `CMD FILE --help`: the help, as before FILE.
			if err := cli.ShowCommandHelp(c.Lineage()[1], c.Command.Name); err != nil {
				return nil, err
			}
			return nil, cli.Exit("", ExitOK)
		}
		rest = fs.Args()
	}
	return pos, nil
}

// cmdName is the command's path for messages, e.g. "eventlog show" (urfave/cli's FullName
// is only the last name for a subcommand).
func cmdName(c *cli.Context) string {
	if n := strings.TrimPrefix(c.Command.HelpName, c.App.Name+" "); n != "" && n != c.App.Name {
		return n
	}
	return c.Command.Name
}
