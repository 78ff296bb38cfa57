package serve

import (
	"context"
	"encoding/hex"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
	"github.com/cai-agent/cai-agent/evidence/evidencetest"
	"github.com/cai-agent/cai-agent/evidence/rtmr/rtmrtest"
	"github.com/cai-agent/cai-agent/evidence/verify"
)

func getBundle(t testing.TB, h *harness, onUnix bool, nonce string) *evidence.Bundle {
	t.Helper()
	r := h.evidence(t, onUnix, nonce)
	require.Equal(t, http.StatusOK, r.status, "body %s", r.body)
	var b evidence.Bundle
	r.json(t, &b)
	return &b
}

// The served evidence binds the caller's nonce, verifies with the relying party's API, and a
// different nonce does not verify (no replay).
func TestEvidenceBindingSample(t *testing.T) {
	h := start(t, Config{Platform: samplePlatform(t)})
	ctx := context.Background()
	for _, onUnix := range []bool{true, false} {
		for _, nonce := range []string{"n", "nonce with spaces & symbols ?=/", "ünïcödé", strings.Repeat("x", MaxNonceLen)} {
			b := getBundle(t, h, onUnix, nonce)
			assert.Equal(t, evidence.TEESample, b.TEE)
			checkBinding(t, b, nonce)
			assert.NotNil(t, b.Measurements)
			_, err := verify.VerifyEvidence(ctx, b, nonce, nil, verify.Options{AllowSample: true})
			require.NoError(t, err)
			_, err = verify.VerifyEvidence(ctx, b, nonce+"x", nil, verify.Options{AllowSample: true})
			require.ErrorIs(t, err, verify.ErrBinding)
			_, err = verify.VerifyEvidence(ctx, b, nonce, nil, verify.Options{})
			require.ErrorIs(t, err, verify.ErrSample, "sample evidence is never mistaken for real")
		}
	}
	// The JSON keys are the documented ones.
	r := h.evidence(t, true, "keys")
	var raw map[string]any
	r.json(t, &raw)
	for _, k := range []string{"tee", "quote", "cc_eventlog", "report_data", "measurements", "model"} {
		assert.Contains(t, raw, k)
	}
	assert.Nil(t, raw["model"])
	assert.Equal(t, "application/json", r.header.Get("Content-Type"))
	assert.Contains(t, r.header.Get("Cache-Control"), "no-store")
}

// After measurements (through the API and by the agent itself), the served evidence lists
// them in order, names the last model, and its log replays to the platform's RTMR3.
func TestReplayAfterMeasurements(t *testing.T) {
	ctx := context.Background()
	models := func(t *testing.T, p Platform) []evidence.Measurement {
		var out []evidence.Measurement
		for i, name := range []string{"llama3:8b", "qwen2.5:7b"} {
			ev, err := evidence.ModelEvent(name, []byte{byte(i), 0xaa})
			require.NoError(t, err)
			d, err := p.Measure(ctx, ev)
			require.NoError(t, err)
			out = append(out, evidence.Measurement{Event: ev, Digest: hex.EncodeToString(d)})
		}
		return out
	}
	api := []evidence.Event{
		{Domain: "github.com/open-webui", Operation: "Start", Content: `{"version":"0.5.20","image":"sha256:ab"}`},
		{Domain: "example.com", Operation: "Config", Content: ""},
		{Domain: "example.com", Operation: "Note", Content: "plain text, not JSON"},
	}
	check := func(t *testing.T, h *harness, p Platform, rtmr3 func() []byte) *evidence.Bundle {
		var want []evidence.Measurement
		for _, ev := range api {
			m := h.measure(t, ev)
			if ev.Content == `{"version":"0.5.20","image":"sha256:ab"}` {
				assert.Equal(t, `{"image":"sha256:ab","version":"0.5.20"}`, m.Content, "JSON content is canonicalized")
			} else {
				assert.Equal(t, ev.Content, m.Content)
			}
			d := evidence.AAELDigest(m.Event)
			assert.Equal(t, hex.EncodeToString(d[:]), m.Digest)
			want = append(want, m)
		}
		want = append(want, models(t, p)...)
		b := getBundle(t, h, true, "after-measurements")
		checkBinding(t, b, "after-measurements")
		require.Equal(t, want, b.Measurements)
		require.NotNil(t, b.Model)
		assert.Equal(t, evidence.ModelInfo{Name: "qwen2.5:7b", ManifestSHA256: "01aa"}, *b.Model, "the last model event wins")
		recs, err := eventlog.Parse(b.CCEventLog)
		require.NoError(t, err)
		got, err := eventlog.Replay(recs)
		require.NoError(t, err)
		assert.Equal(t, rtmr3(), got[3][:], "the served log replays to the platform's RTMR3")
		return b
	}

	t.Run("sample", func(t *testing.T) {
		p := samplePlatform(t)
		h := start(t, Config{Platform: p})
		b := check(t, h, p, func() []byte {
			r, err := p.RTMRs()
			require.NoError(t, err)
			return r[3]
		})
		res, err := verify.VerifyEvidence(ctx, b, "after-measurements", nil, verify.Options{AllowSample: true})
		require.NoError(t, err)
		assert.Equal(t, b.Measurements, res.Measurements)
	})
	t.Run("tdx", func(t *testing.T) {
		e := tdxPlatform(t)
		h := start(t, Config{Platform: e.p})
		b := check(t, h, e.p, func() []byte { v := e.k.RTMR(3); return v[:] })
		assert.Equal(t, evidence.TEETDX, b.TEE)
		// The firmware part of the log still replays to the (real) quote's RTMR0..2.
		q, err := verify.ParseQuote(b.Quote)
		require.NoError(t, err)
		recs, err := eventlog.Parse(b.CCEventLog)
		require.NoError(t, err)
		got, err := eventlog.Replay(recs)
		require.NoError(t, err)
		want := q.RTMRs()
		require.NoError(t, eventlog.Match(got, want, 0, 1, 2))
	})
}

