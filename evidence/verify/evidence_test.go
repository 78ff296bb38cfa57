package verify

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tdx-guest/abi"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
)

// The signature of a quote cannot be redone, so to test binding, replay and policy on TDX
// evidence whose REPORTDATA and RTMR3 we choose, tests patch those fields of the real
// cos-113 quote and replace the signature step with patchedSignature: it restores the
// original bytes of the fields the test was allowed to patch and runs the REAL verification
// on the result — so any other change (or a different base quote) still fails. The real,
// unreplaced signature check is tested on the unpatched fixtures in quote_test.go, and
// TestTDXBundle checks that it rejects the patched quote.
const (
	cosQuote        = "cos-113-tdx-quote.dat"
	cosCCEL         = "cos-113-ccel_data.dat"
	cosBody         = 48
	offTDAttributes = cosBody + 120
	offRTMR3        = cosBody + 472
	offReportData   = cosBody + 520
)

var cosAt = date(2025, 1, 1)

func patchedSignature(t testing.TB, original []byte) Options {
	return Options{Now: cosAt, signature: func(ctx context.Context, p any, o Options) error {
		raw, err := abi.QuoteToAbiBytes(p)
		if err != nil {
			return err
		}
		raw = append([]byte{}, raw...)
		for _, f := range [][2]int{{offTDAttributes, 8}, {offRTMR3, 48}, {offReportData, 64}} {
			copy(raw[f[0]:f[0]+f[1]], original[f[0]:f[0]+f[1]])
		}
		o.signature = nil
		_, err = VerifyQuote(ctx, raw, o)
		return err
	}}
}

type tdxEvidence struct {
	quoteEvents []evidence.Event // folded into the quote's RTMR3
	logEvents   []evidence.Event // appended to the CCEL in cc_eventlog
	debug       bool
}

// bundle builds a TDX evidence bundle for nonce as `serve` would: cc_eventlog = trimmed
// cos-113 CCEL ‖ AAEL records ‖ 8×0xFF, REPORTDATA = NonceReportData(nonce, cc_eventlog).
func (e tdxEvidence) bundle(t testing.TB, nonce string) *evidence.Bundle {
	t.Helper()
	raw := append([]byte{}, fixture(t, cosQuote)...)
	ccel, err := eventlog.Trim(fixture(t, cosCCEL))
	require.NoError(t, err)
	cc := append([]byte{}, ccel...)
	for _, ev := range e.logEvents {
		cc = append(cc, eventlog.EncodeAAEL(ev)...)
	}
	cc = append(cc, bytes.Repeat([]byte{0xff}, 8)...)
	var r3 [48]byte
	for _, ev := range e.quoteEvents {
		r3 = extend(r3, evidence.AAELDigest(ev))
	}
	copy(raw[offRTMR3:], r3[:])
	rd, err := evidence.NonceReportData(nonce, cc)
	require.NoError(t, err)
	copy(raw[offReportData:], rd[:])
	if e.debug {
		raw[offTDAttributes] |= TDAttrDebug
	}
	recs, err := eventlog.Parse(cc)
	require.NoError(t, err)
	ms, model := eventlog.Measurements(recs)
	return &evidence.Bundle{TEE: evidence.TEETDX, Quote: raw, CCEventLog: cc, ReportData: hex.EncodeToString(rd[:]), Measurements: ms, Model: model}
}

var (
	ollamaSHA   = sha(0x11)
	manifestSHA = bytes.Repeat([]byte{0x22}, 32)
)

func events(t testing.TB) (bin, model, other evidence.Event) {
	bin, err := evidence.BinaryEvent("/usr/bin/ollama", ollamaSHA)
	require.NoError(t, err)
	model, err = evidence.ModelEvent("llama3.1:8b", manifestSHA)
	require.NoError(t, err)
	other, err = evidence.ModelEvent("llama3.1:70b", manifestSHA)
	require.NoError(t, err)
	return bin, model, other
}

