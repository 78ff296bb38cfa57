// Package kbc holds cai-agent's key broker clients: Confidential Containers Trustee (RCAR),
// Intel Trust Authority KBS v1, and an offline broker for development. Each proves the TEE
// with an injected evidence.Attester and returns the released secret.
//
// Implementations live in sub-packages (kbc/trustee, kbc/ita, kbc/offline); kbc/kbstest has
// faithful test servers for the network protocols and a conformance suite every client passes.
//
// Errors: every failure wraps exactly one of the sentinels below (errors.Is), except failures
// of the injected Attester, which are wrapped unchanged so that callers can tell "no evidence"
// from "the broker said no". Error strings never contain the secret.
package kbc

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"
)

// Client gets a secret from a key broker.
type Client interface {
	// GetResource returns the secret named by uri: a Trustee resource URI
	// (kbs:///repo/type/tag; the host part is ignored), an ITA key id, or an offline name.
	// The secret is never logged, and never appears in an error.
	GetResource(ctx context.Context, uri string) ([]byte, error)
}

// Sentinel errors shared by all clients.
var (
	// ErrRefused: the broker refused to release the secret — attestation or policy failure,
	// version mismatch, expired session (HTTP 401/403). Trustee also answers 401 for a
	// resource it does not have, so for Trustee an unknown resource is ErrRefused.
	ErrRefused = errors.New("key broker refused")
	// ErrNotFound: the broker (or offline store) has no such resource (HTTP 404).
	ErrNotFound = errors.New("resource not found")
	// ErrProtocol: the broker's answer is malformed — bad JSON, unexpected status, oversized
	// body, a JWE or wrapped key that does not decrypt or does not verify.
	ErrProtocol = errors.New("key broker protocol error")
	// ErrTransport: the broker could not be reached or failed — DNS, TCP, TLS (including an
	// unknown CA), timeout, HTTP 5xx — after the bounded retries.
	ErrTransport = errors.New("key broker unreachable")
	// ErrInvalidURI: the resource URI is not valid for the chosen client.
	ErrInvalidURI = errors.New("invalid resource URI")
	// ErrConfig: the client configuration is invalid (bad URL, http:// without the insecure
	// option, unreadable CA file).
	ErrConfig = errors.New("invalid key broker configuration")
)

// HTTPOptions configures the HTTP transport shared by the network clients.
//
// Defaults: TLS verified against the system roots; plain http:// refused; 30 s per request;
// 2 retries (3 attempts) of retryable steps with exponential backoff from 500 ms; responses
// larger than 4 MiB refused.
type HTTPOptions struct {
	// CAFile is a PEM bundle; when set, only these CAs are trusted (the system roots are not).
	CAFile string
	// RootCAs, when non-nil, is the trusted CA pool (takes precedence over CAFile).
	RootCAs *x509.CertPool
	// InsecureHTTP allows a plain http:// broker URL. Development and tests only: the
	// attestation still binds the key, but the host sees everything else.
	InsecureHTTP bool
	// Timeout bounds each HTTP request (connect, send, read the whole body). 0 = 30 s.
	Timeout time.Duration
	// Retries is how many times a retryable step (transport error, timeout, HTTP 5xx) is
	// retried. 0 = 2; negative = never.
	Retries int
	// RetryBackoff is the wait before the first retry, doubled each time (capped at 8×).
	// 0 = 500 ms.
	RetryBackoff time.Duration
	// MaxResponseBytes bounds every response body. 0 = 4 MiB.
	MaxResponseBytes int64
}

// Defaults returns o with zero fields replaced by their defaults.
func (o HTTPOptions) Defaults() HTTPOptions {
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	if o.Retries == 0 {
		o.Retries = 2
	}
	if o.Retries < 0 {
		o.Retries = 0
	}
	if o.RetryBackoff <= 0 {
		o.RetryBackoff = 500 * time.Millisecond
	}
	if o.MaxResponseBytes <= 0 {
		o.MaxResponseBytes = 4 << 20
	}
	return o
}

