package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/verify"
)

// verifyCommands returns the CLI commands of this area: quote inspect, verify.
func verifyCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:  "quote",
			Usage: "work with TD quotes",
			Subcommands: []*cli.Command{
				{
					Name:      "inspect",
					Usage:     "decode a TD quote (v4 or v5; raw, hex or base64) without verifying it",
					UsageText: "cai-agent quote inspect FILE [--json]",
					Flags: []cli.Flag{
						&cli.BoolFlag{Name: "json", Usage: "print the fields as a JSON object (bytes as lowercase hex)"},
					},
					Action: quoteInspectAction,
				},
			},
		},
		{
			Name:  "verify",
			Usage: "verify a TD quote, or nonce-bound evidence from `cai-agent serve`, offline",
			UsageText: "cai-agent verify --quote FILE [--at RFC3339] [--policy FILE] [--eventlog FILE] [--collateral] [--json]\n" +
				"cai-agent verify --evidence FILE --nonce STRING [--at RFC3339] [--policy FILE] [--collateral] [--allow-sample] [--json]",
			Description: "--quote: checks the quote's signature, QE report and PCK certificate chain against the Intel SGX\n" +
				"Root CA at --at (default now), offline; with --eventlog, that the log replays to the quote's RTMRs;\n" +
				"with --policy, the policy. --evidence (the JSON of GET /v1/evidence, or `evidence --json`; - for\n" +
				"stdin): the same, plus that REPORTDATA binds --nonce and the cc_eventlog, and that the bundle's\n" +
				"measurements and model are those of its log. Exit 0 only if everything verifies; 10 when the\n" +
				"evidence fails verification (the reason on stderr); 2 for a bad policy or usage; 1 when an input\n" +
				"cannot be read. Sample TEE evidence is refused unless --allow-sample.",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "quote", Usage: "TD quote `FILE` (raw, hex or base64)"},
				&cli.StringFlag{Name: "evidence", Usage: "evidence bundle JSON `FILE` (- for stdin)"},
				&cli.StringFlag{Name: "nonce", Usage: "the nonce the evidence must be bound to (with --evidence)"},
				&cli.StringFlag{Name: "eventlog", Usage: "event log `FILE` (CCEL / cc_eventlog) to replay against the quote (with --quote)"},
				&cli.StringFlag{Name: "policy", Usage: "policy `FILE`, JSON or YAML (.yaml/.yml)"},
				&cli.StringFlag{Name: "at", Usage: "verification time, RFC 3339 (default: now)"},
				&cli.BoolFlag{Name: "collateral", Usage: "also check TCB status and revocation with Intel PCS collateral (ONLINE)"},
				&cli.BoolFlag{Name: "allow-sample", Usage: "accept UNSIGNED sample TEE evidence (development only)"},
				&cli.BoolFlag{Name: "json", Usage: `print {"verified":…,…} as JSON`},
			},
			Action: verifyAction,
		},
	}
}

// verifyExitCodes: a bad policy file is the operator's mistake (2); anything wrong with the
// evidence — including input that is not a quote, log or bundle at all — is a failed
// verification (10).
var verifyExitCodes = []exitMapping{
	{verify.ErrBadPolicy, ExitUsage},
	{verify.ErrSample, ExitVerify},
	{verify.ErrSignature, ExitVerify},
	{verify.ErrBinding, ExitVerify},
	{verify.ErrReplay, ExitVerify},
	{verify.ErrPolicy, ExitVerify},
	{verify.ErrFormat, ExitVerify},
}

// maxVerifyInput bounds quote, event log and evidence files.
const maxVerifyInput = 128 << 20

func readVerifyInput(c *cli.Context, path, what string) ([]byte, error) {
	var r io.Reader
	if path == "-" {
		r = c.App.Reader
	} else {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, maxVerifyInput+1))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", what, path, err)
	}
	if len(b) > maxVerifyInput {
		return nil, fmt.Errorf("%w: %s %s is larger than %d bytes", verify.ErrFormat, what, path, maxVerifyInput)
	}
	return b, nil
}

func quoteInspectAction(c *cli.Context) error {
	args, err := positionalArgs(c)
	if err != nil {
		return err
	}
	if len(args) != 1 {
		return usagef("quote inspect: give exactly one quote FILE")
	}
	path := args[0]
	b, err := readVerifyInput(c, path, "quote")
	if err != nil {
		return err
	}
	raw := verify.DecodeQuote(b)
	var q *verify.Quote
	if s, serr := evidence.ParseSampleQuote(raw); serr == nil {
		q, err = sampleAsQuote(s)
		if err != nil {
			return err
		}
		fmt.Fprintf(c.App.ErrWriter, "cai-agent: %s is a sample TEE quote: UNSIGNED, it proves nothing\n", path)
	} else if q, err = verify.ParseQuote(raw); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if c.Bool("json") {
		return verifyWriteJSON(c.App.Writer, q)
	}
	return writeQuoteText(c.App.Writer, q)
}

func sampleAsQuote(s *evidence.SampleQuote) (*verify.Quote, error) {
	rd, err := s.ReportDataBytes()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", verify.ErrFormat, err)
	}
	rt, err := s.RTMRs()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", verify.ErrFormat, err)
	}
	return &verify.Quote{ReportData: rd[:], RTMR0: rt[0][:], RTMR1: rt[1][:], RTMR2: rt[2][:], RTMR3: rt[3][:]}, nil
}