func ollamaPolicy(t testing.TB) *Policy {
	q, err := ParseQuote(fixture(t, cosQuote))
	require.NoError(t, err)
	return policyOf(t, `{"mr_td":"`+q.MRTD.String()+`","min_tee_tcb_svn":"04010700000000000000000000000000","require_boot_log":true,
		"allowed_binaries":[{"path":"/usr/bin/ollama","sha384":"`+hex.EncodeToString(ollamaSHA)+`"}],
		"model":{"name":"llama3.1:8b","manifest_sha256":"`+hex.EncodeToString(manifestSHA)+`"},"only_known_events":true}`)
}

func TestTDXBundle(t *testing.T) {
	ctx := context.Background()
	bin, model, otherModel := events(t)
	good := tdxEvidence{quoteEvents: []evidence.Event{bin, model}, logEvents: []evidence.Event{bin, model}}
	opts := patchedSignature(t, fixture(t, cosQuote))
	pol := ollamaPolicy(t)

	b := good.bundle(t, "nonce-A")
	res, err := VerifyEvidence(ctx, b, "nonce-A", pol, opts)
	require.NoError(t, err)
	assert.Equal(t, evidence.TEETDX, res.TEE)
	assert.False(t, res.Unsigned)
	require.NotNil(t, res.Model)
	assert.Equal(t, "llama3.1:8b", res.Model.Name)
	require.Len(t, res.Measurements, 2)
	assert.Equal(t, []int{0, 1, 2, 3}, res.Replay.Compared)
	assert.Len(t, res.Checks, 5, "%q", res.Checks)

	// The JSON wire form (as served) verifies the same.
	js, err := json.Marshal(b)
	require.NoError(t, err)
	var b2 evidence.Bundle
	require.NoError(t, json.Unmarshal(js, &b2))
	_, err = VerifyEvidence(ctx, &b2, "nonce-A", pol, opts)
	require.NoError(t, err)

	// The real signature check rejects the patched quote: the stub is what lets it through.
	_, err = VerifyEvidence(ctx, b, "nonce-A", pol, Options{Now: cosAt})
	require.ErrorIs(t, err, ErrSignature)
	// And the stub itself rejects a change outside the patched fields.
	mrtd := *b
	mrtd.Quote = append([]byte{}, b.Quote...)
	mrtd.Quote[cosBody+136] ^= 1
	_, err = VerifyEvidence(ctx, &mrtd, "nonce-A", pol, opts)
	require.ErrorIs(t, err, ErrSignature)

	// Wrong nonce; a quote made for nonce A replayed to a verifier that sent nonce B.
	_, err = VerifyEvidence(ctx, b, "nonce-B", pol, opts)
	require.ErrorIs(t, err, ErrBinding)
	bB := good.bundle(t, "nonce-B")
	replayed := *bB
	replayed.Quote = b.Quote
	_, err = VerifyEvidence(ctx, &replayed, "nonce-B", pol, opts)
	require.ErrorIs(t, err, ErrBinding)
	_, err = VerifyEvidence(ctx, b, "", pol, opts)
	require.ErrorIs(t, err, ErrBinding)

	// A tampered cc_eventlog (one bit of an AAEL event, of a firmware event; truncated).
	for name, mut := range map[string]func([]byte) []byte{
		"aael content": func(c []byte) []byte { i := bytes.Index(c, []byte("llama3.1:8b")); c[i] = 'L'; return c },
		"ccel event":   func(c []byte) []byte { c[200] ^= 1; return c },
		"truncated":    func(c []byte) []byte { return c[:len(c)-8-200] },
		"removed":      func([]byte) []byte { return nil },
	} {
		tb := *b
		tb.CCEventLog = mut(append([]byte{}, b.CCEventLog...))
		_, err = VerifyEvidence(ctx, &tb, "nonce-A", pol, opts)
		require.ErrorIs(t, err, ErrBinding, name)
	}
	// The bundle's report_data field disagrees with its quote.
	rdb := *b
	rdb.ReportData = strings.Repeat("00", 64)
	_, err = VerifyEvidence(ctx, &rdb, "nonce-A", pol, opts)
	require.ErrorIs(t, err, ErrBinding)

	// The log does not replay to the quote: an event measured but missing from the log, an
	// event in the log that was never measured, events reordered.
	for name, e := range map[string]tdxEvidence{
		"missing":   {quoteEvents: []evidence.Event{bin, model}, logEvents: []evidence.Event{bin}},
		"extra":     {quoteEvents: []evidence.Event{bin}, logEvents: []evidence.Event{bin, model}},
		"reordered": {quoteEvents: []evidence.Event{bin, model}, logEvents: []evidence.Event{model, bin}},
		"no log":    {quoteEvents: []evidence.Event{bin, model}},
	} {
		_, err = VerifyEvidence(ctx, e.bundle(t, "n"), "n", pol, opts)
		require.ErrorIs(t, err, ErrReplay, name)
	}

	// The bundle's convenience fields are recomputed, never trusted.
	lie := *b
	lie.Model = &evidence.ModelInfo{Name: "llama3.1:70b", ManifestSHA256: hex.EncodeToString(manifestSHA)}
	_, err = VerifyEvidence(ctx, &lie, "nonce-A", nil, opts)
	require.ErrorIs(t, err, ErrReplay)
	lie = *b
	lie.Measurements = b.Measurements[:1]
	_, err = VerifyEvidence(ctx, &lie, "nonce-A", nil, opts)
	require.ErrorIs(t, err, ErrReplay)
	omitted := *b
	omitted.Measurements, omitted.Model = nil, nil
	res, err = VerifyEvidence(ctx, &omitted, "nonce-A", pol, opts)
	require.NoError(t, err)
	assert.Equal(t, "llama3.1:8b", res.Model.Name)

	// Policy: unexpected binary, different model, debug bit.
	evil, _ := evidence.BinaryEvent("/usr/bin/ollama", sha(0x66))
	for name, e := range map[string]tdxEvidence{
		"unexpected binary": {quoteEvents: []evidence.Event{evil, model}, logEvents: []evidence.Event{evil, model}},
		"different model":   {quoteEvents: []evidence.Event{bin, otherModel}, logEvents: []evidence.Event{bin, otherModel}},
		"model replaced":    {quoteEvents: []evidence.Event{bin, model, otherModel}, logEvents: []evidence.Event{bin, model, otherModel}},
		"no model":          {quoteEvents: []evidence.Event{bin}, logEvents: []evidence.Event{bin}},
		"debug":             {quoteEvents: []evidence.Event{bin, model}, logEvents: []evidence.Event{bin, model}, debug: true},
	} {
		_, err = VerifyEvidence(ctx, e.bundle(t, "n"), "n", pol, opts)
		require.ErrorIs(t, err, ErrPolicy, name)
		assert.Len(t, failures(t, err), 1, name)
	}
	dbg := tdxEvidence{quoteEvents: []evidence.Event{bin, model}, logEvents: []evidence.Event{bin, model}, debug: true}
	_, err = VerifyEvidence(ctx, dbg.bundle(t, "n"), "n", nil, opts)
	require.ErrorIs(t, err, ErrPolicy, "no policy still refuses a debuggable TD")
	allow := *pol
	allow.AllowDebug = true
	_, err = VerifyEvidence(ctx, dbg.bundle(t, "n"), "n", &allow, opts)
	require.NoError(t, err)

	// Malformed bundles.
	for name, mb := range map[string]*evidence.Bundle{
		"nil":           nil,
		"other tee":     {TEE: "sev-snp", Quote: b.Quote, CCEventLog: b.CCEventLog},
		"no quote":      {TEE: "tdx", CCEventLog: b.CCEventLog},
		"tdx as json":   {TEE: "tdx", Quote: []byte(`{"svn":"1"}`)},
		"tdx as sample": {TEE: "sample", Quote: b.Quote, CCEventLog: b.CCEventLog},
	} {
		_, err = VerifyEvidence(ctx, mb, "nonce-A", nil, Options{Now: cosAt, AllowSample: true})
		require.ErrorIs(t, err, ErrFormat, name)
	}
}

