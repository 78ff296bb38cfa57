package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/cai-agent/cai-agent/agent"
	"github.com/cai-agent/cai-agent/agent/ollama"
	"github.com/cai-agent/cai-agent/agent/tinyllama"
	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
	"github.com/cai-agent/cai-agent/kbc"
)

// agentCommands returns the CLI commands of this area.
func agentCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:  "fetch-and-decrypt",
			Usage: "measure binaries, get the model key from a key broker, stream-decrypt the model into tmpfs, measure and publish it",
			UsageText: "cai-agent [--tee auto|tdx|sample] fetch-and-decrypt --source DIR|URL --out DIR --kbc trustee|ita|offline\n" +
				"   [--kbs-url URL] [--resource URI] [--key-file FILE] [--measure-binary PATH]... [--ollama-models DIR] [--json]\n" +
				"   [--serve [--socket PATH] [--listen ADDR]]\n" +
				"Every flag can also be set with the environment variable CAI_<FLAG> (e.g. CAI_KBS_URL; lists comma-separated).",
			Flags:  withEnv(append(append(fetchFlags(), kbcClientFlags()...), serveFlags()...)),
			Action: fetchAndDecryptAction,
		},
		{
			Name:   "dev-tiny-model",
			Usage:  "write the tiny random-weights llama GGUF (for demos and tests) as an Ollama model or a plain file",
			Hidden: true,
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "ollama-models", Usage: "write it as an Ollama model into this store `DIR`"},
				&cli.StringFlag{Name: "name", Usage: "Ollama model name", Value: "cai-tiny"},
				&cli.StringFlag{Name: "gguf", Usage: "write the GGUF file to `FILE` instead"},
			},
			Action: devTinyModelAction,
		},
	}
}

// maxWorkers bounds --workers: the decryptor allocates a chunk buffer (up to 16 MiB) per
// worker up front.
const maxWorkers = 256

func fetchFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "source", Usage: "encrypted model: a local `DIR` or an http(s):// base URL"},
		&cli.StringFlag{Name: "out", Usage: "output `DIR` on tmpfs (for an Ollama model: the Ollama store, OLLAMA_MODELS)"},
		&cli.StringFlag{Name: "ollama-models", Usage: "Ollama store `DIR`: the output directory of an Ollama model when --out is not given (must equal --out if both are)"},
		&cli.StringFlag{Name: "resource", Usage: "key resource `URI` at the broker (default: the model's key hint)"},
		&cli.StringSliceFlag{Name: "measure-binary", Usage: "measure `PATH` into RTMR3 before requesting the key (repeatable)"},
		&cli.BoolFlag{Name: "json", Usage: "print a JSON summary on stdout"},
		&cli.BoolFlag{Name: "allow-non-tmpfs", Usage: "allow an output directory that is not on tmpfs/ramfs (plaintext may reach disk; development only)"},
		&cli.BoolFlag{Name: "verify-digests", Usage: "also re-hash every file's plaintext (SHA-256) against the manifest"},
		&cli.IntFlag{Name: "workers", Usage: "shards decrypted in parallel (0: number of CPUs)"},
		&cli.StringFlag{Name: "source-ca-file", Usage: "trust only the CAs in this PEM `FILE` for an https:// source"},
		&cli.StringFlag{Name: "source-token-file", Usage: "send the token in `FILE` as \"Authorization: Bearer\" to an http(s):// source (a private hub or bucket)"},
		&cli.IntFlag{Name: "source-retries", Usage: "retries (resumed with Range requests) per object transfer; 0: none", Value: 5},
		&cli.BoolFlag{Name: "no-progress", Usage: "no progress bar or periodic progress log"},
		&cli.BoolFlag{Name: "serve", Usage: "after publishing, keep running as the evidence server of cai-agent serve (flags --socket, --listen, --max-queue, --quote-timeout)"},
	}
}

// withEnv gives every flag the environment variable CAI_<FLAG> (dashes as underscores).
func withEnv(flags []cli.Flag) []cli.Flag {
	for _, f := range flags {
		env := []string{"CAI_" + strings.ToUpper(strings.ReplaceAll(f.Names()[0], "-", "_"))}
		switch f := f.(type) {
		case *cli.StringFlag:
			f.EnvVars = env
		case *cli.StringSliceFlag:
			f.EnvVars = env
		case *cli.BoolFlag:
			f.EnvVars = env
		case *cli.IntFlag:
			f.EnvVars = env
		case *cli.DurationFlag:
			f.EnvVars = env
		}
	}
	return flags
}

