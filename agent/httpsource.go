package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
	"github.com/cai-agent/cai-agent/kbc"
)

// HTTPOptions configure NewHTTPSource.
type HTTPOptions struct {
	// Client is the HTTP client to use; nil = a client with verified TLS (system roots, or
	// CAFile), ResponseHeaderTimeout and no redirects beyond Go's default of 10.
	Client *http.Client
	// CAFile, if set (and Client is nil), is a PEM bundle of the only CAs trusted for TLS.
	CAFile string
	// HeaderTimeout bounds the wait for each response's headers; 0 = 30 s. Bodies are not
	// time-bounded (a 40 GB shard takes a while); a stalled body is cut by IdleTimeout.
	HeaderTimeout time.Duration
	// IdleTimeout aborts (and then resumes) a body read that delivers nothing for this long;
	// 0 = 60 s.
	IdleTimeout time.Duration
	// Retries is how many times one object's transfer is retried (resumed with a Range
	// request) after a transport error, a stalled or cut body, a 5xx or a 429; 0 = 5, <0 = none.
	Retries int
	// Backoff is the first retry's delay, doubled each time up to 8 s; 0 = 250 ms.
	Backoff time.Duration
	// Header is sent with every request, e.g. "Authorization: Bearer …" for a private model
	// hub or bucket. A redirect to another origin (scheme, host and port; a hub's CDN, also a
	// subdomain) gets none of it, and no redirect gets a Referer (it would repeat the base
	// URL's query), so the credentials reach only the origin of the base URL. Header values
	// are never logged nor put in errors.
	Header http.Header
}

// HTTPSource is a modelcrypt.Source reading an encrypted model's objects from an http(s)
// base URL (object storage, a static file server, a model hub): object NAME is
// GET BASE/NAME; a query string in BASE (an Azure SAS token, say) is sent with every object,
// and is never logged nor put in errors. Nothing is written to disk; the decryptor authenticates every byte, so
// the server and the network are untrusted (plain http:// exposes only ciphertext and the
// public header).
//
// Transfers are resumable: a body that fails mid-stream is re-requested from the first
// byte not yet delivered with "Range: bytes=N-" (and "If-Range: <ETag>" when the server sent
// a strong ETag). A resumed response must be 206 with a Content-Range starting exactly at N
// and the same total length (and ETag), otherwise the read fails instead of splicing
// different objects. Failures wrap ErrSource; a 404 or 410 (no such object) also wraps
// fs.ErrNotExist, as a missing file of a DirSource does.
type HTTPSource struct {
	base    *url.URL
	header  http.Header
	client  *http.Client
	retries int
	backoff time.Duration
	idle    time.Duration
}

// NewHTTPSource returns the source for base, an http:// or https:// URL of the encrypted
// model's directory.
func NewHTTPSource(base string, o HTTPOptions) (*HTTPSource, error) {
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%w: source URL %q: want http(s)://host/path", ErrConfig, redactQuery(base))
	}
	if u.Fragment != "" {
		return nil, fmt.Errorf("%w: source URL %q: no fragment allowed", ErrConfig, redactQuery(base))
	}
	if !strings.HasSuffix(u.Path, "/") {
		u.Path += "/"
		u.RawPath = ""
	}
	s := &HTTPSource{base: u, header: o.Header.Clone(), client: o.Client, retries: o.Retries, backoff: o.Backoff, idle: o.IdleTimeout}
	if s.retries == 0 {
		s.retries = 5
	} else if s.retries < 0 {
		s.retries = 0
	}
	if s.backoff <= 0 {
		s.backoff = 250 * time.Millisecond
	}
	if s.idle <= 0 {
		s.idle = 60 * time.Second
	}
	if s.client == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.ResponseHeaderTimeout = o.HeaderTimeout
		if tr.ResponseHeaderTimeout <= 0 {
			tr.ResponseHeaderTimeout = 30 * time.Second
		}
		tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		// Ciphertext does not compress; and a transparently decompressed body breaks Range.
		tr.DisableCompression = true
		tr.MaxIdleConnsPerHost = 16
		tr.ReadBufferSize = 256 << 10
		if o.CAFile != "" {
			pool, err := kbc.HTTPOptions{CAFile: o.CAFile}.CertPool() // bounded, regular files only
			if err != nil {
				return nil, fmt.Errorf("%w: source CA file: %v", ErrConfig, err)
			}
			tr.TLSClientConfig.RootCAs = pool
		}
		s.client = &http.Client{Transport: tr}
	}
	c := *s.client // the caller's client is not modified
	c.CheckRedirect = s.checkRedirect(c.CheckRedirect)
	s.client = &c
	return s, nil
}