// sampleBundle runs the real sample TEE runtime (the evidence package) and returns a bundle
// for nonce after measuring evs.
func samplePlatform(t testing.TB) *evidence.Platform {
	p, err := evidence.Open(context.Background(), evidence.Options{TEE: evidence.TEESample, StateDir: filepath.Join(t.TempDir(), "state")})
	require.NoError(t, err)
	t.Cleanup(func() { p.Close() })
	return p
}

func sampleBundle(t testing.TB, p *evidence.Platform, nonce string) *evidence.Bundle {
	ev, err := p.AttestNonce(context.Background(), nonce)
	require.NoError(t, err)
	rd, err := evidence.NonceReportData(nonce, ev.CCEventLog)
	require.NoError(t, err)
	b := &evidence.Bundle{TEE: ev.TEE, Quote: ev.Quote, CCEventLog: ev.CCEventLog, ReportData: hex.EncodeToString(rd[:])}
	if len(ev.CCEventLog) > 0 {
		recs, err := eventlog.Parse(ev.CCEventLog)
		require.NoError(t, err)
		b.Measurements, b.Model = eventlog.Measurements(recs)
	}
	return b
}

func TestSampleBundle(t *testing.T) {
	ctx := context.Background()
	bin, model, otherModel := events(t)
	p := samplePlatform(t)
	for _, ev := range []evidence.Event{bin, model} {
		_, err := p.Measure(ctx, ev)
		require.NoError(t, err)
	}
	pol := ollamaPolicy(t)
	pol.MRTD, pol.MinTEETCBSVN, pol.RequireBootLog = nil, nil, false // the sample TEE has no such values
	b := sampleBundle(t, p, "nonce-A")

	_, err := VerifyEvidence(ctx, b, "nonce-A", pol, Options{})
	require.ErrorIs(t, err, ErrSample, "sample evidence is refused unless allowed")
	allowed := Options{AllowSample: true}
	res, err := VerifyEvidence(ctx, b, "nonce-A", pol, allowed)
	require.NoError(t, err)
	assert.True(t, res.Unsigned)
	assert.Equal(t, evidence.TEESample, res.TEE)
	assert.Contains(t, res.Checks[0], "UNSIGNED")
	assert.Equal(t, []int{3}, res.Replay.Compared)
	assert.Equal(t, "llama3.1:8b", res.Model.Name)

	// A policy pinning hardware values never accepts sample evidence.
	_, err = VerifyEvidence(ctx, b, "nonce-A", ollamaPolicy(t), allowed)
	require.ErrorIs(t, err, ErrPolicy)

	_, err = VerifyEvidence(ctx, b, "nonce-B", pol, allowed)
	require.ErrorIs(t, err, ErrBinding, "wrong nonce")

	// A later measurement: the old quote, served again with the current log, is a replay.
	evil, _ := evidence.BinaryEvent("/tmp/evil", sha(0x66))
	_, err = p.Measure(ctx, evil)
	require.NoError(t, err)
	b2 := sampleBundle(t, p, "nonce-B")
	replayed := *b2
	replayed.Quote = b.Quote
	_, err = VerifyEvidence(ctx, &replayed, "nonce-B", pol, allowed)
	require.ErrorIs(t, err, ErrBinding)
	// The fresh evidence is genuine but measured an unexpected binary.
	_, err = VerifyEvidence(ctx, b2, "nonce-B", pol, allowed)
	require.ErrorIs(t, err, ErrPolicy)
	assert.Contains(t, err.Error(), "/tmp/evil")

	// A different model measured last.
	_, err = p.Measure(ctx, otherModel)
	require.NoError(t, err)
	polNoBin := *pol
	polNoBin.AllowedBinaries, polNoBin.OnlyKnownEvents = nil, false
	_, err = VerifyEvidence(ctx, sampleBundle(t, p, "n"), "n", &polNoBin, allowed)
	require.ErrorIs(t, err, ErrPolicy)
	assert.Contains(t, err.Error(), "llama3.1:70b")

	// A tampered log.
	tb := *b
	tb.CCEventLog = append([]byte{}, b.CCEventLog...)
	tb.CCEventLog[len(tb.CCEventLog)-20] ^= 1
	_, err = VerifyEvidence(ctx, &tb, "nonce-A", pol, allowed)
	require.ErrorIs(t, err, ErrBinding)

	// Sample evidence labelled as TDX is not a TD quote.
	lab := *b
	lab.TEE = evidence.TEETDX
	_, err = VerifyEvidence(ctx, &lab, "nonce-A", pol, allowed)
	require.ErrorIs(t, err, ErrFormat)
}

