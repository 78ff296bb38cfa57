package agent

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
)

// objectServer serves the files of dir like a static server / object store (Range, ETag),
// and can misbehave.
type objectServer struct {
	dir string
	// cutAfter, if > 0, aborts the connection after this many body bytes on the first
	// cuts requests of every object.
	cutAfter int
	cuts     int
	// onResume, if set, may alter a Range request's response (return true if handled).
	onResume func(w http.ResponseWriter, r *http.Request) bool
	status   []int // answered (in order) before serving normally

	mu       sync.Mutex
	requests map[string]int
	ranges   []string
	statusN  atomic.Int32
}

func (s *objectServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	name := strings.TrimPrefix(path.Clean(r.URL.Path), "/m/")
	s.mu.Lock()
	if s.requests == nil {
		s.requests = map[string]int{}
	}
	s.requests[name]++
	n := s.requests[name]
	if rg := r.Header.Get("Range"); rg != "" {
		s.ranges = append(s.ranges, name+" "+rg+" "+r.Header.Get("If-Range"))
	}
	s.mu.Unlock()
	if i := int(s.statusN.Add(1)) - 1; i < len(s.status) {
		http.Error(w, "busy", s.status[i])
		return
	}
	if r.Header.Get("Range") != "" && s.onResume != nil && s.onResume(w, r) {
		return
	}
	b, err := os.ReadFile(filepath.Join(s.dir, filepath.FromSlash(name)))
	if err != nil {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("ETag", fmt.Sprintf(`"%x-%d"`, len(b), len(name)))
	var ww http.ResponseWriter = w
	if s.cutAfter > 0 && n <= s.cuts {
		ww = &cutWriter{ResponseWriter: w, left: s.cutAfter}
	}
	http.ServeContent(ww, r, name, time.Time{}, bytes.NewReader(b))
}

// cutWriter aborts the connection (the client sees a short body) after left bytes.
type cutWriter struct {
	http.ResponseWriter
	left int
}

func (c *cutWriter) Write(p []byte) (int, error) {
	if len(p) > c.left {
		c.ResponseWriter.Write(p[:c.left])
		c.ResponseWriter.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	}
	c.left -= len(p)
	return c.ResponseWriter.Write(p)
}

func httpSource(t *testing.T, url string, o HTTPOptions) *HTTPSource {
	t.Helper()
	if o.Backoff == 0 {
		o.Backoff = time.Millisecond
	}
	s, err := NewHTTPSource(url, o)
	require.NoError(t, err)
	return s
}

func TestHTTPSourceResumesCutTransfers(t *testing.T) {
	dir, key, plain := testModel(t, 300<<10)
	srv := &objectServer{dir: dir, cutAfter: 10000, cuts: 2}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	out := t.TempDir()
	res, err := Run(context.Background(), Config{
		Source: httpSource(t, ts.URL+"/m", HTTPOptions{}), Out: out, Evidence: &fakeTEE{}, Broker: &fakeBroker{key: key},
		AllowNonTmpfs: true, Workers: 2,
	})
	require.NoError(t, err)
	requirePublished(t, out, plain)
	require.Equal(t, 3, res.Files)
	srv.mu.Lock()
	defer srv.mu.Unlock()
	require.NotEmpty(t, srv.ranges)
	for _, r := range srv.ranges {
		require.Contains(t, r, `bytes=`)
		require.Contains(t, r, `"`, "If-Range with the strong ETag: %s", r)
	}
	// Every object was requested more than once (cut twice, then resumed).
	for name, n := range srv.requests {
		if n == 1 {
			fi, err := os.Stat(filepath.Join(dir, name))
			require.NoError(t, err)
			require.LessOrEqual(t, fi.Size(), int64(10000), "%s was not cut", name)
		}
	}
}

func TestHTTPSourceReadResume(t *testing.T) {
	dir := t.TempDir()
	data := bytes.Repeat([]byte("0123456789abcdef"), 20000)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "obj"), data, 0o644))
	srv := &objectServer{dir: dir, cutAfter: 7777, cuts: 3}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	s := httpSource(t, ts.URL+"/m/", HTTPOptions{})
	for _, off := range []int64{0, 12345} {
		rc, err := s.Open(context.Background(), "obj", off)
		require.NoError(t, err)
		got, err := io.ReadAll(rc)
		require.NoError(t, err)
		require.NoError(t, rc.Close())
		require.True(t, bytes.Equal(data[off:], got), "offset %d", off)
	}
}