// writeQuoteText prints the quote's fields, one per line, names aligned, in the order of the
// JSON form.
func writeQuoteText(w io.Writer, q *verify.Quote) error {
	flat := *q
	flat.PCK = nil
	b, err := json.Marshal(&flat)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if _, err := dec.Token(); err != nil { // {
		return err
	}
	for dec.More() {
		k, err := dec.Token()
		if err != nil {
			return err
		}
		v, err := dec.Token()
		if err != nil {
			return err
		}
		fmt.Fprintf(tw, "%s\t%v\n", k, v)
	}
	if p := q.PCK; p != nil {
		fmt.Fprintf(tw, "pck_fmspc\t%s\n", p.FMSPC)
		fmt.Fprintf(tw, "pck_issuer\t%s\n", p.Issuer)
		fmt.Fprintf(tw, "pck_not_before\t%s\n", p.NotBefore.Format(time.RFC3339))
		fmt.Fprintf(tw, "pck_not_after\t%s\n", p.NotAfter.Format(time.RFC3339))
	}
	return tw.Flush()
}

func verifyWriteJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

func verifyAction(c *cli.Context) error {
	if c.Args().Present() {
		return usagef("verify: unexpected argument %q", c.Args().First())
	}
	quotePath, evPath := c.String("quote"), c.String("evidence")
	switch {
	case (quotePath == "") == (evPath == ""):
		return usagef("verify: give exactly one of --quote FILE and --evidence FILE")
	case evPath != "" && !c.IsSet("nonce"):
		return usagef("verify: --evidence needs --nonce STRING (the nonce you sent)")
	case evPath != "" && c.String("nonce") == "":
		return usagef("verify: --nonce must not be empty")
	case evPath != "" && c.IsSet("eventlog"):
		return usagef("verify: --eventlog is for --quote; evidence carries its cc_eventlog")
	case quotePath != "" && c.IsSet("nonce"):
		return usagef("verify: --nonce is for --evidence (for a raw quote, pin report_data in a --policy)")
	}
	opts := verify.Options{Collateral: c.Bool("collateral"), AllowSample: c.Bool("allow-sample")}
	if at := c.String("at"); at != "" {
		t, err := time.Parse(time.RFC3339, at)
		if err != nil {
			return usagef("verify: --at: %v", err)
		}
		opts.Now = t
	}
	var policy *verify.Policy
	if path := c.String("policy"); path != "" {
		p, err := verify.LoadPolicy(path)
		if err != nil {
			return err
		}
		policy = p
	}
	res, err := runVerify(c, quotePath, evPath, policy, opts)
	if err != nil {
		if c.Bool("json") {
			_ = verifyWriteJSON(c.App.Writer, map[string]any{"verified": false, "error": err.Error()})
		}
		return err
	}
	if res.Unsigned {
		fmt.Fprintln(c.App.ErrWriter, "cai-agent: WARNING: UNSIGNED sample TEE evidence (accepted because of --allow-sample); it proves nothing")
	}
	if c.Bool("json") {
		return verifyWriteJSON(c.App.Writer, struct {
			Verified bool `json:"verified"`
			*verify.Result
		}{true, res})
	}
	return writeResultText(c.App.Writer, res)
}

func runVerify(c *cli.Context, quotePath, evPath string, policy *verify.Policy, opts verify.Options) (*verify.Result, error) {
	if quotePath != "" {
		b, err := readVerifyInput(c, quotePath, "quote")
		if err != nil {
			return nil, err
		}
		var log []byte
		if path := c.String("eventlog"); path != "" {
			if log, err = readVerifyInput(c, path, "event log"); err != nil {
				return nil, err
			}
			if log == nil {
				log = []byte{}
			}
		}
		return verify.Verify(c.Context, verify.DecodeQuote(b), log, policy, opts)
	}
	b, err := readVerifyInput(c, evPath, "evidence")
	if err != nil {
		return nil, err
	}
	bundle, err := verify.ParseBundle(b)
	if err != nil {
		return nil, fmt.Errorf("evidence %s: %w", evPath, err)
	}
	return verify.VerifyEvidence(c.Context, bundle, c.String("nonce"), policy, opts)
}

func writeResultText(w io.Writer, r *verify.Result) error {
	what := "TD quote"
	if r.Unsigned {
		what = "UNSIGNED sample evidence"
	}
	fmt.Fprintf(w, "verified: %s (tee %s)\n", what, r.TEE)
	for _, ch := range r.Checks {
		fmt.Fprintf(w, "  ok  %s\n", ch)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	q := r.Quote
	if len(q.MRTD) > 0 {
		fmt.Fprintf(tw, "mr_td\t%s\n", q.MRTD)
		fmt.Fprintf(tw, "tee_tcb_svn\t%s\n", q.TEETCBSVN)
		fmt.Fprintf(tw, "debug\t%v\n", q.Debug)
	}
	for i, v := range []verify.Hex{q.RTMR0, q.RTMR1, q.RTMR2, q.RTMR3} {
		fmt.Fprintf(tw, "rtmr%d\t%s\n", i, v)
	}
	fmt.Fprintf(tw, "report_data\t%s\n", q.ReportData)
	if r.Model != nil {
		fmt.Fprintf(tw, "model\t%s (manifest sha256 %s)\n", r.Model.Name, r.Model.ManifestSHA256)
	} else if r.Replay != nil {
		fmt.Fprintf(tw, "model\tnone measured\n")
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if r.Replay != nil {
		fmt.Fprintf(w, "measurements (RTMR3, %d):\n", len(r.Measurements))
		for _, m := range r.Measurements {
			fmt.Fprintf(w, "  %s…  %s\n", m.Digest[:16], truncateText(m.Text(), 160))
		}
	}
	return nil
}

func truncateText(s string, n int) string {
	s = strings.ToValidUTF8(s, "?")
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
