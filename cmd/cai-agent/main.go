// Command cai-agent is the attestation agent and model decryptor for confidential AI
// inference. All logic lives in the library packages; this file only wires the CLI.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"
)

func main() { os.Exit(Main()) }

// Main runs cai-agent with the process's arguments and standard streams and returns the exit
// code. It is separate from main so that testscript can run the CLI in-process.
func Main() int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return run(ctx, os.Args, os.Stdin, os.Stdout, os.Stderr)
}

// run executes one CLI invocation. Errors are printed once, on stderr, and mapped to the
// documented exit codes (see exitcodes.go and the README).
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	app := newApp(stdin, stdout, stderr)
	err := app.RunContext(ctx, nestedHelp(app, args))
	if err == nil {
		return ExitOK
	}
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		if ec.ExitCode() == ExitOK {
			return ExitOK
		}
		// Only urfave/cli's help returns other exit coders: `help NO-SUCH-COMMAND`.
		fmt.Fprintf(stderr, "cai-agent: %v\n", err)
		return ExitUsage
	}
	if ctx.Err() != nil {
		// Whatever step failed, it failed because the run was stopped.
		fmt.Fprintf(stderr, "cai-agent: interrupted: %v\n", err)
		return ExitInterrupted
	}
	fmt.Fprintf(stderr, "cai-agent: %v\n", err)
	return exitCode(err)
}

// nestedHelp rewrites `help CMD SUB…` (which urfave/cli answers with CMD's help) into
// `CMD SUB… --help`, after any global flags.
func nestedHelp(app *cli.App, args []string) []string {
	i := 1
	for i < len(args) && strings.HasPrefix(args[i], "-") {
		name := strings.TrimLeft(args[i], "-")
		i++
		if strings.Contains(name, "=") {
			continue
		}
		for _, f := range app.Flags {
			if _, isBool := f.(*cli.BoolFlag); !isBool && slices.Contains(f.Names(), name) {
				i++ // the flag's value
				break
			}
		}
	}
	if len(args)-i < 3 || args[i] != "help" {
		return args // not `help CMD SUB…`
	}
	out := append(slices.Clone(args[:i]), args[i+1:]...)
	return append(out, "--help")
}

func newApp(stdin io.Reader, stdout, stderr io.Writer) *cli.App {
	app := &cli.App{
		Name:                 "cai-agent",
		Usage:                "attestation agent and model decryptor for confidential AI inference in Intel TDX",
		Version:              appVersion(),
		Reader:               stdin,
		Writer:               stdout,
		ErrWriter:            stderr,
		EnableBashCompletion: true,
		Flags: []cli.Flag{
			&cli.StringFlag{
				Name:    "tee",
				Usage:   "TEE to use: auto (TDX if configfs-tsm reports tdx_guest), tdx, or sample (development only)",
				Value:   "auto",
				EnvVars: []string{"CAI_TEE"},
			},
			&cli.StringFlag{
				Name:    "state-dir",
				Usage:   "directory for the event log, its write-ahead record and the sample TEE's state",
				Value:   "/run/cai-agent",
				EnvVars: []string{"CAI_STATE_DIR"},
			},
			&cli.StringFlag{
				Name:    "log-level",
				Usage:   "debug, info, warn or error",
				Value:   "info",
				EnvVars: []string{"CAI_LOG_LEVEL"},
			},
			&cli.BoolFlag{
				Name:    "log-json",
				Usage:   "log as JSON lines on stderr",
				EnvVars: []string{"CAI_LOG_JSON"},
			},
		},
		Before: func(c *cli.Context) error {
			switch tee := c.String("tee"); tee {
			case "auto", "tdx", "sample":
			default:
				return usagef("--tee %q: want auto, tdx or sample", tee)
			}
			return setupLogging(c, stderr)
		},
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return usageError{err}
		},
		// Errors are printed by run, once.
		ExitErrHandler: func(*cli.Context, error) {},
		Action: func(c *cli.Context) error {
			if c.Args().Present() {
				return usagef("unknown command %q (see --help)", c.Args().First())
			}
			return cli.ShowAppHelp(c)
		},
	}
	for _, cmds := range [][]*cli.Command{
		cryptoCommands(),
		evidenceCommands(),
		verifyCommands(),
		kbcCommands(),
		agentCommands(),
		serveCommands(),
	} {
		app.Commands = append(app.Commands, cmds...)
	}
	for _, cmd := range app.Commands {
		prepareCommand(cmd)
	}
	return app
}

// prepareCommand makes every command line mistake of cmd and its subcommands a usage error
// (exit 2) with nothing on stdout: bad flags and unknown subcommands. Required flags are
// checked by the actions (requireFlags, after positional arguments): urfave/cli's own check
// would print the whole help on stdout and exit 1, so no flag may set Required.
func prepareCommand(cmd *cli.Command) {
	cmd.OnUsageError = func(_ *cli.Context, err error, _ bool) error { return usageError{err} }
	if len(cmd.Subcommands) > 0 && cmd.Action == nil {
		cmd.Action = groupAction
	}
	for _, sub := range cmd.Subcommands {
		prepareCommand(sub)
	}
}

// groupAction runs for a command group when no subcommand matched: its help when there are
// no arguments, otherwise an unknown-command usage error.
func groupAction(c *cli.Context) error {
	if c.Args().Present() {
		return usagef("%s: unknown command %q (see --help)", cmdName(c), c.Args().First())
	}
	return cli.ShowSubcommandHelp(c)
}

// version is set at build time with -ldflags "-X main.version=…" (make build: git describe).
var version = "dev"

// appVersion is version, or else the main module's version the Go toolchain recorded: that
// of `go install …/cmd/cai-agent@v1.2.3`, or a pseudo-version from the VCS of a local
// `go build` (unless built with -buildvcs=false).
func appVersion() string {
	if version != "dev" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return version
}

func setupLogging(c *cli.Context, stderr io.Writer) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return usagef("--log-level: %v", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(stderr, opts)
	if c.Bool("log-json") {
		h = slog.NewJSONHandler(stderr, opts)
	}
	slog.SetDefault(slog.New(h))
	return nil
}