func TestHTTPSourceRefusesChangedObject(t *testing.T) {
	dir := t.TempDir()
	data := bytes.Repeat([]byte("x"), 100000)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "obj"), data, 0o644))
	for name, resume := range map[string]func(w http.ResponseWriter, r *http.Request) bool{
		"whole object on resume": func(w http.ResponseWriter, r *http.Request) bool {
			w.Write(data) // 200: If-Range did not match
			return true
		},
		"wrong start": func(w http.ResponseWriter, r *http.Request) bool {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 0-%d/%d", len(data)-1, len(data)))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(data)
			return true
		},
		"other size": func(w http.ResponseWriter, r *http.Request) bool {
			var start int
			fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-", &start)
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, len(data), len(data)+1))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(data[start:])
			return true
		},
	} {
		t.Run(name, func(t *testing.T) {
			ts := httptest.NewServer(&objectServer{dir: dir, cutAfter: 5000, cuts: 1, onResume: resume})
			defer ts.Close()
			rc, err := httpSource(t, ts.URL+"/m", HTTPOptions{}).Open(context.Background(), "obj", 0)
			require.NoError(t, err)
			defer rc.Close()
			_, err = io.ReadAll(rc)
			require.ErrorIs(t, err, ErrSource)
		})
	}
}

func TestHTTPSourceStatus(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "obj"), []byte("hello"), 0o644))

	// 503 and 429 are retried.
	srv := &objectServer{dir: dir, status: []int{503, 429}}
	ts := httptest.NewServer(srv)
	rc, err := httpSource(t, ts.URL+"/m", HTTPOptions{}).Open(context.Background(), "obj", 0)
	require.NoError(t, err)
	b, _ := io.ReadAll(rc)
	rc.Close()
	require.Equal(t, "hello", string(b))
	ts.Close()

	// Out of retries.
	srv = &objectServer{dir: dir, status: []int{500, 500, 500}}
	ts = httptest.NewServer(srv)
	_, err = httpSource(t, ts.URL+"/m", HTTPOptions{Retries: 2}).Open(context.Background(), "obj", 0)
	require.ErrorIs(t, err, ErrSource)
	require.Contains(t, err.Error(), "500")
	ts.Close()

	// 404 is not retried.
	srv = &objectServer{dir: dir}
	ts = httptest.NewServer(srv)
	defer ts.Close()
	_, err = httpSource(t, ts.URL+"/m", HTTPOptions{}).Open(context.Background(), "nothing", 0)
	require.ErrorIs(t, err, ErrSource)
	require.ErrorIs(t, err, fs.ErrNotExist) // as from a DirSource
	require.Equal(t, 1, srv.requests["nothing"])

	// A server that ignores Range cannot serve an offset.
	ts2 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("hello")) }))
	defer ts2.Close()
	_, err = httpSource(t, ts2.URL, HTTPOptions{}).Open(context.Background(), "obj", 2)
	require.ErrorIs(t, err, ErrSource)

	_, err = httpSource(t, ts.URL, HTTPOptions{}).Open(context.Background(), "../etc/passwd", 0)
	require.ErrorIs(t, err, ErrSource)
	for _, bad := range []string{"ftp://x/", "http://", "https://h/p?sig=secret#frag", "/local"} {
		_, err := NewHTTPSource(bad, HTTPOptions{})
		require.ErrorIs(t, err, ErrConfig, bad)
		require.NotContains(t, err.Error(), "sig=secret")
	}
}