// stringSlice returns the list flag name. A blank CAI_* variable of the flag (a deployment
// template's default), which urfave/cli parses as [""], means not given; any other empty
// element (an explicit --flag "" from an unset shell variable, a trailing comma) is a usage
// error rather than silently nothing, e.g. no binary measured.
func stringSlice(c *cli.Context, name string) ([]string, error) {
	l := c.StringSlice(name)
	if len(l) == 1 && l[0] == "" && blankEnv(c, name) {
		return nil, nil
	}
	for _, s := range l {
		if s == "" {
			return nil, usagef("--%s: an empty value (an unset variable? a trailing comma?)", name)
		}
	}
	return l, nil
}

// blankEnv reports whether the current command's flag name reads an environment variable
// that is set but blank.
func blankEnv(c *cli.Context, name string) bool {
	if c.Command == nil {
		return false
	}
	for _, f := range c.Command.Flags {
		d, ok := f.(cli.DocGenerationFlag)
		if !ok || !slices.Contains(f.Names(), name) {
			continue
		}
		for _, e := range d.GetEnvVars() {
			if v, ok := os.LookupEnv(e); ok && strings.TrimSpace(v) == "" {
				return true
			}
		}
	}
	return false
}

var agentExitCodes = []exitMapping{
	{agent.ErrConfig, ExitUsage},
	{agent.ErrSource, ExitSource},
	{agent.ErrKey, ExitKBS},
	{agent.ErrMeasure, ExitMeasure},
}

func fetchAndDecryptAction(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	if err := requireFlags(c, "source", "kbc"); err != nil {
		return err
	}
	out, models := c.String("out"), c.String("ollama-models")
	if out == "" && models == "" {
		return usagef("fetch-and-decrypt: --out or --ollama-models is required")
	}
	if out != "" && models != "" && filepath.Clean(out) != filepath.Clean(models) {
		return usagef("fetch-and-decrypt: --out %s and --ollama-models %s differ (an Ollama model is published into its store)", out, models)
	}
	if w := c.Int("workers"); w < 0 || w > maxWorkers {
		return usagef("fetch-and-decrypt: --workers must be between 0 and %d", maxWorkers)
	}
	if err := checkKBCFlags(c); err != nil {
		return err
	}
	bins, err := stringSlice(c, "measure-binary")
	if err != nil {
		return err
	}
	var src modelcrypt.Source
	srcArg := c.String("source")
	// URL schemes are case-insensitive: HTTPS://… is a URL too, not a local path whose error
	// would repeat its query (a SAS).
	if scheme, _, _ := strings.Cut(srcArg, "://"); strings.EqualFold(scheme, "http") || strings.EqualFold(scheme, "https") {
		retries := c.Int("source-retries")
		if retries <= 0 {
			retries = -1
		}
		hdr, err := sourceHeader(c.String("source-token-file"))
		if err != nil {
			return err
		}
		if hdr != nil && strings.EqualFold(scheme, "http") {
			slog.Warn("sending the source token over plain http://: anyone on the network path (the cloud host) can read it; use https://")
		}
		hs, err := agent.NewHTTPSource(srcArg, agent.HTTPOptions{CAFile: c.String("source-ca-file"), Retries: retries, Header: hdr})
		if err != nil {
			return usageError{err}
		}
		src = hs
	} else {
		if c.String("source-ca-file") != "" {
			return usagef("--source-ca-file is for an https:// source")
		}
		if c.String("source-token-file") != "" {
			return usagef("--source-token-file is for an http(s):// source")
		}
		fi, err := os.Stat(srcArg)
		if err == nil && !fi.IsDir() {
			err = errors.New("not a directory or http(s):// URL")
		}
		if err != nil {
			return &agent.StepError{Step: agent.StepOpenModel, Err: fmt.Errorf("--source %s: %w", srcArg, err)}
		}
		src = modelcrypt.DirSource(srcArg)
	}
	kind := ""
	if out == "" {
		// Only an Ollama model may go to --ollama-models alone: checked here on the public
		// header to fail fast, and by agent.Run on the authenticated manifest.
		kind = modelcrypt.KindOllama
		m, err := modelcrypt.Open(c.Context, src)
		if err != nil {
			return &agent.StepError{Step: agent.StepOpenModel, Err: err}
		}
		if m.Manifest().Kind != modelcrypt.KindOllama {
			return usagef("fetch-and-decrypt: the model is not an Ollama model (kind %q); give --out", m.Manifest().Kind)
		}
		out = models
	}
	if c.Bool("serve") {
		// Check the server's flags before the long part, not after it.
		if _, err := serveConfig(c); err != nil {
			return err
		}
	}

	p, err := openPlatform(c)
	if err != nil {
		return fmt.Errorf("open evidence: %w", err)
	}
	defer p.Close()
	broker, err := newKBCClient(c, p)
	if err != nil {
		return err
	}
	cfg := agent.Config{
		Source:          src,
		Out:             out,
		Evidence:        p,
		Broker:          broker,
		Resource:        c.String("resource"),
		Kind:            kind,
		MeasureBinaries: bins,
		AllowNonTmpfs:   c.Bool("allow-non-tmpfs"),
		VerifyDigests:   c.Bool("verify-digests"),
		Workers:         c.Int("workers"),
	}
	var pr *progress
	if !c.Bool("no-progress") {
		pr = newProgress(c.App.ErrWriter)
		cfg.Progress = pr.update
	}
	res, err := agent.Run(c.Context, cfg)
	if pr != nil {
		pr.finish()
	}
	if err != nil {
		return err
	}
	if c.Bool("json") {
		if err := writeJSON(c.App.Writer, res); err != nil {
			return err
		}
	}
	if c.Bool("serve") {
		return runServe(c, p)
	}
	return nil
}

