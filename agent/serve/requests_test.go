package serve

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
	"github.com/cai-agent/cai-agent/evidence/evidencetest"
	"github.com/cai-agent/cai-agent/evidence/rtmr"
	"github.com/cai-agent/cai-agent/evidence/rtmr/rtmrtest"
)

// Bad requests are refused with the right status and a JSON error naming the problem, and
// change nothing.
func TestBadRequests(t *testing.T) {
	p := samplePlatform(t)
	h := start(t, Config{Platform: p})
	const js = "application/json"
	long := strings.Repeat("a", MaxNonceLen+1)
	for _, tc := range []struct {
		name             string
		unix             bool
		method, path, ct string
		body             string
		status           int
		msg              string
	}{
		{"missing nonce", true, "GET", PathEvidence, "", "", 400, "missing nonce"},
		{"missing nonce tcp", false, "GET", PathEvidence + "?other=1", "", "", 400, "missing nonce"},
		{"empty nonce", false, "GET", PathEvidence + "?nonce=", "", "", 400, "empty nonce"},
		{"oversized nonce", false, "GET", PathEvidence + "?nonce=" + long, "", "", 400, "at most 1024"},
		{"oversized nonce quote", false, "GET", PathQuote + "?nonce=" + long, "", "", 400, "at most 1024"},
		{"empty nonce quote", false, "GET", PathQuote + "?nonce=", "", "", 400, "empty nonce"},
		{"two nonces", true, "GET", PathEvidence + "?nonce=a&nonce=b", "", "", 400, "2 times"},
		{"invalid utf-8", true, "GET", PathEvidence + "?nonce=%ff", "", "", 400, "UTF-8"},
		{"bad escape", true, "GET", PathEvidence + "?nonce=%zz", "", "", 400, "malformed query"},
		{"post evidence", true, "POST", PathEvidence + "?nonce=a", js, "{}", 405, "method POST not allowed"},
		{"delete quote", false, "DELETE", PathQuote, "", "", 405, "method DELETE"},
		{"get measurements", true, "GET", PathMeasurements, "", "", 405, "use POST"},
		{"unknown path", true, "GET", "/v1/keys", "", "", 404, "no such endpoint"},
		{"measure on tcp", false, "POST", PathMeasurements, js, `{"domain":"a","operation":"b","content":"c"}`, 403, "only on the unix socket"},
		{"measure not json type", true, "POST", PathMeasurements, "text/plain", `{"domain":"a","operation":"b","content":"c"}`, 415, "application/json"},
		{"measure no type", true, "POST", PathMeasurements, "", `{"domain":"a","operation":"b","content":"c"}`, 415, "application/json"},
		{"measure not json", true, "POST", PathMeasurements, js, `domain=a`, 400, "not a measurement object"},
		{"measure array", true, "POST", PathMeasurements, js, `[]`, 400, "not a measurement object"},
		{"measure unknown field", true, "POST", PathMeasurements, js, `{"domain":"a","operation":"b","content":"c","register":3}`, 400, "unknown field"},
		{"measure missing content", true, "POST", PathMeasurements, js, `{"domain":"a","operation":"b"}`, 400, `missing field "content"`},
		{"measure missing domain", true, "POST", PathMeasurements, js, `{"operation":"b","content":"c"}`, 400, `missing field "domain"`},
		{"measure null operation", true, "POST", PathMeasurements, js, `{"domain":"a","operation":null,"content":"c"}`, 400, `missing field "operation"`},
		{"measure trailing", true, "POST", PathMeasurements, js, `{"domain":"a","operation":"b","content":"c"}{}`, 400, "trailing data"},
		{"measure space in domain", true, "POST", PathMeasurements, js, `{"domain":"a b","operation":"b","content":"c"}`, 400, "whitespace"},
		{"measure tab in operation", true, "POST", PathMeasurements, js, `{"domain":"a","operation":"b\tc","content":"c"}`, 400, "whitespace"},
		{"measure empty domain", true, "POST", PathMeasurements, js, `{"domain":"","operation":"b","content":"c"}`, 400, "empty domain"},
		{"measure newline", true, "POST", PathMeasurements, js, `{"domain":"a","operation":"b","content":"x\ny"}`, 400, "newline"},
		{"measure long content", true, "POST", PathMeasurements, js, `{"domain":"a","operation":"b","content":"` + strings.Repeat("c", MaxContentLen+1) + `"}`, 400, "at most 16384"},
		{"measure long domain", true, "POST", PathMeasurements, js, `{"domain":"` + strings.Repeat("d", MaxFieldLen+1) + `","operation":"b","content":"c"}`, 400, "at most 256"},
		{"measure huge body", true, "POST", PathMeasurements, js, `{"domain":"a","operation":"b","content":"` + strings.Repeat("c", MaxMeasurementBody) + `"}`, 413, "larger than"},
		{"measure reserved domain", true, "POST", PathMeasurements, js, `{"domain":"github.com/cai-agent","operation":"Model","content":"{}"}`, 403, "reserved"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := h.do(t, tc.unix, tc.method, tc.path, tc.ct, tc.body)
			require.Equal(t, tc.status, r.status, "body %s", r.body)
			assert.Equal(t, "application/json", r.header.Get("Content-Type"))
			assert.Contains(t, r.errMsg(t), tc.msg)
			if tc.status == 405 {
				assert.NotEmpty(t, r.header.Get("Allow"))
			}
		})
	}
	// Nothing was measured.
	el, err := p.EventLog()
	require.NoError(t, err)
	assert.Empty(t, el)
	// The limits themselves are accepted.
	b := getBundle(t, h, false, strings.Repeat("a", MaxNonceLen))
	checkBinding(t, b, strings.Repeat("a", MaxNonceLen))
	m := h.measure(t, evidence.Event{Domain: strings.Repeat("d", MaxFieldLen), Operation: "op", Content: strings.Repeat("c", MaxContentLen)})
	assert.Len(t, m.Content, MaxContentLen)
	// A charset parameter is fine.
	r := h.do(t, true, "POST", PathMeasurements, "application/json; charset=utf-8", `{"domain":"a","operation":"b","content":""}`)
	require.Equal(t, http.StatusOK, r.status, "body %s", r.body)
}

