package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/kbc"
	"github.com/cai-agent/cai-agent/kbc/ita"
	"github.com/cai-agent/cai-agent/kbc/kbstest"
	"github.com/cai-agent/cai-agent/kbc/offline"
	"github.com/cai-agent/cai-agent/kbc/trustee"
)

// kbcCommands returns the CLI commands of this area: get-resource, dev-kbs.
func kbcCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:  "get-resource",
			Usage: "get one secret from a key broker, proving this TEE",
			UsageText: "cai-agent get-resource --kbc trustee --kbs-url URL --resource kbs:///repo/type/tag --out FILE [--ca-file FILE] [--insecure-http]\n" +
				"cai-agent get-resource --kbc ita --kbs-url URL --resource KEY-UUID --out FILE [--ita-nonce]\n" +
				"cai-agent get-resource --kbc ita --kbs-url URL --ita-appraisal-url URL (--ita-api-key-file FILE | env CAI_ITA_API_KEY) [--ita-policy-id ID]... --resource KEY-UUID --out FILE\n" +
				"cai-agent get-resource --kbc offline (--key-file FILE | --key-env VAR | --resources FILE|DIR) --resource NAME --out FILE",
			Description: "Runs the broker's full attestation flow with the TEE selected by --tee (evidence from\n" +
				"--state-dir) and writes the released secret to --out FILE (created with mode 0600; an existing\n" +
				"file is never overwritten) or, only with --out -, to stdout. The secret is never logged.",
			Flags: append([]cli.Flag{
				&cli.StringFlag{Name: "resource", Usage: "trustee: kbs:///repo/type/tag; ita: key id (UUID) or ita:///keys/UUID; offline: a name"},
				&cli.StringFlag{Name: "out", Usage: "write the secret to `FILE` (0600, must not exist); - for stdout"},
			}, kbcClientFlags()...),
			Action: getResourceAction,
		},
		{
			Name:  "dev-kbs",
			Usage: "run a DEVELOPMENT-ONLY key broker on loopback: Trustee (RCAR 0.4.0) or Intel Trust Authority KBS v1",
			UsageText: "cai-agent dev-kbs [--kbc trustee] [--listen 127.0.0.1:8080] --resource kbs:///repo/type/tag=@FILE [--resource …] [--addr-file FILE]\n" +
				"cai-agent dev-kbs --kbc ita [--listen 127.0.0.1:8080] --resource KEY-UUID=@FILE [--resource …] [--require-nonce] [--addr-file FILE]\n" +
				"   [--ita-appraisal (--ita-api-key-file FILE | env CAI_ITA_API_KEY) [--ita-policy-id ID]...]",
			Description: "Serves the given resources over plain HTTP to any client presenting sample or TDX evidence whose\n" +
				"REPORTDATA binds the session nonce and TEE key (trustee) or the nonce and user_data (ita).\n" +
				"Quote signatures are NOT verified: this proves nothing and must never hold a real secret.\n" +
				"Stops on SIGINT/SIGTERM.",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "kbc", Usage: "protocol to serve: trustee (RCAR, kbs:///repo/type/tag resources) or ita (key transfer, UUID keys)", Value: "trustee"},
				&cli.StringFlag{Name: "listen", Usage: "address to listen on (port 0 picks a free port)", Value: "127.0.0.1:8080"},
				&cli.StringSliceFlag{Name: "resource", Usage: "serve FILE's bytes as `URI=@FILE` (repeatable; ita: KEY-UUID=@FILE or ita:///keys/KEY-UUID=@FILE)"},
				&cli.StringFlag{Name: "addr-file", Usage: "write the bound host:port to `FILE` once listening (atomically)"},
				&cli.BoolFlag{Name: "allow-remote", Usage: "allow a non-loopback --listen address"},
				&cli.StringFlag{Name: "kbs-version", Usage: "trustee: RCAR protocol version to demand", Value: kbstest.TrusteeVersion},
				&cli.DurationFlag{Name: "session-timeout", Usage: "trustee: session lifetime", Value: 5 * time.Minute},
				&cli.BoolFlag{Name: "require-nonce", Usage: "ita: refuse evidence that does not bind a nonce this server issued (as a key-transfer policy can)"},
				&cli.BoolFlag{Name: "ita-appraisal", Usage: "ita: also serve the Intel Trust Authority appraisal API v1 (/appraisal/v1/nonce, /appraisal/v1/attest) on the same listener, for passport mode"},
				&cli.StringFlag{Name: "ita-api-key-file", Usage: "ita: with --ita-appraisal, the API key clients must present, read from `FILE` (or set CAI_ITA_API_KEY)"},
				&cli.StringSliceFlag{Name: "ita-policy-id", Usage: "ita: with --ita-appraisal, an appraisal policy `ID` (UUID) clients may name; it always matches (repeatable)"},
			},
			Action: devKBSAction,
		},
	}
}

