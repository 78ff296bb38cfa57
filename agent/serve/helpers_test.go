package serve

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/evidencetest"
	"github.com/cai-agent/cai-agent/evidence/rtmr/rtmrtest"
)

// shortDir returns a temporary directory with a short path (unix socket paths are limited to
// 108 bytes, which t.TempDir can exceed).
func shortDir(t testing.TB) string {
	d, err := os.MkdirTemp("", "cais")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func quietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// samplePlatform opens the real sample TEE runtime in a fresh state directory.
func samplePlatform(t testing.TB) *evidence.Platform {
	t.Helper()
	p, err := evidence.Open(context.Background(), evidence.Options{TEE: evidence.TEESample, StateDir: filepath.Join(t.TempDir(), "state")})
	require.NoError(t, err)
	t.Cleanup(func() { p.Close() })
	return p
}

// tdxEnv is the real TDX runtime on fakes: go-configfs-tsm's faketsm answering the real
// cos-113 quote with REPORTDATA patched to the inblob, the cos-113 firmware CCEL, and a fake
// kernel with the tsm-mr sysfs files.
type tdxEnv struct {
	p *evidence.Platform
	k *rtmrtest.Kernel
}

func tdxPlatform(t testing.TB) *tdxEnv {
	t.Helper()
	root := t.TempDir()
	ccel := filepath.Join(root, evidence.CCELPath)
	require.NoError(t, os.MkdirAll(filepath.Dir(ccel), 0o755))
	require.NoError(t, os.WriteFile(ccel, fixture(t, "tdx/cos-113-ccel_data.dat"), 0o444))
	k := &rtmrtest.Kernel{Root: root, Sysfs: true}
	p, err := evidence.Open(context.Background(), evidence.Options{
		TEE: evidence.TEETDX, StateDir: filepath.Join(t.TempDir(), "state"), Root: root, Kernel: k,
		TSM: evidencetest.TSM(fixture(t, "tdx/cos-113-tdx-quote.dat"), true, "tdx_guest"),
	})
	require.NoError(t, err)
	t.Cleanup(func() { p.Close() })
	return &tdxEnv{p: p, k: k}
}

func fixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "testdata", name))
	require.NoError(t, err)
	return b
}

// harness runs a Server on a unix socket and a loopback TCP port.
type harness struct {
	s    *Server
	sock string
	tcp  string // base URL
	unix *http.Client
	http *http.Client
	done chan error
	stop context.CancelFunc
}

func start(t testing.TB, cfg Config) *harness {
	t.Helper()
	cfg.Socket = filepath.Join(shortDir(t), "agent.sock")
	cfg.Listen = "127.0.0.1:0"
	if cfg.Logger == nil {
		cfg.Logger = quietLogger()
	}
	s, err := New(cfg)
	require.NoError(t, err)
	ls, err := Listen(cfg)
	require.NoError(t, err)
	require.Len(t, ls, 2)
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{s: s, sock: cfg.Socket, tcp: "http://" + ls[1].Addr().String(), done: make(chan error, 1), stop: cancel}
	h.unix = unixClient(cfg.Socket)
	h.http = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	go func() { h.done <- s.Serve(ctx, ls...) }()
	t.Cleanup(func() {
		// Connections the transports dialed but never used are StateNew to the server, which
		// Shutdown waits up to 5 s for; closing them from this side ends them at once.
		h.unix.CloseIdleConnections()
		h.http.CloseIdleConnections()
		cancel()
		require.NoError(t, <-h.done)
	})
	return h
}

// unixClient is an HTTP client whose every connection goes to the unix socket sock.
func unixClient(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		MaxIdleConnsPerHost: 64,
	}}
}

// response is a decoded HTTP response.
type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) json(t testing.TB, v any) {
	t.Helper()
	require.NoError(t, json.Unmarshal(r.body, v), "body %s", r.body)
}

func (r response) errMsg(t testing.TB) string {
	t.Helper()
	var e ErrorResponse
	r.json(t, &e)
	require.NotEmpty(t, e.Error)
	require.False(t, e.Status)
	return e.Error
}

// do sends a request over the unix socket (onUnix) or TCP.
func (h *harness) do(t testing.TB, onUnix bool, method, target, contentType, body string) response {
	t.Helper()
	c, base := h.http, h.tcp
	if onUnix {
		c, base = h.unix, "http://agent"
	}
	req, err := http.NewRequest(method, base+target, strings.NewReader(body))
	require.NoError(t, err)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return response{resp.StatusCode, resp.Header, b}
}

func (h *harness) evidence(t testing.TB, onUnix bool, nonce string) response {
	return h.do(t, onUnix, http.MethodGet, PathEvidence+"?nonce="+url.QueryEscape(nonce), "", "")
}

func (h *harness) measure(t testing.TB, ev evidence.Event) evidence.Measurement {
	t.Helper()
	b, err := json.Marshal(ev)
	require.NoError(t, err)
	r := h.do(t, true, http.MethodPost, PathMeasurements, "application/json", string(b))
	require.Equal(t, http.StatusOK, r.status, "body %s", r.body)
	var m evidence.Measurement
	r.json(t, &m)
	return m
}

// gate wraps a Platform: every AttestBound blocks inside the platform (holding its lock, as a
// slow TEE would) until released, and reports that it entered.
type gate struct {
	Platform
	entered chan struct{}
	release chan struct{}
	once    sync.Once
}

func newGate(p Platform) *gate {
	return &gate{Platform: p, entered: make(chan struct{}, 1000), release: make(chan struct{})}
}

func (g *gate) open() { g.once.Do(func() { close(g.release) }) }

func (g *gate) AttestBound(ctx context.Context, bind func([]byte) ([64]byte, error)) (*evidence.Evidence, error) {
	return g.Platform.AttestBound(ctx, func(cc []byte) ([64]byte, error) {
		g.entered <- struct{}{}
		<-g.release
		return bind(cc)
	})
}

// checkBinding asserts that b is bound to nonce: report_data is NonceReportData(nonce,
// cc_eventlog) and the quote carries it.
func checkBinding(t testing.TB, b *evidence.Bundle, nonce string) {
	t.Helper()
	want, err := evidence.NonceReportData(nonce, b.CCEventLog)
	require.NoError(t, err)
	require.Equal(t, hex.EncodeToString(want[:]), b.ReportData, "report_data for nonce %q", nonce)
	got, err := quoteReportData(&evidence.Evidence{TEE: b.TEE, Quote: b.Quote})
	require.NoError(t, err)
	require.Equal(t, want, got, "quote REPORTDATA for nonce %q", nonce)
}
