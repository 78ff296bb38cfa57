package main

import (
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/cai-agent/cai-agent/agent/serve"
)

// serveFlags are the flags of `cai-agent serve`, reusable by commands that keep serving
// (fetch-and-decrypt --serve); serveConfig reads them.
func serveFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{
			Name:    "socket",
			Usage:   "unix socket `PATH` (mode 0660; \"\" for none); POST /v1/measurements is served only here",
			Value:   serve.DefaultSocket,
			EnvVars: []string{"CAI_SOCKET"},
		},
		&cli.StringFlag{
			Name:    "listen",
			Usage:   "also serve on TCP `ADDR` (HOST:PORT; :PORT means 127.0.0.1:PORT)",
			EnvVars: []string{"CAI_LISTEN"},
		},
		&cli.IntFlag{
			Name:    "max-queue",
			Usage:   "evidence requests that may wait while one quote is produced; more get 503",
			Value:   serve.DefaultMaxQueue,
			EnvVars: []string{"CAI_MAX_QUEUE"},
		},
		&cli.DurationFlag{
			Name:    "quote-timeout",
			Usage:   "time limit for one evidence request, waiting included (504 when exceeded)",
			Value:   serve.DefaultQuoteTimeout,
			EnvVars: []string{"CAI_QUOTE_TIMEOUT"},
		},
	}
}

// serveConfig checks the serve flags and returns the configuration (Platform unset).
func serveConfig(c *cli.Context) (serve.Config, error) {
	cfg := serve.Config{
		Socket:       c.String("socket"),
		Listen:       c.String("listen"),
		MaxQueue:     c.Int("max-queue"),
		QuoteTimeout: c.Duration("quote-timeout"),
	}
	if cfg.Socket == "" && cfg.Listen == "" {
		return cfg, usagef("serve: give --socket PATH and/or --listen ADDR")
	}
	if strings.HasPrefix(cfg.Socket, "@") {
		return cfg, usagef("serve: --socket %q would be an abstract unix socket, which anyone may connect to; give a file path", cfg.Socket)
	}
	if cfg.MaxQueue < 1 || cfg.MaxQueue > serve.MaxMaxQueue {
		return cfg, usagef("serve: --max-queue must be at least 1 and at most %d", serve.MaxMaxQueue)
	}
	if cfg.QuoteTimeout <= 0 {
		return cfg, usagef("serve: --quote-timeout must be positive")
	}
	if cfg.Listen != "" {
		if _, err := serve.TCPAddr(cfg.Listen); err != nil {
			return cfg, usageError{err}
		}
	}
	return cfg, nil
}

// serveCommands returns the CLI commands of this area: serve.
func serveCommands() []*cli.Command {
	return []*cli.Command{{
		Name:      "serve",
		Usage:     "serve nonce-bound evidence to relying parties and measurements to local components",
		UsageText: "cai-agent serve [--socket PATH] [--listen ADDR] [--max-queue N] [--quote-timeout D]",
		Description: "Endpoints:\n" +
			"  GET  /v1/evidence?nonce=N        evidence bundle; REPORTDATA = NonceReportData(N, cc_eventlog)\n" +
			"  GET  /api/v1/tee/quote[?nonce=N] Open WebUI TDX patch shape (quote as hex, timestamp, id, status)\n" +
			"  POST /v1/measurements            {\"domain\",\"operation\",\"content\"} → RTMR3 (unix socket only)\n" +
			"Quotes are produced one at a time; --max-queue requests may wait, more get 503 with Retry-After;\n" +
			"a request not answered within --quote-timeout gets 504. Runs until SIGINT/SIGTERM.",
		Flags: serveFlags(),
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			if _, err := serveConfig(c); err != nil {
				return err
			}
			p, err := openPlatform(c)
			if err != nil {
				return err
			}
			defer p.Close()
			return runServe(c, p)
		},
	}}
}

// runServe serves p with the serve flags of c (serveFlags) until c.Context ends: what
// `fetch-and-decrypt --serve` calls after publishing, with its already open platform.
func runServe(c *cli.Context, p serve.Platform) error {
	cfg, err := serveConfig(c)
	if err != nil {
		return err
	}
	ls, err := serve.Listen(cfg)
	if err != nil {
		return err
	}
	cfg.Platform = p
	s, err := serve.New(cfg)
	if err != nil {
		for _, l := range ls {
			l.Close()
		}
		return err
	}
	return s.Serve(c.Context, ls...)
}

var serveExitCodes = []exitMapping{
	{serve.ErrConfig, ExitUsage},
}