// kbcClientFlags are the flags that choose and configure a key broker client (everything
// but the resource name). Other commands that fetch a key (e.g. the agent) can reuse them
// with newKBCClient.
func kbcClientFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "kbc", Usage: "key broker client: trustee, ita or offline"},
		&cli.StringFlag{Name: "kbs-url", Usage: "broker base `URL` (https://host:port; http:// only with --insecure-http)", EnvVars: []string{"CAI_KBS_URL"}},
		&cli.StringFlag{Name: "ca-file", Usage: "trust only the CAs in this PEM `FILE` for the broker's TLS certificate"},
		&cli.BoolFlag{Name: "insecure-http", Usage: "allow a plain http:// broker URL (development only)"},
		&cli.DurationFlag{Name: "timeout", Usage: "per-request timeout", Value: 30 * time.Second},
		&cli.IntFlag{Name: "retries", Usage: "retries of a failed request (transport error, timeout, 5xx); 0: none", Value: 2},
		&cli.StringFlag{Name: "kbs-version", Usage: "trustee: RCAR protocol version to speak (Trustee demands an exact match)", Value: trustee.DefaultVersion},
		&cli.StringFlag{Name: "tee-key", Usage: "trustee: ephemeral TEE key, ec (P-256, ECDH-ES+A256KW) or rsa (RSA-3072, RSA-OAEP-256)", Value: "ec"},
		&cli.BoolFlag{Name: "ita-nonce", Usage: "ita: fetch a KBS nonce first and bind it into REPORTDATA"},
		&cli.StringFlag{Name: "ita-appraisal-url", Usage: "ita: passport mode: get an attestation token from the Intel Trust Authority API at `URL` (e.g. https://api.trustauthority.intel.com) and present it to the KBS"},
		&cli.StringFlag{Name: "ita-api-key-file", Usage: "ita passport mode: `FILE` holding the Trust Authority attestation API key (or set CAI_ITA_API_KEY)"},
		&cli.StringSliceFlag{Name: "ita-policy-id", Usage: "ita passport mode: appraisal policy `ID` (UUID) for Trust Authority to evaluate (repeatable)"},
		&cli.BoolFlag{Name: "ita-policy-must-match", Usage: "ita passport mode: Trust Authority issues no token unless every policy matches"},
		&cli.StringFlag{Name: "ita-ca-file", Usage: "ita passport mode: trust only the CAs in this PEM `FILE` for the Trust Authority API (default: the system roots; --ca-file is the KBS's)"},
		&cli.StringFlag{Name: "key-file", Usage: "offline: `FILE` whose bytes are the secret (for any resource name)"},
		&cli.StringFlag{Name: "key-env", Usage: "offline: environment `VAR` holding std base64 of the secret (for any resource name)"},
		&cli.StringFlag{Name: "resources", Usage: `offline: JSON file {"repo/type/tag":"<std b64>",…} or directory DIR/repo/type/tag`},
	}
}