// Private storage: the base URL's query (a SAS token) goes with every object and the extra
// headers (a bearer token) with every request, including resumed ones; neither appears in
// errors; and a redirect to another host (a hub's CDN) does not carry the Authorization.
func TestHTTPSourceCredentials(t *testing.T) {
	dir, key, plain := testModel(t, 300<<10)
	var mu sync.Mutex
	var seen []string
	cdn := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, "cdn "+r.Header.Get("Authorization"))
		mu.Unlock()
		http.ServeFile(w, r, filepath.Join(dir, path.Base(r.URL.Path)))
	}))
	defer cdn.Close()
	objects := &objectServer{dir: dir, cutAfter: 50 << 10, cuts: 1}
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, "origin "+r.Header.Get("Authorization")+" "+r.URL.RawQuery)
		mu.Unlock()
		if r.URL.Query().Get("sig") != "s3cr3t" || r.Header.Get("Authorization") != "Bearer tok3n" {
			http.Error(w, "denied", http.StatusForbidden)
			return
		}
		if strings.HasSuffix(r.URL.Path, "model.cai") {
			// Another host name (the same loopback server): like a hub's CDN.
			http.Redirect(w, r, strings.Replace(cdn.URL, "127.0.0.1", "localhost", 1)+"/cdn/model.cai", http.StatusFound)
			return
		}
		objects.ServeHTTP(w, r)
	}))
	defer origin.Close()

	hdr := http.Header{"Authorization": {"Bearer tok3n"}}
	out := t.TempDir()
	_, err := Run(context.Background(), Config{Source: httpSource(t, origin.URL+"/m/?sv=1&sig=s3cr3t", HTTPOptions{Header: hdr}),
		Out: out, Evidence: &fakeTEE{}, Broker: &fakeBroker{key: key}, AllowNonTmpfs: true})
	require.NoError(t, err)
	requirePublished(t, out, plain)
	require.NotEmpty(t, objects.ranges, "a cut transfer was resumed")
	require.Contains(t, seen, "cdn ", "the header object came through the redirect")
	for _, s := range seen {
		if strings.HasPrefix(s, "origin ") {
			require.Equal(t, "origin Bearer tok3n sv=1&sig=s3cr3t", s)
		} else {
			require.Equal(t, "cdn ", s, "the credential does not follow a redirect to another host")
		}
	}

	// Refused without the token; the error names the object but not the signature.
	_, err = httpSource(t, origin.URL+"/m?sig=s3cr3t", HTTPOptions{}).Open(context.Background(), "model.cai", 0)
	require.ErrorIs(t, err, ErrSource)
	require.Contains(t, err.Error(), "403")
	require.NotContains(t, err.Error(), "s3cr3t")
	// Nor when the server is unreachable (net/http's own error repeats the URL).
	gone := httptest.NewServer(http.NotFoundHandler())
	gone.Close()
	_, err = httpSource(t, gone.URL+"/m?sig=s3cr3t", HTTPOptions{Retries: -1}).Open(context.Background(), "model.cai", 0)
	require.ErrorIs(t, err, ErrSource)
	require.NotContains(t, err.Error(), "s3cr3t")
}