// 200 concurrent evidence requests over both listeners and both endpoints, with measurements
// landing in between: every response is 200 and carries its own nonce's binding, and its log
// replays to the RTMRs in its own quote (never a stale log).
func TestConcurrent200(t *testing.T) {
	p := samplePlatform(t)
	h := start(t, Config{Platform: p, MaxQueue: 256})
	ctx := context.Background()
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n+20)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nonce := fmt.Sprintf("nonce-%03d-%s", i, strings.Repeat("z", i))
			onUnix := i%2 == 0
			if i%3 == 0 {
				r := h.do(t, onUnix, http.MethodGet, PathQuote+"?nonce="+nonce, "", "")
				if r.status != http.StatusOK {
					errs <- fmt.Errorf("%s: status %d: %s", nonce, r.status, r.body)
					return
				}
				var qr QuoteResponse
				r.json(t, &qr)
				quote, err := hex.DecodeString(qr.Quote)
				if err != nil || qr.Nonce != nonce {
					errs <- fmt.Errorf("%s: bad quote response %s", nonce, r.body)
					return
				}
				b := &evidence.Bundle{TEE: qr.TEE, Quote: quote, CCEventLog: qr.CCEventLog, ReportData: qr.ReportData}
				if _, err := verify.VerifyEvidence(ctx, b, nonce, nil, verify.Options{AllowSample: true}); err != nil {
					errs <- fmt.Errorf("%s: %w", nonce, err)
				}
				return
			}
			r := h.evidence(t, onUnix, nonce)
			if r.status != http.StatusOK {
				errs <- fmt.Errorf("%s: status %d: %s", nonce, r.status, r.body)
				return
			}
			var b evidence.Bundle
			r.json(t, &b)
			if _, err := verify.VerifyEvidence(ctx, &b, nonce, nil, verify.Options{AllowSample: true}); err != nil {
				errs <- fmt.Errorf("%s: %w", nonce, err)
			}
		}()
	}
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.measure(t, evidence.Event{Domain: "example.com", Operation: "Tick", Content: fmt.Sprint(i)})
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	b := getBundle(t, h, true, "final")
	assert.Len(t, b.Measurements, 20)
	assert.Equal(t, 0, h.s.q.depth())
}

// With a queue bound smaller than the burst, the holder and MaxQueue waiters are served,
// correctly bound, and every request beyond the bound is refused at once with 503 and
// Retry-After. The slow TEE is a gate, so the test does not depend on timing.
func TestQueueBound(t *testing.T) {
	const maxQueue, n = 10, 200
	g := newGate(samplePlatform(t))
	h := start(t, Config{Platform: g, MaxQueue: maxQueue})
	type res struct {
		nonce string
		r     response
	}
	admitted := make(chan res, maxQueue+1)
	var wg sync.WaitGroup
	for i := range maxQueue + 1 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nonce := fmt.Sprintf("admitted-%d", i)
			admitted <- res{nonce, h.evidence(t, i%2 == 0, nonce)}
		}()
	}
	<-g.entered // the holder is inside the TEE
	for h.s.q.depth() < maxQueue+1 {
		time.Sleep(time.Millisecond) // polling for a state, not asserting a duration
	}
	var rwg sync.WaitGroup
	refused := make(chan response, n)
	for i := range n - (maxQueue + 1) {
		rwg.Add(1)
		go func() {
			defer rwg.Done()
			refused <- h.evidence(t, i%2 == 0, fmt.Sprintf("refused-%d", i))
		}()
	}
	rwg.Wait() // all refused while the gate is still closed: none of them waited
	close(refused)
	count := 0
	for r := range refused {
		count++
		require.Equal(t, http.StatusServiceUnavailable, r.status, "body %s", r.body)
		assert.Equal(t, "1", r.header.Get("Retry-After"))
		assert.Contains(t, r.errMsg(t), "busy")
	}
	assert.Equal(t, n-(maxQueue+1), count)
	g.open()
	wg.Wait()
	close(admitted)
	for a := range admitted {
		require.Equal(t, http.StatusOK, a.r.status, "%s: %s", a.nonce, a.r.body)
		var b evidence.Bundle
		a.r.json(t, &b)
		checkBinding(t, &b, a.nonce)
	}
	assert.Equal(t, 0, h.s.q.depth())
}