// needsAttester reports whether the client chosen by kbcClientFlags attests (trustee, ita).
func needsAttester(c *cli.Context) bool { k := c.String("kbc"); return k == "trustee" || k == "ita" }

// itaAPIKeyEnv names the environment variable that may hold the Intel Trust Authority API
// key itself (never a command-line value: the process list shows those).
const itaAPIKeyEnv = "CAI_ITA_API_KEY"

// itaPassportFlags are the flags of ITA passport mode besides --ita-appraisal-url.
var itaPassportFlags = []string{"ita-api-key-file", "ita-policy-id", "ita-policy-must-match", "ita-ca-file"}

// itaFlagGiven reports whether an ITA passport flag has an effect: a non-empty value, or
// true (an empty CAI_<FLAG> variable, common in deployment templates, does not count).
func itaFlagGiven(c *cli.Context, name string) bool {
	switch name {
	case "ita-policy-id":
		l, err := stringSlice(c, name)
		return len(l) > 0 || err != nil // an empty element is given (and refused later)
	case "ita-policy-must-match":
		return c.Bool(name)
	}
	return c.String(name) != ""
}

// checkKBCFlags checks the combination of kbcClientFlags without reading any file, so that
// a command can refuse a bad command line (exit 2) before it opens the TEE.
func checkKBCFlags(c *cli.Context) error {
	kind := c.String("kbc")
	if kind != "trustee" && kind != "ita" && kind != "offline" {
		return usagef("--kbc must be trustee, ita or offline, not %q", kind)
	}
	// By value, not IsSet: an empty CAI_* variable (a template's default) means not given.
	if kind != "offline" && (c.String("key-file") != "" || c.String("key-env") != "" || c.String("resources") != "") {
		return usagef("--key-file, --key-env and --resources are for --kbc offline")
	}
	if kind != "ita" {
		for _, f := range append([]string{"ita-appraisal-url"}, itaPassportFlags...) {
			if itaFlagGiven(c, f) {
				return usagef("--%s is for --kbc ita", f)
			}
		}
	}
	if kind == "offline" {
		if c.String("kbs-url") != "" {
			return usagef("--kbc offline takes no --kbs-url")
		}
		return nil
	}
	if c.String("kbs-url") == "" {
		return usagef("--kbc %s needs --kbs-url", kind)
	}
	// Refused without repeating the URL: the broker client's error would quote it,
	// credentials and all.
	if u, err := url.Parse(c.String("kbs-url")); err != nil || u.User != nil || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		return usagef("--kbs-url must be a URL https://host[:port][/prefix] without user info, query or fragment")
	}
	if kind == "trustee" {
		if t := c.String("tee-key"); t != "ec" && t != "rsa" {
			return usagef("--tee-key must be ec or rsa")
		}
		return nil
	}
	if c.String("ita-appraisal-url") == "" {
		for _, f := range itaPassportFlags {
			if itaFlagGiven(c, f) {
				return usagef("--%s is for ITA passport mode: give --ita-appraisal-url too", f)
			}
		}
		return nil
	}
	if c.Bool("ita-nonce") {
		return usagef("--ita-nonce is for background-check mode; in passport mode (--ita-appraisal-url) the quote binds Trust Authority's nonce")
	}
	u, err := url.Parse(c.String("ita-appraisal-url"))
	if err != nil || u.User != nil || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		return usagef("--ita-appraisal-url must be a URL https://host[:port][/prefix] without user info, query or fragment")
	}
	// The API key travels in every request: --insecure-http (meant for a development KBS)
	// lets it cross only the loopback interface in clear, as to dev-kbs --ita-appraisal.
	if strings.EqualFold(u.Scheme, "http") && c.Bool("insecure-http") && !isLoopback(u.Hostname()) {
		return usagef("--ita-appraisal-url: plain http:// only to a loopback address (the API key would cross the network in clear); use https://")
	}
	if c.String("ita-api-key-file") == "" && os.Getenv(itaAPIKeyEnv) == "" {
		return usagef("--ita-appraisal-url needs the Trust Authority attestation API key: --ita-api-key-file FILE or the environment variable %s", itaAPIKeyEnv)
	}
	return nil
}