// Headers beyond the limit are refused by the server itself.
func TestHeaderLimit(t *testing.T) {
	h := start(t, Config{Platform: samplePlatform(t)})
	req, err := http.NewRequest("GET", h.tcp+PathEvidence+"?nonce=a", nil)
	require.NoError(t, err)
	req.Header.Set("X-Big", strings.Repeat("b", 2*maxHeaderBytes))
	resp, err := h.http.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusRequestHeaderFieldsTooLarge, resp.StatusCode)
}

// The unix socket gets mode 0660; a stale socket is replaced, a live one or a non-socket is
// never touched.
func TestListenUnix(t *testing.T) {
	dir := shortDir(t)
	sock := filepath.Join(dir, "sub", "agent.sock")
	ls, err := Listen(Config{Socket: sock, Logger: quietLogger()})
	require.NoError(t, err)
	require.Len(t, ls, 1)
	fi, err := os.Lstat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.ModeSocket, fi.Mode().Type())
	assert.Equal(t, os.FileMode(0o660), fi.Mode().Perm())

	// Live: refused, and the live socket still works.
	_, err = Listen(Config{Socket: sock, Logger: quietLogger()})
	require.ErrorIs(t, err, ErrListen)
	assert.Contains(t, err.Error(), "another server")
	live := ls[0]
	go func() {
		if c, err := live.Accept(); err == nil {
			c.Close()
		}
	}()
	c, err := net.Dial("unix", sock)
	require.NoError(t, err)
	c.Close()

	// Stale: the server died without removing its socket.
	ls[0].(*net.UnixListener).SetUnlinkOnClose(false)
	require.NoError(t, ls[0].Close())
	require.FileExists(t, sock)
	ls, err = Listen(Config{Socket: sock, SocketMode: 0o600, Logger: quietLogger()})
	require.NoError(t, err)
	fi, err = os.Lstat(sock)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	require.NoError(t, ls[0].Close())
	assert.NoFileExists(t, sock, "closing removes the socket")

	// Not a socket: refused and left alone.
	file := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(file, []byte("keep"), 0o600))
	_, err = Listen(Config{Socket: file, Logger: quietLogger()})
	require.ErrorIs(t, err, ErrListen)
	assert.Contains(t, err.Error(), "not a socket")
	b, err := os.ReadFile(file)
	require.NoError(t, err)
	assert.Equal(t, "keep", string(b))
	require.NoError(t, os.Symlink(file, filepath.Join(dir, "link")))
	_, err = Listen(Config{Socket: filepath.Join(dir, "link"), Logger: quietLogger()})
	require.ErrorIs(t, err, ErrListen)
}