// checkRedirect wraps a client's redirect policy (nil = Go's default of 10 redirects) so that
// the base URL's credentials stay at its origin: Go's client would forward Authorization to
// the same host name on another port, to subdomains and over http://, every other header
// anywhere, and the previous URL with its query (a SAS) as the Referer.
func (s *HTTPSource) checkRedirect(next func(*http.Request, []*http.Request) error) func(*http.Request, []*http.Request) error {
	return func(req *http.Request, via []*http.Request) error {
		if next != nil {
			if err := next(req, via); err != nil {
				return err
			}
		} else if len(via) >= 10 {
			return errors.New("stopped after 10 redirects")
		}
		req.Header.Del("Referer")
		if req.URL.Scheme != s.base.Scheme || !strings.EqualFold(req.URL.Host, s.base.Host) {
			for k := range s.header {
				delete(req.Header, k) // as given (Go copies keys as they are)
				req.Header.Del(k)
			}
		}
		return nil
	}
}

// URL returns the URL of object name (with the base URL's query, if any).
func (s *HTTPSource) URL(name string) (string, error) {
	if err := modelcrypt.ValidPath(name); err != nil {
		return "", fmt.Errorf("%w: object name %q: %v", ErrSource, name, err)
	}
	segs := strings.Split(name, "/")
	for i, p := range segs {
		segs[i] = url.PathEscape(p)
	}
	return s.base.JoinPath(segs...).String(), nil
}

// Open implements modelcrypt.Source.
func (s *HTTPSource) Open(ctx context.Context, name string, off int64) (io.ReadCloser, error) {
	if off < 0 {
		return nil, fmt.Errorf("%w: %s: negative offset", ErrSource, name)
	}
	u, err := s.URL(name)
	if err != nil {
		return nil, err
	}
	r := &httpReader{s: s, ctx: ctx, name: name, url: u, pos: off, total: -1}
	if err := r.connect(true); err != nil {
		return nil, err
	}
	return r, nil
}

type httpReader struct {
	s     *HTTPSource
	ctx   context.Context
	name  string
	url   string
	pos   int64 // next byte offset of the object to deliver
	total int64 // object size, -1 if unknown
	etag  string
	body  io.ReadCloser
	tries int
	err   error
}

// retryable marks a failure worth another attempt.
type retryable struct{ error }

func (e retryable) Unwrap() error { return e.error }

// connect (re)issues the request for [pos, end), retrying with backoff.
func (r *httpReader) connect(first bool) error {
	for {
		err := r.request(first)
		if err == nil {
			return nil
		}
		var re retryable
		if !errors.As(err, &re) || r.tries >= r.s.retries || r.ctx.Err() != nil {
			if r.ctx.Err() != nil {
				return fmt.Errorf("%w: %s: %w", ErrSource, r.name, r.ctx.Err())
			}
			return err
		}
		r.tries++
		d := r.s.backoff << (r.tries - 1)
		if d > 8*time.Second || d <= 0 {
			d = 8 * time.Second
		}
		select {
		case <-r.ctx.Done():
			return fmt.Errorf("%w: %s: %w", ErrSource, r.name, r.ctx.Err())
		case <-time.After(d):
		}
	}
}

