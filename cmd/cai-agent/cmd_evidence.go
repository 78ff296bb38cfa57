package main

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/cai-agent/cai-agent/agent"
	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
	"github.com/cai-agent/cai-agent/evidence/verify"
)

// evidenceCommands returns the CLI commands of this area: evidence, measure, eventlog.
func evidenceCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:      "evidence",
			Usage:     "get TEE evidence (a quote and the cc_eventlog) for REPORTDATA or a nonce",
			UsageText: "cai-agent evidence (--report-data HEX | --nonce STRING) [--out FILE] [--eventlog-out FILE] [--json]",
			Description: "With --report-data the quote's REPORTDATA is the given bytes (at most 64, zero-padded).\n" +
				"With --nonce it is evidence.NonceReportData(nonce, cc_eventlog): SHA-384 of the canonical JSON\n" +
				`{"event_log_sha384":hex(SHA-384(cc_eventlog)),"nonce":NONCE,"purpose":"cai-agent/evidence/v1"}` + "\n" +
				"followed by 16 zero bytes — the binding `serve` uses and `verify --nonce` checks.",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "report-data", Usage: "REPORTDATA as hex (at most 64 bytes; zero-padded)"},
				&cli.StringFlag{Name: "nonce", Usage: "bind this nonce and the cc_eventlog into REPORTDATA"},
				&cli.StringFlag{Name: "out", Usage: "write the raw quote to `FILE`"},
				&cli.StringFlag{Name: "eventlog-out", Usage: "write the cc_eventlog to `FILE` (nothing is written when there is none)"},
				&cli.BoolFlag{Name: "json", Usage: `print {"tee":…,"quote":<std b64>,"cc_eventlog":<std b64 or null>}`},
			},
			Action: evidenceAction,
		},
		{
			Name:  "measure",
			Usage: "extend RTMR3 with events, recording each in the event log first",
			UsageText: "cai-agent measure --domain D --operation O --content C [--json]\n" +
				"cai-agent measure --file PATH [--file PATH…] [PATH…] [--json]",
			Description: "An event is the text \"domain operation content\"; RTMR3 is extended with SHA-384 of its AAEL\n" +
				"tagged form. JSON content is stored in RFC 8785 canonical form. --file measures each file as\n" +
				`domain github.com/cai-agent, operation Binary, content {"path":<absolute path>,"sha384":<hex>};` + "\n" +
				"that domain is reserved: --domain cannot name it.",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "domain", Usage: "event domain (no whitespace)"},
				&cli.StringFlag{Name: "operation", Usage: "event operation (no whitespace)"},
				&cli.StringFlag{Name: "content", Usage: "event content (no newline; JSON is canonicalized)"},
				&cli.StringSliceFlag{Name: "file", Usage: "measure this file (repeatable; further arguments are files too)"},
				&cli.BoolFlag{Name: "json", Usage: "print the events measured as a JSON array"},
			},
			Action: measureAction,
		},
		{
			Name:  "eventlog",
			Usage: "show or replay an event log (default: the agent's own, in --state-dir)",
			Subcommands: []*cli.Command{
				{
					Name:      "show",
					Usage:     "list the events of an event log",
					UsageText: "cai-agent eventlog show [--eventlog FILE] [--json]",
					Flags: []cli.Flag{
						&cli.StringFlag{Name: "eventlog", Usage: "a CCEL / cc_eventlog / agent log `FILE` (default: the agent's own records)"},
						&cli.BoolFlag{Name: "json", Usage: "print a JSON array of events"},
					},
					Action: eventlogShowAction,
				},
				{
					Name:      "replay",
					Usage:     "replay an event log into RTMR0..3 and compare with a quote",
					UsageText: "cai-agent eventlog replay [--eventlog FILE] [--quote FILE] [--json]",
					Description: "Without --eventlog the agent's cc_eventlog (firmware CCEL, if any, and its own records) is\n" +
						"replayed and, without --quote, compared with the current RTMRs (simulated ones for --tee sample).\n" +
						"All four RTMRs are compared, except for a log with no RTMR0..2 events (an agent-only log):\n" +
						"then only RTMR3. Exit status 10 when they differ.",
					Flags: []cli.Flag{
						&cli.StringFlag{Name: "eventlog", Usage: "event log `FILE` to replay"},
						&cli.StringFlag{Name: "quote", Usage: "raw TD quote (or sample quote) `FILE` to compare with"},
						&cli.BoolFlag{Name: "json", Usage: `print {"rtmr":[hex×4],"matches_quote":true|false|null,"compared":[…]}`},
					},
					Action: eventlogReplayAction,
				},
			},
		},
	}
}