// maxAPIKeyFile bounds an API key file (a key is at most 4096 bytes, plus white space).
const maxAPIKeyFile = 8 << 10

// itaAPIKey returns the Intel Trust Authority API key from --ita-api-key-file or
// CAI_ITA_API_KEY (exactly one). Errors name the file or variable, never the key.
func itaAPIKey(c *cli.Context) (string, error) {
	file, env := c.String("ita-api-key-file"), os.Getenv(itaAPIKeyEnv)
	switch {
	case file != "" && env != "":
		return "", usagef("give the Trust Authority API key once: --ita-api-key-file or %s, not both", itaAPIKeyEnv)
	case env != "":
		if !ita.ValidAPIKey(env) {
			return "", usagef("%s: want one API key of printable ASCII without spaces (at most 4096 bytes)", itaAPIKeyEnv)
		}
		return env, nil
	case file == "":
		return "", usagef("no Trust Authority API key: give --ita-api-key-file FILE or set %s", itaAPIKeyEnv)
	}
	b, err := kbc.ReadSmallFile(file, maxAPIKeyFile)
	if err != nil {
		return "", usagef("--ita-api-key-file: %v (the path is not repeated: it may be a key pasted in its place)", kbc.WithoutPath(err))
	}
	defer clear(b)
	key := strings.TrimSpace(string(b))
	if !ita.ValidAPIKey(key) {
		return "", usagef("--ita-api-key-file %s: want one API key of printable ASCII without spaces (at most 4096 bytes)", file)
	}
	return key, nil
}

// newKBCClient builds the client chosen by kbcClientFlags (checked by checkKBCFlags first).
// attester is used by trustee and ita (it may be nil for offline).
func newKBCClient(c *cli.Context, attester evidence.Attester) (kbc.Client, error) {
	httpOpts := kbc.HTTPOptions{CAFile: c.String("ca-file"), InsecureHTTP: c.Bool("insecure-http"), Timeout: c.Duration("timeout"), Retries: c.Int("retries")}
	if c.Int("retries") <= 0 {
		httpOpts.Retries = -1
	}
	if err := checkKBCFlags(c); err != nil {
		return nil, err
	}
	kind := c.String("kbc")
	switch kind {
	case "offline":
		return offline.New(offline.Options{KeyFile: c.String("key-file"), KeyEnv: c.String("key-env"), Resources: c.String("resources")})
	case "trustee", "ita":
		if attester == nil {
			return nil, fmt.Errorf("--kbc %s: no evidence provider", kind)
		}
		if kind == "ita" && c.String("ita-appraisal-url") != "" {
			key, err := itaAPIKey(c)
			if err != nil {
				return nil, err
			}
			// The Trust Authority API has its own CA (public by default); --ca-file is the KBS's.
			appHTTP := httpOpts
			appHTTP.CAFile = c.String("ita-ca-file")
			ids, err := stringSlice(c, "ita-policy-id")
			if err != nil {
				return nil, err
			}
			ap, err := ita.NewAppraiser(ita.AppraiserOptions{URL: c.String("ita-appraisal-url"), APIKey: key,
				PolicyIDs: ids, PolicyMustMatch: c.Bool("ita-policy-must-match"),
				Attester: attester, HTTP: appHTTP})
			if err != nil {
				return nil, err
			}
			return ita.New(ita.Options{URL: c.String("kbs-url"), Passport: ap.Token, HTTP: httpOpts})
		}
		if kind == "ita" {
			return ita.New(ita.Options{URL: c.String("kbs-url"), Attester: attester, Nonce: c.Bool("ita-nonce"), HTTP: httpOpts})
		}
		alg := map[string]string{"ec": trustee.AlgECDHES, "rsa": trustee.AlgRSAOAEP256}[c.String("tee-key")]
		return trustee.New(trustee.Options{URL: c.String("kbs-url"), Attester: attester, Version: c.String("kbs-version"), KeyAlgorithm: alg, HTTP: httpOpts})
	}
	return nil, usagef("--kbc must be trustee, ita or offline, not %q", kind)
}