// Verify (the --quote mode) on real quotes and a real CCEL.
func TestVerifyRaw(t *testing.T) {
	ctx := context.Background()
	raw := fixture(t, cosQuote)
	res, err := Verify(ctx, raw, fixture(t, cosCCEL), ollamaPolicyQuoteOnly(t), Options{Now: cosAt})
	require.NoError(t, err)
	assert.Equal(t, []int{0, 1, 2, 3}, res.Replay.Compared)
	_, err = Verify(ctx, raw, nil, nil, Options{Now: cosAt})
	require.NoError(t, err)
	_, err = Verify(ctx, raw, eventlogFixture(t, "trustee-CCEL_data"), nil, Options{Now: cosAt})
	require.ErrorIs(t, err, ErrReplay, "another TD's CCEL")
	_, err = Verify(ctx, fixture(t, "trustee-tdx_quote_4.dat"), nil, nil, Options{Now: date(2024, 1, 1)})
	require.ErrorIs(t, err, ErrPolicy, "debug TD")
	_, err = Verify(ctx, raw, nil, ollamaPolicy(t), Options{Now: cosAt})
	require.ErrorIs(t, err, ErrPolicy, "binaries/model policy without an event log")

	// A sample quote given as a raw quote.
	p := samplePlatform(t)
	ev, err := p.Attest(ctx, [64]byte{1})
	require.NoError(t, err)
	_, err = Verify(ctx, ev.Quote, nil, nil, Options{})
	require.ErrorIs(t, err, ErrSample)
	res, err = Verify(ctx, ev.Quote, nil, nil, Options{AllowSample: true})
	require.NoError(t, err)
	assert.True(t, res.Unsigned)
	assert.Equal(t, byte(1), res.Quote.ReportData[0])
}