// A burst of 200 against a bound of 20 with a fast TEE: every answer is either a correctly
// bound 200 or a 503 with Retry-After, and at least the first is served.
func TestBurstSmallBound(t *testing.T) {
	h := start(t, Config{Platform: samplePlatform(t), MaxQueue: 20})
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok, busy := 0, 0
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nonce := fmt.Sprintf("burst-%d", i)
			r := h.evidence(t, i%2 == 1, nonce)
			mu.Lock()
			defer mu.Unlock()
			switch r.status {
			case http.StatusOK:
				ok++
				var b evidence.Bundle
				r.json(t, &b)
				checkBinding(t, &b, nonce)
			case http.StatusServiceUnavailable:
				busy++
				assert.Equal(t, "1", r.header.Get("Retry-After"))
			default:
				t.Errorf("%s: status %d: %s", nonce, r.status, r.body)
			}
		}()
	}
	wg.Wait()
	assert.Equal(t, 200, ok+busy)
	assert.Positive(t, ok)
	t.Logf("served %d, refused %d", ok, busy)
}

// A request not served within QuoteTimeout gets 504, whether it waited in the queue or sat in
// the TEE; the slot is released when the TEE returns, and later requests are served.
func TestQuoteTimeout(t *testing.T) {
	g := newGate(samplePlatform(t))
	h := start(t, Config{Platform: g, QuoteTimeout: 50 * time.Millisecond})
	r := h.evidence(t, true, "slow") // holder: stuck in the TEE
	require.Equal(t, http.StatusGatewayTimeout, r.status, "body %s", r.body)
	assert.Contains(t, r.errMsg(t), "no evidence within")
	r = h.evidence(t, false, "queued") // waiter: the slot is still held by the stuck attestation
	require.Equal(t, http.StatusGatewayTimeout, r.status, "body %s", r.body)
	g.open()
	for h.s.q.depth() != 0 {
		time.Sleep(time.Millisecond)
	}
	b := getBundle(t, h, true, "after")
	checkBinding(t, b, "after")
}

// Shutdown is graceful: an in-flight request completes, then Serve returns nil and the unix
// socket is removed.
func TestGracefulShutdown(t *testing.T) {
	g := newGate(samplePlatform(t))
	cfg := Config{Platform: g, Socket: shortDir(t) + "/a.sock", Logger: quietLogger()}
	s, err := New(cfg)
	require.NoError(t, err)
	ls, err := Listen(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ls...) }()
	h := &harness{sock: cfg.Socket, unix: unixClient(cfg.Socket)}
	got := make(chan response, 1)
	go func() { got <- h.evidence(t, true, "inflight") }()
	<-g.entered
	cancel()
	g.open()
	r := <-got
	require.Equal(t, http.StatusOK, r.status, "body %s", r.body)
	var b evidence.Bundle
	r.json(t, &b)
	checkBinding(t, &b, "inflight")
	require.NoError(t, <-done)
	assert.NoFileExists(t, cfg.Socket)
}

// liar returns evidence that does not carry the binding it was asked for.
type liar struct {
	Platform
	mode string
}

func (l *liar) AttestBound(ctx context.Context, bind func([]byte) ([64]byte, error)) (*evidence.Evidence, error) {
	switch l.mode {
	case "other nonce":
		return l.Platform.AttestBound(ctx, func(cc []byte) ([64]byte, error) {
			bind(cc)
			return evidence.NonceReportData("someone else's nonce", cc)
		})
	case "other log":
		ev, err := l.Platform.AttestBound(ctx, bind)
		if err == nil {
			ev.CCEventLog = append(ev.CCEventLog, 0xff)
		}
		return ev, err
	case "no bind":
		return l.Platform.AttestBound(ctx, func([]byte) ([64]byte, error) { return [64]byte{}, nil })
	}
	panic(l.mode)
}