// CertPool returns the CA pool the options select: RootCAs, else the PEM bundle in CAFile,
// else nil (the system roots).
func (o HTTPOptions) CertPool() (*x509.CertPool, error) {
	if o.RootCAs != nil {
		return o.RootCAs, nil
	}
	if o.CAFile == "" {
		return nil, nil
	}
	pem, err := ReadSmallFile(o.CAFile, maxCAFile)
	if err != nil {
		return nil, fmt.Errorf("%w: CA file: %w", ErrConfig, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%w: CA file %s: no PEM certificate found", ErrConfig, o.CAFile)
	}
	return pool, nil
}

// maxCAFile bounds a CA bundle (the system bundles are about 200 KiB).
const maxCAFile = 4 << 20

// ReadSmallFile reads the regular file at path, of at most limit bytes: a CA bundle, a key
// or API key file. A FIFO or device is refused at once instead of blocking or reading forever
// (the open does not block); a larger file is refused (and what was read of it wiped). Every
// error is an *fs.PathError naming path (never the content); a caller that cannot rule out a
// secret pasted in place of the path reports its Err alone.
func ReadSmallFile(path string, limit int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, &fs.PathError{Op: "read", Path: path, Err: errors.New("not a regular file")}
	}
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		clear(b)
		return nil, err
	}
	if int64(len(b)) > limit {
		clear(b)
		return nil, &fs.PathError{Op: "read", Path: path, Err: fmt.Errorf("larger than %d bytes", limit)}
	}
	return b, nil
}

// WithoutPath returns err without the path it names, if it is an *fs.PathError (its Err, e.g.
// "no such file or directory"), else err: for errors about a file flag that may hold a secret
// pasted in place of a path (a key given as --key-file KEY would otherwise be repeated).
func WithoutPath(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// ResourcePath is a Trustee resource path: kbs:///<repo>/<type>/<tag>.
type ResourcePath struct {
	Repo, Type, Tag string
}

// String returns the canonical URI kbs:///repo/type/tag.
func (p ResourcePath) String() string { return "kbs:///" + p.Repo + "/" + p.Type + "/" + p.Tag }

// ParseResourceURI parses a Confidential Containers resource URI, kbs://[host[:port]]/repo/type/tag.
// As in CoCo, the host part is ignored (the broker URL is configured separately). The path
// must have exactly three non-empty segments of [A-Za-z0-9._-] (not "." or ".."); query and
// fragment are refused, as are the kbs+<plugin>:// forms (only the resource plugin is
// supported).
func ParseResourceURI(uri string) (ResourcePath, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return ResourcePath{}, fmt.Errorf("%w: %q: %v", ErrInvalidURI, uri, err)
	}
	if u.Scheme != "kbs" {
		if strings.HasPrefix(u.Scheme, "kbs+") {
			return ResourcePath{}, fmt.Errorf("%w: %q: only the resource plugin (kbs://) is supported", ErrInvalidURI, uri)
		}
		return ResourcePath{}, fmt.Errorf("%w: %q: want kbs:///repo/type/tag", ErrInvalidURI, uri)
	}
	if u.Opaque != "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil || u.RawPath != "" {
		return ResourcePath{}, fmt.Errorf("%w: %q: want kbs:///repo/type/tag without query, fragment, user or escapes", ErrInvalidURI, uri)
	}
	seg := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	if len(seg) != 3 {
		return ResourcePath{}, fmt.Errorf("%w: %q: want exactly three path segments repo/type/tag", ErrInvalidURI, uri)
	}
	for _, s := range seg {
		if !ValidSegment(s) {
			return ResourcePath{}, fmt.Errorf("%w: %q: bad path segment %q (allowed: A-Z a-z 0-9 . _ -, not . or ..)", ErrInvalidURI, uri, s)
		}
	}
	return ResourcePath{seg[0], seg[1], seg[2]}, nil
}

// ValidSegment reports whether s is a valid resource path segment: non-empty, at most 255
// bytes of [A-Za-z0-9._-], and not "." or "..".
func ValidSegment(s string) bool {
	if s == "" || s == "." || s == ".." || len(s) > 255 {
		return false
	}
	for _, c := range []byte(s) {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return false
		}
	}
	return true
}

// Sanitize makes peer-supplied text safe to put in an error: printable ASCII only, at most
// 300 bytes.
func Sanitize(s string) string {
	var b strings.Builder
	for _, r := range s {
		if b.Len() >= 300 {
			b.WriteString("…")
			break
		}
		if r >= 0x20 && r < 0x7f {
			b.WriteRune(r)
		} else {
			b.WriteByte('?')
		}
	}
	return b.String()
}