func ollamaPolicyQuoteOnly(t testing.TB) *Policy {
	p := *ollamaPolicy(t)
	p.AllowedBinaries, p.Model, p.OnlyKnownEvents = nil, nil, false
	return &p
}

// One Options value used by many goroutines at once (a gateway verifying concurrent chats).
func TestVerifyConcurrent(t *testing.T) {
	ctx := context.Background()
	raw := fixture(t, "quote_v5_sample.dat")
	opts := Options{Now: date(2026, 6, 1)}
	errs := make(chan error, 8)
	for i := range 8 {
		go func() {
			b := raw
			if i%2 == 1 {
				b = append([]byte{}, raw...)
				b[54+520] ^= 1
			}
			_, err := VerifyQuote(ctx, b, opts)
			if (err == nil) != (i%2 == 0) {
				errs <- fmt.Errorf("goroutine %d: %v", i, err)
				return
			}
			errs <- nil
		}()
	}
	for range 8 {
		require.NoError(t, <-errs)
	}
}

func TestParseBundle(t *testing.T) {
	b, err := ParseBundle([]byte(`{"tee":"tdx","quote":"AQID","cc_eventlog":null,"extra":1}`))
	require.NoError(t, err)
	assert.Equal(t, []byte{1, 2, 3}, b.Quote)
	assert.Nil(t, b.CCEventLog)
	for name, js := range map[string]string{
		"not json":   `tee=tdx`,
		"no quote":   `{"tee":"tdx"}`,
		"no tee":     `{"quote":"AQID"}`,
		"bad base64": `{"tee":"tdx","quote":"%%%"}`,
		"array":      `[]`,
	} {
		_, err := ParseBundle([]byte(js))
		assert.ErrorIs(t, err, ErrFormat, name)
	}
}