var kbcExitCodes = []exitMapping{
	{kbc.ErrInvalidURI, ExitUsage},
	{kbc.ErrConfig, ExitUsage},
	{kbc.ErrRefused, ExitKBS},
	{kbc.ErrNotFound, ExitKBS},
	{kbc.ErrProtocol, ExitKBS},
	{kbc.ErrTransport, ExitKBS},
}

// errOutExists is returned when --out names an existing file.
var errOutExists = errors.New("output file exists")

func getResourceAction(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	if err := requireFlags(c, "kbc", "resource"); err != nil {
		return err
	}
	out := c.String("out")
	if out == "" {
		return usagef("get-resource: refusing to print a secret by default; give --out FILE (or --out - for stdout)")
	}
	if out != "-" {
		if _, err := os.Lstat(out); err == nil {
			return usagef("get-resource: --out %s: %v (remove it first)", out, errOutExists)
		}
	}
	if err := checkKBCFlags(c); err != nil {
		return err
	}
	var attester evidence.Attester
	if needsAttester(c) && c.String("kbs-url") != "" {
		p, err := openPlatform(c)
		if err != nil {
			return err
		}
		defer p.Close()
		attester = p
	}
	client, err := newKBCClient(c, attester)
	if err != nil {
		return err
	}
	secret, err := client.GetResource(c.Context, c.String("resource"))
	if err != nil {
		return err
	}
	defer clear(secret)
	if out == "-" {
		_, err := c.App.Writer.Write(secret)
		return err
	}
	if err := writeSecret(out, secret); err != nil {
		return err
	}
	slog.Info("secret written", "resource", kbc.Sanitize(c.String("resource")), "file", out, "bytes", len(secret))
	return nil
}

// writeSecret creates path (0600, O_EXCL) and writes secret; on failure the file is removed.
func writeSecret(path string, secret []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		// Created (or a symlink planted) since getResourceAction checked.
		return usagef("get-resource: --out %s: %v (remove it first)", path, errOutExists)
	}
	if err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	_, err = f.Write(secret)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("--out %s: %w", path, err)
	}
	return nil
}

const devBanner = `
################################################################################
##  cai-agent dev-kbs: DEVELOPMENT ONLY — NOT A KEY BROKER FOR REAL SECRETS   ##
##  Plain HTTP. Quote signatures are NOT verified; sample evidence accepted.  ##
##  Anyone who can reach this port and forge evidence gets the resources.     ##
################################################################################
`