// sourceHeader returns the request header carrying the bearer token in tokenFile ("" for
// none). Errors name the file, never its content.
func sourceHeader(tokenFile string) (http.Header, error) {
	if tokenFile == "" {
		return nil, nil
	}
	// A regular file of at most 64 KiB (a FIFO does not block); the path is not repeated: it
	// may be the token pasted in its place.
	b, err := kbc.ReadSmallFile(tokenFile, 64<<10)
	if err != nil {
		return nil, usagef("--source-token-file: %v (the path is not repeated: it may be a token pasted in its place)", kbc.WithoutPath(err))
	}
	defer clear(b)
	tok := strings.TrimSpace(string(b))
	if tok == "" || strings.ContainsFunc(tok, func(r rune) bool { return r < 0x21 || r > 0x7e }) {
		return nil, usagef("--source-token-file %s: want one token of printable ASCII (at most 64 KiB)", tokenFile)
	}
	return http.Header{"Authorization": {"Bearer " + tok}}, nil
}

// progress draws a bar on a terminal stderr, or logs every 5 s otherwise.
type progress struct {
	w     io.Writer
	tty   bool
	start time.Time
	last  time.Time
	drawn bool
	mu    chan struct{}
}

func newProgress(w io.Writer) *progress {
	p := &progress{w: w, start: time.Now(), mu: make(chan struct{}, 1)}
	if f, ok := w.(*os.File); ok {
		if _, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS); err == nil {
			p.tty = true
		}
	}
	p.last = p.start
	return p
}

func (p *progress) update(done, total int64) {
	select {
	case p.mu <- struct{}{}:
	default:
		return // another goroutine is reporting
	}
	defer func() { <-p.mu }()
	now := time.Now()
	interval := 5 * time.Second
	if p.tty {
		interval = 200 * time.Millisecond
	}
	if now.Sub(p.last) < interval && done < total {
		return
	}
	p.last = now
	secs := now.Sub(p.start).Seconds()
	rate := float64(done) / 1e6 / max(secs, 1e-9)
	pct := 100 * float64(done) / float64(max(total, 1))
	if p.tty {
		const width = 30
		n := int(pct / 100 * width)
		fmt.Fprintf(p.w, "\rdecrypting [%s%s] %5.1f%% %.0f MB/s ", strings.Repeat("=", n), strings.Repeat(" ", width-n), pct, rate)
		p.drawn = true
		return
	}
	slog.Info("decrypting", "done_bytes", done, "total_bytes", total, "percent", fmt.Sprintf("%.1f", pct), "mb_per_s", fmt.Sprintf("%.0f", rate))
}

func (p *progress) finish() {
	if p.drawn {
		fmt.Fprintln(p.w)
	}
}

func devTinyModelAction(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	if (c.String("gguf") == "") == (c.String("ollama-models") == "") {
		return usagef("dev-tiny-model: give exactly one of --gguf FILE or --ollama-models DIR")
	}
	if path := c.String("gguf"); path != "" {
		return createExclusive(path, 0o644, tinyllama.Write)
	}
	gguf, err := tinyllama.Bytes()
	if err != nil {
		return err
	}
	id, err := ollama.WriteModel(c.String("ollama-models"), c.String("name"), []ollama.Layer{
		{MediaType: ollama.MediaTypeModel, Data: gguf},
		{MediaType: ollama.MediaTypeTemplate, Data: []byte(tinyllama.Template)},
		{MediaType: ollama.MediaTypeParams, Data: []byte(tinyllama.Params)},
	})
	if err != nil {
		return err
	}
	fmt.Fprintln(c.App.Writer, id)
	return nil
}