func (r *httpReader) request(first bool) error {
	ctx, cancel := context.WithCancel(r.ctx)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.url, nil)
	if err != nil {
		cancel()
		return fmt.Errorf("%w: %s: %v", ErrSource, r.name, err)
	}
	for k, vs := range r.s.header {
		req.Header[k] = vs
	}
	req.Header.Set("Accept-Encoding", "identity")
	if r.pos > 0 {
		req.Header.Set("Range", "bytes="+strconv.FormatInt(r.pos, 10)+"-")
		if r.etag != "" {
			req.Header.Set("If-Range", r.etag)
		}
	}
	resp, err := r.s.client.Do(req)
	if err != nil {
		cancel()
		if r.ctx.Err() != nil {
			return fmt.Errorf("%w: %s: %w", ErrSource, r.name, r.ctx.Err())
		}
		var ue *url.Error // its text repeats the URL, query included
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return retryable{fmt.Errorf("%w: GET %s: %v", ErrSource, redactQuery(r.url), err)}
	}
	fail := func(retry bool, format string, a ...any) error {
		resp.Body.Close()
		cancel()
		e := fmt.Errorf("%w: GET %s: %s", ErrSource, redactQuery(r.url), fmt.Sprintf(format, a...))
		if retry {
			return retryable{e}
		}
		return e
	}
	switch {
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone:
		// As from a directory: a missing model.cai is "not a model", a missing shard object
		// is a corrupt (truncated) model.
		resp.Body.Close()
		cancel()
		return fmt.Errorf("%w: GET %s: %s (no such object): %w", ErrSource, redactQuery(r.url), resp.Status, fs.ErrNotExist)
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests:
		return fail(true, "%s", resp.Status)
	case r.pos == 0 && resp.StatusCode == http.StatusOK:
		r.total = resp.ContentLength
	case r.pos > 0 && resp.StatusCode == http.StatusPartialContent:
		start, total, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok || start != r.pos {
			return fail(false, "206 with Content-Range %q, want a range starting at %d", resp.Header.Get("Content-Range"), r.pos)
		}
		if !first && r.total >= 0 && total >= 0 && total != r.total {
			return fail(false, "object changed size during the transfer (%d → %d bytes)", r.total, total)
		}
		r.total = total
	case r.pos > 0 && resp.StatusCode == http.StatusOK:
		if !first {
			return fail(false, "object changed during the transfer (server answered the resume with the whole object)")
		}
		return fail(false, "server ignores Range requests (200 for bytes=%d-); resumable transfers need 206", r.pos)
	default:
		return fail(false, "unexpected %s", resp.Status)
	}
	etag := resp.Header.Get("ETag")
	if !first && r.etag != "" && etag != "" && etag != r.etag {
		return fail(false, "object changed during the transfer (ETag %s → %s)", r.etag, etag)
	}
	if strings.HasPrefix(etag, `"`) { // strong validators only for If-Range
		r.etag = etag
	}
	r.body = &cancelBody{ReadCloser: resp.Body, cancel: cancel}
	return nil
}

type cancelBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (b *cancelBody) Close() error { err := b.ReadCloser.Close(); b.cancel(); return err }

func (r *httpReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	for {
		if r.body == nil {
			if err := r.connect(false); err != nil {
				r.err = err
				return 0, err
			}
		}
		n, err := r.readIdle(p)
		r.pos += int64(n)
		if n > 0 {
			r.tries = 0 // progress resets the retry budget
		}
		if err == nil {
			return n, nil
		}
		if err == io.EOF && (r.total < 0 || r.pos == r.total) {
			r.err = io.EOF
			return n, io.EOF
		}
		if err == io.EOF && r.pos > r.total {
			r.err = fmt.Errorf("%w: %s: server sent more than the %d bytes announced", ErrSource, r.name, r.total)
			return n, r.err
		}
		// Cut or stalled body: resume from r.pos.
		r.body.Close()
		r.body = nil
		if r.ctx.Err() != nil {
			r.err = fmt.Errorf("%w: %s: %w", ErrSource, r.name, r.ctx.Err())
			return n, r.err
		}
		if r.tries >= r.s.retries {
			r.err = fmt.Errorf("%w: %s: transfer failed at byte %d: %v", ErrSource, r.name, r.pos, err)
			return n, r.err
		}
		r.tries++
		if n > 0 {
			return n, nil
		}
	}
}

// readIdle reads from the body, aborting it when nothing arrives for the idle timeout.
func (r *httpReader) readIdle(p []byte) (int, error) {
	body := r.body.(*cancelBody)
	t := time.AfterFunc(r.s.idle, body.cancel)
	n, err := body.Read(p)
	// A body that ended as the timer fired has still ended: io.EOF stays io.EOF.
	if !t.Stop() && err != nil && err != io.EOF {
		err = fmt.Errorf("no data for %v: %w", r.s.idle, err)
	}
	return n, err
}

func (r *httpReader) Close() error {
	if r.body != nil {
		r.body.Close()
		r.body = nil
	}
	if r.err == nil {
		r.err = errors.New("read after close")
	}
	return nil
}

// parseContentRange parses "bytes START-END/TOTAL" (TOTAL may be "*", returned as -1).
func parseContentRange(v string) (start, total int64, ok bool) {
	rest, found := strings.CutPrefix(v, "bytes ")
	if !found {
		return 0, 0, false
	}
	rng, tot, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	a, b, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, false
	}
	start, err1 := strconv.ParseInt(a, 10, 64)
	end, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || start < 0 || end < start {
		return 0, 0, false
	}
	total = -1
	if tot != "*" {
		t, err := strconv.ParseInt(tot, 10, 64)
		if err != nil || t <= end {
			return 0, 0, false
		}
		total = t
	}
	return start, total, true
}

// redactQuery drops everything from the first '?' or '#' (it may hold a signature) and any
// userinfo.
func redactQuery(s string) string {
	if i := strings.IndexAny(s, "?#"); i >= 0 {
		s = s[:i] + "?…"
	}
	if u, err := url.Parse(s); err == nil && u.User != nil {
		u.User = nil
		return u.String()
	}
	return s
}
