package verify

import (
	"context"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/cai-agent/cai-agent/evidence"
)

// Result describes evidence that passed every check.
type Result struct {
	// TEE is "tdx" or "sample".
	TEE string `json:"tee"`
	// Unsigned is true for sample evidence: nothing in it is signed or hardware-backed.
	Unsigned bool `json:"unsigned"`
	// Quote is the decoded quote (for the sample TEE only rtmr0..3 and report_data are set).
	Quote *Quote `json:"quote"`
	// Checks names every check that passed, in the order they ran.
	Checks []string `json:"checks"`
	// Replay is the replayed event log; nil when no log was checked.
	Replay *Replay `json:"replay"`
	// Measurements and Model are the RTMR3 events and model recomputed from the replayed log
	// (never taken from a bundle's own fields); empty/nil without a log.
	Measurements []evidence.Measurement `json:"measurements"`
	Model        *evidence.ModelInfo    `json:"model"`
}

func (r *Result) pass(format string, a ...any) {
	r.Checks = append(r.Checks, fmt.Sprintf(format, a...))
}

// Verify checks a raw quote: its signature chain (VerifyQuote; for a sample quote, ErrSample
// unless opts.AllowSample), then — when eventLog is non-nil — ReplayLog against its RTMRs,
// then policy (nil: only the debug bit is checked). This is `cai-agent verify --quote`.
func Verify(ctx context.Context, quote, eventLog []byte, policy *Policy, opts Options) (*Result, error) {
	res, err := verifyQuoteOrSample(ctx, quote, "", opts)
	if err != nil {
		return nil, err
	}
	if eventLog != nil {
		if err := res.replay(eventLog, policy); err != nil {
			return nil, err
		}
	}
	if err := res.policy(policy); err != nil {
		return nil, err
	}
	return res, nil
}

// VerifyEvidence checks an evidence bundle as `cai-agent serve` returns it, for the nonce the
// relying party sent, in this order; the first failure is returned:
//
//  1. the quote: a TD quote whose signature chain verifies offline at opts.Now (ErrSignature,
//     ErrFormat), or sample evidence only if opts.AllowSample (ErrSample otherwise);
//  2. the binding: REPORTDATA == evidence.NonceReportData(nonce, b.CCEventLog), and
//     b.ReportData (if present) says the same (ErrBinding) — so a quote made for another
//     nonce (a replay) or a cc_eventlog swapped after the quote fails;
//  3. the replay: b.CCEventLog replays to the quote's RTMRs as ReplayLog describes (ErrReplay);
//  4. consistency: b.Measurements and b.Model, if present, equal what the log says
//     (ErrReplay): they are never trusted, only recomputed;
//  5. the policy (ErrPolicy with a *PolicyError); a nil policy checks only the debug bit.
func VerifyEvidence(ctx context.Context, b *evidence.Bundle, nonce string, policy *Policy, opts Options) (*Result, error) {
	if b == nil {
		return nil, fmt.Errorf("%w: no evidence bundle", ErrFormat)
	}
	if nonce == "" {
		return nil, fmt.Errorf("%w: empty nonce (a nonce is what makes evidence fresh)", ErrBinding)
	}
	res, err := verifyQuoteOrSample(ctx, b.Quote, b.TEE, opts)
	if err != nil {
		return nil, err
	}
	want, err := evidence.NonceReportData(nonce, b.CCEventLog)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBinding, err)
	}
	if subtle.ConstantTimeCompare(want[:], res.Quote.ReportData) != 1 {
		return nil, fmt.Errorf("%w: the quote's REPORTDATA %x is not NonceReportData(nonce, cc_eventlog) %x: a different nonce, a replayed quote, or a cc_eventlog that is not the one quoted",
			ErrBinding, []byte(res.Quote.ReportData), want[:])
	}
	if b.ReportData != "" && !strings.EqualFold(b.ReportData, hex.EncodeToString(want[:])) {
		return nil, fmt.Errorf("%w: the bundle's report_data field does not match its quote", ErrBinding)
	}
	res.pass("report_data binds the nonce and the cc_eventlog (sha384 of canonical JSON, purpose %s)", evidence.NoncePurpose)
	if err := res.replay(b.CCEventLog, policy); err != nil {
		return nil, err
	}
	if b.Measurements != nil && !sameMeasurements(b.Measurements, res.Measurements) {
		return nil, fmt.Errorf("%w: the bundle's measurements do not match its cc_eventlog", ErrReplay)
	}
	if b.Model != nil && (res.Model == nil || *b.Model != *res.Model) {
		return nil, fmt.Errorf("%w: the bundle's model does not match the last model event of its cc_eventlog", ErrReplay)
	}
	if b.Measurements != nil || b.Model != nil {
		res.pass("the bundle's measurements and model match its cc_eventlog")
	}
	if err := res.policy(policy); err != nil {
		return nil, err
	}
	return res, nil
}