func devKBSAction(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	if err := requireFlags(c, "resource"); err != nil {
		return err
	}
	listen := c.String("listen")
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return usagef("dev-kbs: --listen %q: %v", listen, err)
	}
	if !isLoopback(host) && !c.Bool("allow-remote") {
		return usagef("dev-kbs: --listen %q is not a loopback address; refusing without --allow-remote", listen)
	}
	kind := c.String("kbc")
	for _, f := range []struct{ name, kbc string }{{"kbs-version", "trustee"}, {"session-timeout", "trustee"}, {"require-nonce", "ita"},
		{"ita-appraisal", "ita"}, {"ita-api-key-file", "ita"}, {"ita-policy-id", "ita"}} {
		if c.IsSet(f.name) && kind != f.kbc {
			return usagef("dev-kbs: --%s is for --kbc %s", f.name, f.kbc)
		}
	}
	var (
		handler   http.Handler
		set       func(uri string, b []byte) error
		resources func() []string
		banner    string
		try       string
	)
	switch kind {
	case "trustee":
		srv := kbstest.NewTrustee()
		srv.Version = c.String("kbs-version")
		srv.SessionTimeout = c.Duration("session-timeout")
		srv.Log = slog.Default()
		handler, set, resources = srv, srv.SetResource, srv.Resources
		banner, try = "Trustee KBS, RCAR "+srv.Version, "--tee sample get-resource --kbc trustee"
	case "ita":
		srv := kbstest.NewITA()
		srv.RequireNonce = c.Bool("require-nonce")
		srv.Log = slog.Default()
		var ids []string
		handler, resources = srv, func() []string { return ids }
		if !c.Bool("ita-appraisal") {
			for _, f := range []string{"ita-api-key-file", "ita-policy-id"} {
				if c.IsSet(f) {
					return usagef("dev-kbs: --%s is for --ita-appraisal", f)
				}
			}
		} else {
			key, err := itaAPIKey(c)
			if err != nil {
				return usagef("dev-kbs: --ita-appraisal: %v", err)
			}
			app := kbstest.NewITAAppraisal(srv, key)
			app.Log = slog.Default()
			for i, id := range c.StringSlice("ita-policy-id") {
				if err := app.SetPolicy(id, nil); err != nil {
					return usagef("dev-kbs: --ita-policy-id #%d is not a UUID (8-4-4-4-12 hex digits)", i+1)
				}
			}
			handler = app.Handler(srv)
		}
		set = func(uri string, b []byte) error {
			id, err := ita.ParseKeyID(uri)
			if err != nil {
				return err
			}
			ids = append(ids, id)
			return srv.SetKey(id, b)
		}
		// The ITA client wants TDX evidence (the real service appraises TDX quotes only).
		banner, try = "Intel Trust Authority KBS v1 key transfer", "--tee tdx get-resource --kbc ita --ita-nonce"
		if c.Bool("ita-appraisal") {
			banner += ", and Intel Trust Authority appraisal API v1 for passport mode"
			try = "--tee tdx get-resource --kbc ita --ita-appraisal-url http://ADDR --ita-api-key-file FILE"
		}
	default:
		return usagef("dev-kbs: --kbc must be trustee or ita, not %q", kind)
	}
	for _, spec := range c.StringSlice("resource") {
		uri, file, ok := strings.Cut(spec, "=@")
		if !ok {
			return usagef("dev-kbs: --resource %q: want URI=@FILE", spec)
		}
		b, err := os.ReadFile(file)
		if err != nil {
			return usagef("dev-kbs: --resource %s: %v", uri, err)
		}
		err = set(uri, b)
		clear(b)
		if err != nil {
			return usagef("dev-kbs: --resource: %v", err)
		}
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("dev-kbs: %w", err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	fmt.Fprint(c.App.ErrWriter, devBanner)
	fmt.Fprintf(c.App.ErrWriter, "dev-kbs: listening on http://%s (%s); resources: %s\n", addr, banner, strings.Join(resources(), " "))
	fmt.Fprintf(c.App.ErrWriter, "dev-kbs: try: cai-agent %s --kbs-url http://%s --insecure-http --resource URI --out FILE\n", strings.ReplaceAll(try, "ADDR", addr), addr)
	if f := c.String("addr-file"); f != "" {
		if err := writeFileAtomic(f, []byte(addr+"\n"), 0o644); err != nil {
			return fmt.Errorf("dev-kbs: --addr-file: %w", err)
		}
	}
	hs := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute, WriteTimeout: time.Minute}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("dev-kbs: %w", err)
	case <-c.Context.Done():
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hs.Shutdown(ctx)
	fmt.Fprintln(c.App.ErrWriter, "dev-kbs: stopped")
	return nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