func TestHTTPSourceUnreachableAndTampered(t *testing.T) {
	dir, key, plain := testModel(t, 100<<10)
	ts := httptest.NewServer(&objectServer{dir: dir})
	url := ts.URL
	ts.Close()
	out := t.TempDir()
	_, err := Run(context.Background(), Config{Source: httpSource(t, url+"/m", HTTPOptions{Retries: 1}), Out: out, Evidence: &fakeTEE{}, Broker: &fakeBroker{key: key}, AllowNonTmpfs: true})
	var se *StepError
	require.ErrorAs(t, err, &se)
	require.Equal(t, StepOpenModel, se.Step)
	require.ErrorIs(t, err, ErrSource)
	requireNothingPublished(t, out, plain)

	// Tampered in transit: the decryptor refuses it, nothing is published.
	tampered := filepath.Join(t.TempDir(), "t")
	require.NoError(t, os.CopyFS(tampered, os.DirFS(dir)))
	shards, err := filepath.Glob(filepath.Join(tampered, "*.shard"))
	require.NoError(t, err)
	shard := shards[0]
	for _, s := range shards {
		if a, b := fileSize(t, s), fileSize(t, shard); a > b {
			shard = s
		}
	}
	b, err := os.ReadFile(shard)
	require.NoError(t, err)
	b[100] ^= 1
	require.NoError(t, os.WriteFile(shard, b, 0o644))
	ts = httptest.NewServer(&objectServer{dir: tampered})
	defer ts.Close()
	_, err = Run(context.Background(), Config{Source: httpSource(t, ts.URL+"/m", HTTPOptions{}), Out: out, Evidence: &fakeTEE{}, Broker: &fakeBroker{key: key}, AllowNonTmpfs: true})
	require.ErrorIs(t, err, modelcrypt.ErrCorrupt)
	requireNothingPublished(t, out, plain)
}

func TestHTTPSourceTLS(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "obj"), []byte("hello"), 0o644))
	ts := httptest.NewTLSServer(&objectServer{dir: dir})
	defer ts.Close()
	// Not trusted by default.
	_, err := httpSource(t, ts.URL+"/m", HTTPOptions{Retries: -1}).Open(context.Background(), "obj", 0)
	require.ErrorIs(t, err, ErrSource)
	require.Contains(t, err.Error(), "certificate")
	// Trusted with its CA.
	ca := filepath.Join(t.TempDir(), "ca.pem")
	require.NoError(t, os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ts.Certificate().Raw}), 0o644))
	rc, err := httpSource(t, ts.URL+"/m", HTTPOptions{CAFile: ca}).Open(context.Background(), "obj", 0)
	require.NoError(t, err)
	b, _ := io.ReadAll(rc)
	rc.Close()
	require.Equal(t, "hello", string(b))
}

func TestHTTPSourceCancel(t *testing.T) {
	block := make(chan struct{})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.Write([]byte("partial"))
		w.(http.Flusher).Flush()
		select {
		case <-block:
		case <-r.Context().Done():
		}
	}))
	defer ts.Close()
	defer close(block)
	ctx, cancel := context.WithCancel(context.Background())
	rc, err := httpSource(t, ts.URL, HTTPOptions{}).Open(ctx, "obj", 0)
	require.NoError(t, err)
	defer rc.Close()
	go func() { time.Sleep(50 * time.Millisecond); cancel() }()
	_, err = io.ReadAll(rc)
	require.True(t, errors.Is(err, context.Canceled), "%v", err)
}

func TestHTTPSourceResumesStalledBody(t *testing.T) {
	data := bytes.Repeat([]byte("abcdefgh"), 10000)
	var n atomic.Int32
	release := make(chan struct{})
	defer close(release)
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) == 1 {
			w.Header().Set("Content-Length", strconv.Itoa(len(data)))
			w.Write(data[:1000])
			w.(http.Flusher).Flush()
			select { // stall
			case <-release:
			case <-r.Context().Done():
			}
			return
		}
		http.ServeContent(w, r, "obj", time.Time{}, bytes.NewReader(data))
	}))
	defer ts.Close()
	rc, err := httpSource(t, ts.URL, HTTPOptions{IdleTimeout: 100 * time.Millisecond}).Open(context.Background(), "obj", 0)
	require.NoError(t, err)
	defer rc.Close()
	got, err := io.ReadAll(rc)
	require.NoError(t, err)
	require.True(t, bytes.Equal(data, got))
	require.EqualValues(t, 2, n.Load())
}