func sameMeasurements(a, b []evidence.Measurement) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Event != b[i].Event || !strings.EqualFold(a[i].Digest, b[i].Digest) {
			return false
		}
	}
	return true
}

// verifyQuoteOrSample verifies a TD quote or (if allowed) parses a sample quote. tee is the
// bundle's tee field ("" when unknown: decided by the quote's form).
func verifyQuoteOrSample(ctx context.Context, raw []byte, tee string, opts Options) (*Result, error) {
	if len(raw) == 0 {
		return nil, fmt.Errorf("%w: empty quote", ErrFormat)
	}
	sample := tee == evidence.TEESample || (tee == "" && len(raw) > 0 && raw[0] == '{')
	switch {
	case tee != "" && tee != evidence.TEETDX && tee != evidence.TEESample:
		return nil, fmt.Errorf("%w: unsupported tee %q (want %q or %q)", ErrFormat, tee, evidence.TEETDX, evidence.TEESample)
	case sample:
		s, err := evidence.ParseSampleQuote(raw)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrFormat, err)
		}
		if !opts.AllowSample {
			return nil, fmt.Errorf("%w: the quote is from the sample TEE (%s); allow sample evidence explicitly to check it anyway", ErrSample, evidence.SampleWarning)
		}
		rd, _ := s.ReportDataBytes()
		rt, _ := s.RTMRs()
		q := &Quote{ReportData: Hex(rd[:]), RTMR0: Hex(rt[0][:]), RTMR1: Hex(rt[1][:]), RTMR2: Hex(rt[2][:]), RTMR3: Hex(rt[3][:])}
		res := &Result{TEE: evidence.TEESample, Unsigned: true, Quote: q}
		res.pass("UNSIGNED sample quote accepted because sample evidence was allowed (no signature was checked)")
		return res, nil
	}
	q, err := VerifyQuote(ctx, raw, opts)
	if err != nil {
		return nil, err
	}
	res := &Result{TEE: evidence.TEETDX, Quote: q}
	if opts.signature != nil {
		res.pass("signature check replaced (test hook)")
	} else {
		how := "offline"
		if opts.Collateral {
			how = "with Intel PCS collateral (TCB status, revocation)"
		}
		res.pass("TD quote v%d signature, QE report and PCK chain to the Intel SGX Root CA verify %s at %s", q.Version, how, opts.now().UTC().Format("2006-01-02T15:04:05Z"))
	}
	return res, nil
}

func (res *Result) replay(log []byte, policy *Policy) error {
	requireBoot := policy != nil && policy.RequireBootLog
	r, err := ReplayLog(log, res.Quote.RTMRs(), requireBoot)
	if err != nil {
		return err
	}
	res.Replay, res.Measurements, res.Model = r, r.Measurements, r.Model
	names := make([]string, len(r.Compared))
	for i, c := range r.Compared {
		names[i] = fmt.Sprintf("RTMR%d", c)
	}
	res.pass("event log replays to the quote's %s (%d RTMR3 events)", strings.Join(names, ", "), len(r.Measurements))
	return nil
}

func (res *Result) policy(p *Policy) error {
	if err := p.Check(res.Quote, res.Replay); err != nil {
		return err
	}
	if p == nil {
		res.pass("TD is not debuggable (no policy given)")
	} else {
		res.pass("policy accepts the evidence")
	}
	return nil
}

// ParseBundle decodes the JSON of an evidence bundle (GET /v1/evidence, or the output of
// `cai-agent evidence --json`), requiring "tee" and "quote". Fields it does not know are
// ignored; none of the bundle is trusted before VerifyEvidence. Errors wrap ErrFormat.
func ParseBundle(b []byte) (*evidence.Bundle, error) {
	var bundle evidence.Bundle
	if err := json.Unmarshal(b, &bundle); err != nil {
		return nil, fmt.Errorf("%w: not an evidence bundle: %v", ErrFormat, err)
	}
	if bundle.TEE == "" || len(bundle.Quote) == 0 {
		return nil, fmt.Errorf("%w: evidence bundle has no \"tee\" or no \"quote\"", ErrFormat)
	}
	return &bundle, nil
}
