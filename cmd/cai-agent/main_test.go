package main

import (
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
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

// Every CAI_* variable the README or the deploy examples name exists — a flag's env var, or
// one the code reads (tests, benchmarks) — and every flag's env var is in the README's table.
func TestDocumentedEnvVars(t *testing.T) {
	flagEnv := map[string]bool{}
	var walk func(flags []cli.Flag, cmds []*cli.Command)
	walk = func(flags []cli.Flag, cmds []*cli.Command) {
		for _, f := range flags {
			if d, ok := f.(cli.DocGenerationFlag); ok {
				for _, e := range d.GetEnvVars() {
					flagEnv[e] = true
				}
			}
		}
		for _, c := range cmds {
			walk(c.Flags, c.Subcommands)
		}
	}
	app := newApp(nil, io.Discard, io.Discard)
	walk(app.Flags, app.Commands)
	require.NotEmpty(t, flagEnv)

	name := regexp.MustCompile(`CAI_[A-Z0-9_]*[A-Z0-9]`)
	readme, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	require.NoError(t, err)
	documented := map[string]bool{}
	for _, n := range name.FindAllString(string(readme), -1) {
		documented[n] = true
	}
	for e := range flagEnv {
		assert.True(t, documented[e], "%s (a flag's env var) is not in README.md", e)
	}

	mentioned := maps.Clone(documented)
	deploy, err := filepath.Glob(filepath.Join("..", "..", "deploy", "*", "*"))
	require.NoError(t, err)
	for _, f := range deploy {
		b, err := os.ReadFile(f)
		require.NoError(t, err)
		for _, n := range name.FindAllString(string(b), -1) {
			mentioned[n] = true
		}
	}
	var code strings.Builder
	require.NoError(t, filepath.WalkDir(filepath.Join("..", ".."), func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || filepath.Ext(p) != ".go" || strings.HasSuffix(p, "main_test.go") {
			return err
		}
		b, err := os.ReadFile(p)
		code.Write(b)
		return err
	}))
	for n := range mentioned {
		if !flagEnv[n] {
			assert.Contains(t, code.String(), `"`+n, "%s is documented but neither a flag's env var nor read by any code", n)
		}
	}
}

// The README's exit-code table lists exactly the codes of exitcodes.go, with their names.
func TestDocumentedExitCodes(t *testing.T) {
	codes := map[int]string{
		ExitOK: "OK", ExitFailure: "Failure", ExitUsage: "Usage", ExitWrongKey: "WrongKey", ExitCorrupt: "Corrupt",
		ExitUnsupported: "Unsupported", ExitNotTmpfs: "NotTmpfs", ExitLocked: "Locked", ExitSource: "Source",
		ExitEvidence: "Evidence", ExitVerify: "Verify", ExitKBS: "KBS", ExitMeasure: "Measure", ExitInterrupted: "Interrupted",
	}
	readme, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	require.NoError(t, err)
	got := map[int]string{}
	for _, m := range regexp.MustCompile(`(?m)^\| (\d+) \| ([A-Za-z]+) \|`).FindAllStringSubmatch(string(readme), -1) {
		n, err := strconv.Atoi(m[1])
		require.NoError(t, err)
		got[n] = m[2]
	}
	assert.Equal(t, codes, got)
}

// Every flag of every command is named in the README.
func TestDocumentedFlags(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	require.NoError(t, err)
	var walk func(path string, flags []cli.Flag, cmds []*cli.Command)
	walk = func(path string, flags []cli.Flag, cmds []*cli.Command) {
		for _, f := range flags {
			n := f.Names()[0]
			if n == "help" || n == "version" {
				continue
			}
			assert.Contains(t, string(readme), "--"+n, "%s --%s is not in README.md", path, n)
		}
		for _, c := range cmds {
			walk(strings.TrimSpace(path+" "+c.Name), c.Flags, c.Subcommands)
		}
	}
	app := newApp(nil, io.Discard, io.Discard)
	walk("", app.Flags, app.Commands)
}