// Evidence that does not carry this request's binding is never served.
func TestNeverMixedUp(t *testing.T) {
	for mode, status := range map[string]int{"other nonce": 500, "other log": 503, "no bind": 503} {
		t.Run(mode, func(t *testing.T) {
			h := start(t, Config{Platform: &liar{samplePlatform(t), mode}})
			for _, path := range []string{PathEvidence + "?nonce=mine", PathQuote + "?nonce=mine", PathQuote} {
				r := h.do(t, true, http.MethodGet, path, "", "")
				require.Equal(t, status, r.status, "%s: %s", path, r.body)
				r.errMsg(t)
			}
		})
	}
}

var uuid4RE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// GET /api/v1/tee/quote answers in the shape the Open WebUI TDX patch reads, with no-cache
// headers; without a caller nonce a random one is bound (never all-zero REPORTDATA).
func TestOpenWebUIQuote(t *testing.T) {
	p := samplePlatform(t)
	h := start(t, Config{Platform: p})
	ctx := context.Background()
	seen := map[string]bool{}
	for _, nonce := range []string{"", "chat-42"} {
		for range 2 {
			path := PathQuote
			if nonce != "" {
				path += "?nonce=" + nonce
			}
			r := h.do(t, false, http.MethodGet, path, "", "")
			require.Equal(t, http.StatusOK, r.status, "body %s", r.body)
			assert.Equal(t, "no-store, no-cache, must-revalidate, max-age=0", r.header.Get("Cache-Control"))
			assert.Equal(t, "no-cache", r.header.Get("Pragma"))
			assert.Equal(t, "0", r.header.Get("Expires"))
			var raw map[string]any
			r.json(t, &raw)
			for _, k := range []string{"quote", "quote_parse", "timestamp", "id", "status"} {
				assert.Contains(t, raw, k)
			}
			var qr QuoteResponse
			r.json(t, &qr)
			assert.True(t, qr.Status)
			assert.Equal(t, "reserved", qr.QuoteParse)
			assert.Regexp(t, uuid4RE, qr.ID)
			assert.False(t, seen[qr.ID], "ids are unique")
			seen[qr.ID] = true
			_, err := time.Parse(time.RFC3339Nano, qr.Timestamp)
			require.NoError(t, err)
			quote, err := hex.DecodeString(qr.Quote)
			require.NoError(t, err)
			assert.Equal(t, strings.ToLower(qr.Quote), qr.Quote)
			if nonce == "" {
				assert.True(t, qr.NonceGenerated)
				assert.Len(t, qr.Nonce, 64)
				assert.False(t, seen[qr.Nonce], "generated nonces are unique")
				seen[qr.Nonce] = true
			} else {
				assert.False(t, qr.NonceGenerated)
				assert.Equal(t, nonce, qr.Nonce)
			}
			assert.NotEqual(t, strings.Repeat("0", 128), qr.ReportData)
			b := &evidence.Bundle{TEE: qr.TEE, Quote: quote, CCEventLog: qr.CCEventLog, ReportData: qr.ReportData}
			checkBinding(t, b, qr.Nonce)
			_, err = verify.VerifyEvidence(ctx, b, qr.Nonce, nil, verify.Options{AllowSample: true})
			require.NoError(t, err)
		}
	}
}

// A TDX platform whose configfs-tsm hands back a quote for other REPORTDATA (here: the real
// cos-113 quote, unpatched) is never served.
func TestForeignTDXQuoteRefused(t *testing.T) {
	root := t.TempDir()
	p, err := evidence.Open(context.Background(), evidence.Options{
		TEE: evidence.TEETDX, StateDir: t.TempDir() + "/state", Root: root,
		Kernel: &rtmrtest.Kernel{Root: root, Sysfs: true},
		TSM:    evidencetest.TSM(fixture(t, "tdx/cos-113-tdx-quote.dat"), false, "tdx_guest"),
	})
	require.NoError(t, err)
	t.Cleanup(func() { p.Close() })
	h := start(t, Config{Platform: p})
	for _, path := range []string{PathEvidence + "?nonce=mine", PathQuote} {
		r := h.do(t, false, http.MethodGet, path, "", "")
		// The TDX runtime already refuses it (503); the server's own check (500, see
		// TestNeverMixedUp) is the second line.
		require.Equal(t, http.StatusServiceUnavailable, r.status, "%s: %s", path, r.body)
		assert.Contains(t, r.errMsg(t), "REPORTDATA")
	}
}