var evidenceExitCodes = []exitMapping{
	{eventlog.ErrMismatch, ExitVerify},
	{evidence.ErrInconsistent, ExitMeasure},
	{evidence.ErrMeasure, ExitMeasure},
	{evidence.ErrEventLog, ExitMeasure},
	{evidence.ErrNoTEE, ExitEvidence},
	{evidence.ErrQuote, ExitEvidence},
	{eventlog.ErrMalformed, ExitVerify},
	{eventlog.ErrDigestMismatch, ExitVerify},
	{eventlog.ErrNoDigest, ExitVerify},
}

// maxInputLog bounds event log and quote files read by these commands.
const maxInputLog = 64 << 20

// platformHook, set only by tests, adjusts the evidence options of every command (it points
// --tee tdx at go-configfs-tsm's faketsm, a fake kernel and a fake firmware root).
var platformHook func(*evidence.Options)

// openPlatform opens the evidence runtime chosen by the global --tee and --state-dir.
func openPlatform(c *cli.Context) (*evidence.Platform, error) {
	o := evidence.Options{TEE: c.String("tee"), StateDir: c.String("state-dir")}
	if platformHook != nil {
		platformHook(&o)
	}
	return evidence.Open(c.Context, o)
}

func noArgs(c *cli.Context) error {
	args, err := positionalArgs(c)
	if err != nil {
		return err
	}
	if len(args) > 0 {
		return usagef("%s: unexpected argument %q", cmdName(c), args[0])
	}
	return nil
}