func TestListenConfig(t *testing.T) {
	for in, want := range map[string]string{
		":8080":          "127.0.0.1:8080",
		"127.0.0.1:0":    "127.0.0.1:0",
		"0.0.0.0:9000":   "0.0.0.0:9000",
		"[::1]:80":       "[::1]:80",
		"localhost:8443": "localhost:8443",
	} {
		got, err := TCPAddr(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, bad := range []string{"8080", "host", "1.2.3.4:", ""} {
		_, err := TCPAddr(bad)
		require.ErrorIs(t, err, ErrConfig, bad)
	}
	_, err := Listen(Config{Logger: quietLogger()})
	require.ErrorIs(t, err, ErrConfig)
	_, err = Listen(Config{Listen: "nope", Logger: quietLogger()})
	require.ErrorIs(t, err, ErrConfig)
	_, err = New(Config{})
	require.ErrorIs(t, err, ErrConfig)
	_, err = New(Config{Platform: samplePlatform(t), MaxQueue: -1})
	require.ErrorIs(t, err, ErrConfig)
	// Beyond the bound (the queue counts MaxQueue+1 in an int64: math.MaxInt64 would wrap).
	_, err = New(Config{Platform: samplePlatform(t), MaxQueue: MaxMaxQueue + 1})
	require.ErrorIs(t, err, ErrConfig)
	_, err = New(Config{Platform: samplePlatform(t), MaxQueue: math.MaxInt})
	require.ErrorIs(t, err, ErrConfig)
	_, err = New(Config{Platform: samplePlatform(t), SocketMode: 0o4777})
	require.ErrorIs(t, err, ErrConfig)
	s, err := New(Config{Platform: samplePlatform(t), Logger: quietLogger()})
	require.NoError(t, err)
	require.ErrorIs(t, s.Serve(context.Background()), ErrConfig)

	// ":0" listens on loopback only.
	ls, err := Listen(Config{Listen: ":0", Logger: quietLogger()})
	require.NoError(t, err)
	defer ls[0].Close()
	ip := ls[0].Addr().(*net.TCPAddr).IP
	assert.True(t, ip.IsLoopback(), "%v", ip)

	// A failing TCP listen leaves no socket behind.
	sock := filepath.Join(shortDir(t), "a.sock")
	_, err = Listen(Config{Socket: sock, Listen: ls[0].Addr().String(), Logger: quietLogger()})
	require.ErrorIs(t, err, ErrListen)
	assert.NoFileExists(t, sock)
}

// Bundle is the Go-level GET /v1/evidence.
func TestBundleAPI(t *testing.T) {
	s, err := New(Config{Platform: samplePlatform(t), Logger: quietLogger()})
	require.NoError(t, err)
	b, err := s.Bundle(context.Background(), "go-api")
	require.NoError(t, err)
	checkBinding(t, b, "go-api")
	for _, bad := range []string{"", strings.Repeat("n", MaxNonceLen+1), "\xff"} {
		_, err := s.Bundle(context.Background(), bad)
		require.Error(t, err)
	}
	// Through Handler (no connection marked by Serve): measurements are refused as on TCP.
	srv := httptest.NewServer(s.Handler())
	defer srv.Close()
	resp, err := http.Post(srv.URL+PathMeasurements, "application/json", strings.NewReader(`{"domain":"a","operation":"b","content":"c"}`))
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusForbidden, resp.StatusCode)
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Access logs name method, path, status, duration and the peer (with its credentials on the
// unix socket), never the query string (nonces).
func TestAccessLog(t *testing.T) {
	var buf syncBuffer
	h := start(t, Config{Platform: samplePlatform(t), Logger: slog.New(slog.NewJSONHandler(&buf, nil))})
	h.evidence(t, true, "secret-looking-nonce")
	h.evidence(t, false, "another-nonce")
	h.measure(t, evidence.Event{Domain: "example.com", Operation: "Log", Content: "c"})
	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(l), &m), l)
		if m["msg"] == "http request" {
			lines = append(lines, m)
		}
	}
	require.Len(t, lines, 3)
	for _, m := range lines {
		for _, k := range []string{"method", "path", "status", "duration", "peer", "bytes"} {
			assert.Contains(t, m, k)
		}
	}
	assert.Equal(t, "unix", lines[0]["peer"])
	assert.Equal(t, float64(os.Getuid()), lines[0]["peer_uid"])
	assert.Equal(t, float64(os.Getpid()), lines[0]["peer_pid"])
	assert.Contains(t, lines[1]["peer"], "127.0.0.1:")
	assert.NotContains(t, lines[1], "peer_uid")
	assert.Equal(t, PathMeasurements, lines[2]["path"])
	assert.NotContains(t, buf.String(), "secret-looking-nonce")
	assert.NotContains(t, buf.String(), "another-nonce")
	assert.Contains(t, buf.String(), `"msg":"measured through the API"`)
}

// A measurement past the agent's log capacity is 507: the log already holds
// evidence.MaxOwnRecords measurements, and one more would make the evidence unverifiable.
func TestMeasureLogFull(t *testing.T) {
	root, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
	var log []byte
	var r3 [48]byte
	for i := range evidence.MaxOwnRecords {
		ev := evidence.Event{Domain: "example.com", Operation: "Tick", Content: strconv.Itoa(i)}
		log = append(log, eventlog.EncodeAAEL(ev)...)
		r3 = rtmr.ExtendValue(r3, evidence.AAELDigest(ev))
	}
	require.NoError(t, os.MkdirAll(state, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(state, evidence.EventLogFile), log, 0o600))
	k := &rtmrtest.Kernel{Root: root, Sysfs: true}
	k.SetRTMR(3, r3)
	p, err := evidence.Open(context.Background(), evidence.Options{TEE: evidence.TEETDX, StateDir: state, Root: root, Kernel: k,
		TSM: evidencetest.TSM(fixture(t, "tdx/cos-113-tdx-quote.dat"), true, "tdx_guest")})
	require.NoError(t, err)
	t.Cleanup(func() { p.Close() })
	h := start(t, Config{Platform: p})
	r := h.do(t, true, "POST", PathMeasurements, "application/json", `{"domain":"a","operation":"b","content":"c"}`)
	require.Equal(t, http.StatusInsufficientStorage, r.status, "body %s", r.body)
	assert.Contains(t, r.errMsg(t), "event log full")
	assert.Equal(t, r3, k.RTMR(3))
}
