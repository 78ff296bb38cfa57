// Package httpc is the HTTP transport of the network key broker clients: TLS verified by
// default, http:// only when allowed, per-request timeouts, bounded retries with backoff,
// bounded response bodies, no redirects, context cancellation.
package httpc

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/cai-agent/cai-agent/kbc"
)

// Client sends requests to one broker.
type Client struct {
	Base *url.URL
	hc   *http.Client
	opts kbc.HTTPOptions
}

// New returns a Client for the broker at base. jar may be nil.
func New(base string, opts kbc.HTTPOptions, jar http.CookieJar) (*Client, error) {
	opts = opts.Defaults()
	u, err := url.Parse(base)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("%w: broker URL does not parse as https://host[:port][/prefix]", kbc.ErrConfig)
	}
	// Messages show the URL without what may be secret: user info, query, fragment.
	shown := (&url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}).String()
	switch u.Scheme {
	case "https":
	case "http":
		if !opts.InsecureHTTP {
			return nil, fmt.Errorf("%w: broker URL %q is plain http; refusing without the insecure-http option", kbc.ErrConfig, shown)
		}
	default:
		return nil, fmt.Errorf("%w: broker URL %q: scheme must be https (or http with the insecure-http option)", kbc.ErrConfig, shown)
	}
	if u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return nil, fmt.Errorf("%w: broker URL %q must not have a query, fragment or user info", kbc.ErrConfig, shown)
	}
	u.Path = strings.TrimRight(u.Path, "/")
	pool, err := opts.CertPool()
	if err != nil {
		return nil, err
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}
	tr.Proxy = http.ProxyFromEnvironment
	// Short idle timeout: Actix (Trustee) drops idle connections after 5 s.
	tr.IdleConnTimeout = 4 * time.Second
	hc := &http.Client{
		Transport: tr,
		Jar:       jar,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
	return &Client{Base: u, hc: hc, opts: opts}, nil
}

// Response is a complete, size-bounded HTTP response.
type Response struct {
	Status int
	Header http.Header
	Body   []byte
}

// Request is one HTTP request. Retry marks steps that may be repeated: a transport error, a
// timeout or a 5xx answer is then retried with backoff, up to the configured bound.
type Request struct {
	Method string
	Path   string // appended to the base URL's path
	Header http.Header
	Body   []byte
	Retry  bool
}

// Do sends r and returns the response (any status). Errors wrap kbc.ErrTransport (network,
// TLS, timeout, or still 5xx after retries — then the last response is returned too),
// kbc.ErrProtocol (body too large) or the context's error.
func (c *Client) Do(ctx context.Context, r Request) (*Response, error) {
	attempts := 1
	if r.Retry {
		attempts += c.opts.Retries
	}
	backoff := c.opts.RetryBackoff
	var lastErr error
	var last *Response
	for i := 0; i < attempts; i++ {
		if i > 0 {
			slog.Debug("kbc: retrying", "method", r.Method, "path", r.Path, "attempt", i+1, "err", lastErr)
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil, ctx.Err()
			case <-t.C:
			}
			if backoff < 8*c.opts.RetryBackoff {
				backoff *= 2
			}
		}
		resp, err := c.once(ctx, r)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if err != nil {
			if errors.Is(err, kbc.ErrProtocol) {
				return nil, err
			}
			lastErr, last = err, nil
			continue
		}
		if resp.Status >= 500 {
			lastErr, last = fmt.Errorf("%w: %s %s: HTTP %d", kbc.ErrTransport, r.Method, c.redacted(r.Path), resp.Status), resp
			continue
		}
		return resp, nil
	}
	if last != nil {
		return last, lastErr
	}
	return nil, lastErr
}

// redacted is the request URL for messages: scheme, host and path, never userinfo or a query.
func (c *Client) redacted(p string) string {
	return c.Base.Scheme + "://" + c.Base.Host + c.Base.Path + p
}

func (c *Client) once(ctx context.Context, r Request) (*Response, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	var body io.Reader
	if r.Body != nil {
		body = bytes.NewReader(r.Body)
	}
	u := *c.Base
	u.Path += r.Path
	req, err := http.NewRequestWithContext(ctx, r.Method, u.String(), body)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", kbc.ErrConfig, err)
	}
	for k, v := range r.Header {
		req.Header[k] = v
	}
	req.Header.Set("User-Agent", "cai-agent")
	resp, err := c.hc.Do(req)
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, fmt.Errorf("%w: %s %s: timed out after %v", kbc.ErrTransport, r.Method, c.redacted(r.Path), c.opts.Timeout)
		}
		return nil, fmt.Errorf("%w: %s %s: %v", kbc.ErrTransport, r.Method, c.redacted(r.Path), stripURL(err))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, c.opts.MaxResponseBytes+1))
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, fmt.Errorf("%w: %s %s: timed out reading the response after %v", kbc.ErrTransport, r.Method, c.redacted(r.Path), c.opts.Timeout)
		}
		return nil, fmt.Errorf("%w: %s %s: reading response: %v", kbc.ErrTransport, r.Method, c.redacted(r.Path), err)
	}
	if int64(len(b)) > c.opts.MaxResponseBytes {
		return nil, fmt.Errorf("%w: %s %s: response body exceeds %d bytes", kbc.ErrProtocol, r.Method, c.redacted(r.Path), c.opts.MaxResponseBytes)
	}
	return &Response{Status: resp.StatusCode, Header: resp.Header, Body: b}, nil
}

// stripURL removes the url.Error wrapper (which repeats the URL) but keeps the cause.
func stripURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// Detail summarizes an error response body for an error message: Trustee's
// {"type","detail"}, the ITA KBS's {"error"}, or any text, sanitized.
func Detail(b []byte) string {
	s := strings.TrimSpace(string(b))
	if s == "" {
		return "(empty body)"
	}
	return kbc.Sanitize(s)
}