func evidenceAction(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	rdHex, nonce := c.String("report-data"), c.String("nonce")
	if c.IsSet("report-data") == c.IsSet("nonce") {
		return usagef("evidence: give exactly one of --report-data and --nonce")
	}
	if c.IsSet("nonce") && nonce == "" {
		return usagef("evidence: --nonce must not be empty (verify --nonce and serve refuse an empty nonce)")
	}
	if c.String("out") == "" && !c.Bool("json") {
		return usagef("evidence: give --out FILE and/or --json")
	}
	var rd [64]byte
	if c.IsSet("report-data") {
		b, err := hex.DecodeString(strings.TrimPrefix(rdHex, "0x"))
		if err != nil || len(b) > 64 {
			return usagef("evidence: --report-data must be at most 64 bytes of hex")
		}
		copy(rd[:], b)
	}
	p, err := openPlatform(c)
	if err != nil {
		return err
	}
	defer p.Close()
	var ev *evidence.Evidence
	if c.IsSet("nonce") {
		ev, err = p.AttestNonce(c.Context, nonce)
	} else {
		ev, err = p.Attest(c.Context, rd)
	}
	if err != nil {
		return err
	}
	if out := c.String("out"); out != "" {
		if err := writeFileAtomic(out, ev.Quote, 0o644); err != nil {
			return fmt.Errorf("write quote: %w", err)
		}
	}
	if out := c.String("eventlog-out"); out != "" && ev.CCEventLog != nil {
		if err := writeFileAtomic(out, ev.CCEventLog, 0o644); err != nil {
			return fmt.Errorf("write cc_eventlog: %w", err)
		}
	}
	if c.Bool("json") {
		return writeJSON(c.App.Writer, ev)
	}
	return nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

func measureAction(c *cli.Context) error {
	args, err := positionalArgs(c)
	if err != nil {
		return err
	}
	files := c.StringSlice("file")
	if len(files) > 0 {
		files = append(files, args...)
	} else if len(args) > 0 {
		return usagef("%s: unexpected argument %q", cmdName(c), args[0])
	}
	single := c.IsSet("domain") || c.IsSet("operation") || c.IsSet("content")
	var events []evidence.Event
	switch {
	case single && len(files) > 0:
		return usagef("measure: use either --domain/--operation/--content or --file, not both")
	case single:
		if !c.IsSet("domain") || !c.IsSet("operation") || !c.IsSet("content") {
			return usagef("measure: --domain, --operation and --content are all required")
		}
		if c.String("domain") == evidence.Domain {
			return usagef("measure: domain %q is reserved for cai-agent's own events (measure a binary with --file PATH)", evidence.Domain)
		}
		content := c.String("content")
		if json.Valid([]byte(content)) {
			canon, err := evidence.CanonicalJSON(json.RawMessage(content))
			if err != nil {
				return usagef("measure: --content: %v", err)
			}
			content = string(canon)
		}
		ev := evidence.Event{Domain: c.String("domain"), Operation: c.String("operation"), Content: content}
		if err := ev.Validate(); err != nil {
			return usageError{err}
		}
		events = append(events, ev)
	case len(files) > 0:
		// Hash every file before measuring anything: an unreadable file measures nothing.
		for _, f := range files {
			ev, err := binaryEvent(f)
			if err != nil {
				return err
			}
			events = append(events, ev)
		}
	default:
		return usagef("measure: give --domain, --operation and --content, or --file PATH")
	}
	p, err := openPlatform(c)
	if err != nil {
		return err
	}
	defer p.Close()
	done := []evidence.Measurement{}
	for _, ev := range events {
		d, err := p.Measure(c.Context, ev)
		if err != nil {
			return err
		}
		done = append(done, evidence.Measurement{Event: ev, Digest: hex.EncodeToString(d)})
		if !c.Bool("json") {
			fmt.Fprintf(c.App.Writer, "%x  %s\n", d, ev.Text())
		}
	}
	if c.Bool("json") {
		return writeJSON(c.App.Writer, done)
	}
	return nil
}

// binaryEvent is agent.BinaryEvent (SHA-384 of a regular file) with an event the agent would
// refuse to log reported as a usage error.
func binaryEvent(path string) (evidence.Event, error) {
	ev, err := agent.BinaryEvent(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return evidence.Event{}, usagef("measure %s: no such file", path)
	case errors.Is(err, agent.ErrConfig):
		return evidence.Event{}, usagef("measure %s: not a regular file", path)
	case err != nil:
		return evidence.Event{}, err
	}
	if err := ev.Validate(); err != nil {
		return evidence.Event{}, usageError{fmt.Errorf("measure %s: %w", path, err)}
	}
	return ev, nil
}

func readInput(path, what string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxInputLog+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if len(b) > maxInputLog {
		return nil, fmt.Errorf("%s %s: larger than %d bytes", what, path, maxInputLog)
	}
	return b, nil
}

// shownEvent is one element of `eventlog show --json`.
type shownEvent struct {
	Index     int     `json:"index"`
	MRIndex   uint32  `json:"mr_index"`
	RTMR      *int    `json:"rtmr"`
	Type      uint32  `json:"type"`
	TypeName  string  `json:"type_name"`
	Digest    string  `json:"digest"`
	Domain    *string `json:"domain,omitempty"`
	Operation *string `json:"operation,omitempty"`
	Content   *string `json:"content,omitempty"`
	Event     string  `json:"event,omitempty"`
}

func eventlogShowAction(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	var raw []byte
	var err error
	if path := c.String("eventlog"); path != "" {
		raw, err = readInput(path, "event log")
	} else {
		var p *evidence.Platform
		if p, err = openPlatform(c); err != nil {
			return err
		}
		defer p.Close()
		raw, err = p.EventLog()
	}
	if err != nil {
		return err
	}
	recs, err := eventlog.Parse(raw)
	if err != nil {
		return err
	}
	out := make([]shownEvent, 0, len(recs))
	for i, r := range recs {
		e := shownEvent{Index: i, MRIndex: r.MRIndex, Type: r.Type, TypeName: typeName(r.Type), Digest: hex.EncodeToString(r.SHA384())}
		if r.MRIndex >= 1 && r.MRIndex <= 4 {
			n := int(r.MRIndex) - 1
			e.RTMR = &n
		}
		if r.AAEL != nil {
			e.Domain, e.Operation, e.Content = &r.AAEL.Domain, &r.AAEL.Operation, &r.AAEL.Content
		} else {
			e.Event = base64.StdEncoding.EncodeToString(r.Data)
		}
		out = append(out, e)
	}
	if c.Bool("json") {
		return writeJSON(c.App.Writer, out)
	}
	w := c.App.Writer
	for _, e := range out {
		desc := fmt.Sprintf("(%d bytes)", len(recs[e.Index].Data))
		if e.Domain != nil {
			desc = *e.Domain + " " + *e.Operation + " " + *e.Content
		}
		rt := "MRTD"
		if e.RTMR != nil {
			rt = fmt.Sprintf("RTMR%d", *e.RTMR)
		}
		fmt.Fprintf(w, "%4d  %-5s  %-32s  %s  %s\n", e.Index, rt, e.TypeName, shortHex(e.Digest), desc)
	}
	return nil
}

func shortHex(h string) string {
	if len(h) > 16 {
		return h[:16] + "…"
	}
	if h == "" {
		return "-"
	}
	return h
}

type replayResult struct {
	RTMR         [4]string `json:"rtmr"`
	MatchesQuote *bool     `json:"matches_quote"`
	Compared     []int     `json:"compared"`
}

func eventlogReplayAction(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	var raw []byte
	var want *[4][48]byte
	var p *evidence.Platform
	var err error
	if path := c.String("eventlog"); path != "" {
		if raw, err = readInput(path, "event log"); err != nil {
			return err
		}
	} else {
		if p, err = openPlatform(c); err != nil {
			return err
		}
		defer p.Close()
		if raw, err = p.CCEventLog(); err != nil {
			return err
		}
	}
	if path := c.String("quote"); path != "" {
		q, err := readInput(path, "quote")
		if err != nil {
			return err
		}
		v, err := evidence.QuoteRTMRs(q)
		if err != nil {
			return fmt.Errorf("%w: quote %s is not a TD quote: %w", verify.ErrFormat, path, err)
		}
		want = &v
	} else if p != nil {
		cur, err := p.RTMRs()
		if err != nil {
			return err
		}
		var v [4][48]byte
		for i := range v {
			copy(v[i][:], cur[i])
		}
		want = &v
	}
	recs, err := eventlog.Parse(raw)
	if err != nil {
		return err
	}
	mr, err := eventlog.Replay(recs)
	if err != nil {
		return err
	}
	res := replayResult{Compared: []int{}}
	for i := range mr {
		res.RTMR[i] = hex.EncodeToString(mr[i][:])
	}
	var mismatch error
	if want != nil {
		res.Compared = []int{0, 1, 2, 3}
		if !eventlog.CoversBoot(recs) {
			res.Compared = []int{3}
		}
		mismatch = eventlog.Match(mr, *want, res.Compared...)
		ok := mismatch == nil
		res.MatchesQuote = &ok
	}
	if c.Bool("json") {
		if err := writeJSON(c.App.Writer, res); err != nil {
			return err
		}
	} else {
		for i, h := range res.RTMR {
			fmt.Fprintf(c.App.Writer, "RTMR%d  %s\n", i, h)
		}
		if res.MatchesQuote != nil && *res.MatchesQuote {
			names := make([]string, len(res.Compared))
			for i, n := range res.Compared {
				names[i] = fmt.Sprintf("RTMR%d", n)
			}
			fmt.Fprintf(c.App.Writer, "replay matches %s\n", strings.Join(names, ", "))
		}
	}
	return mismatch
}

// typeName names TCG event types (PC Client PFP table 9).
func typeName(t uint32) string {
	names := map[uint32]string{
		0x0: "EV_PREBOOT_CERT", 0x1: "EV_POST_CODE", 0x3: "EV_NO_ACTION", 0x4: "EV_SEPARATOR",
		0x5: "EV_ACTION", 0x6: "EV_EVENT_TAG", 0x7: "EV_S_CRTM_CONTENTS", 0x8: "EV_S_CRTM_VERSION",
		0x9: "EV_CPU_MICROCODE", 0xA: "EV_PLATFORM_CONFIG_FLAGS", 0xB: "EV_TABLE_OF_DEVICES",
		0xC: "EV_COMPACT_HASH", 0xD: "EV_IPL", 0xE: "EV_IPL_PARTITION_DATA", 0xF: "EV_NONHOST_CODE",
		0x10: "EV_NONHOST_CONFIG", 0x11: "EV_NONHOST_INFO", 0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
		0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG", 0x80000002: "EV_EFI_VARIABLE_BOOT",
		0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION", 0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
		0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER", 0x80000006: "EV_EFI_GPT_EVENT",
		0x80000007: "EV_EFI_ACTION", 0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
		0x80000009: "EV_EFI_HANDOFF_TABLES", 0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
		0x8000000B: "EV_EFI_HANDOFF_TABLES2", 0x8000000C: "EV_EFI_VARIABLE_BOOT2",
		0x80000010: "EV_EFI_HCRTM_EVENT", 0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
		0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB", 0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
	}
	if n, ok := names[t]; ok {
		return n
	}
	return fmt.Sprintf("0x%08x", t)
}
