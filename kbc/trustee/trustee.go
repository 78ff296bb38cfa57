// Package trustee is a client of the Confidential Containers Trustee KBS, RCAR protocol
// 0.4.0 (the attestation and resource API of /kbs/v0).
//
// One GetResource does, as guest-components' kbs_protocol does:
//
//	POST /kbs/v0/auth    {"version","tee","extra-params":{"supported-hash-algorithms":[…]}}
//	                     → {"nonce","extra-params"} + cookie kbs-session-id
//	POST /kbs/v0/attest  {"init-data":null,
//	                      "runtime-data":{"nonce":<nonce verbatim>,"tee-pubkey":<JWK>},
//	                      "tee-evidence":{"primary_evidence":…,"additional_evidence":""}}
//	                     → {"token":…}
//	GET  /kbs/v0/resource/<repo>/<type>/<tag> → flattened JWE addressed to the tee-pubkey
//
// The evidence binds REPORTDATA = H(JCS({"additional-evidence":"","nonce","tee-pubkey"})) ‖
// zero padding (see ReportData), H being the server's selected-hash-algorithm (default
// sha384). primary_evidence is {"cc_eventlog": <std b64>|null, "quote": <std b64>} for TDX
// and the sample quote document itself for the sample TEE. A 401 on the resource redoes the
// handshake (bounded). The attestation token is kept only as an opaque string; the session
// cookie authorizes the GET.
package trustee

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"strings"
	"sync"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/kbc"
	"github.com/cai-agent/cai-agent/kbc/internal/httpc"
)

// DefaultVersion is the RCAR protocol version spoken by current Trustee and guest-components.
// Trustee demands an exact match.
const DefaultVersion = "0.4.0"

// SessionCookie is the name of Trustee's session cookie.
const SessionCookie = "kbs-session-id"

// ErrorTypePrefix prefixes the "type" of Trustee's ErrorInformation bodies.
const ErrorTypePrefix = "https://github.com/confidential-containers/kbs/errors/"

// Options configures a Client.
type Options struct {
	// URL is the KBS base URL, e.g. https://kbs.example:8080 (the /kbs/v0 API is below it).
	URL string
	// Attester produces the evidence (required).
	Attester evidence.Attester
	// Version is the RCAR protocol version sent; "" = DefaultVersion.
	Version string
	// KeyAlgorithm of the ephemeral TEE key: AlgECDHES (default) or AlgRSAOAEP256.
	KeyAlgorithm string
	// MaxHandshakes bounds how many times one GetResource runs the handshake (a 401 on the
	// resource triggers a new one). 0 = 3.
	MaxHandshakes int
	// HTTP configures TLS, timeouts, retries and size limits.
	HTTP kbc.HTTPOptions
}

// Client is a Trustee RCAR client. It keeps one ephemeral TEE key (generated on first use)
// and the session cookie; its methods are safe for concurrent use (requests are serialized).
type Client struct {
	opts Options
	http *httpc.Client

	mu       sync.Mutex
	key      *teeKey
	attested bool
}

var _ kbc.Client = (*Client)(nil)

// New checks opts and returns a Client. No request is sent.
func New(opts Options) (*Client, error) {
	if opts.Attester == nil {
		return nil, fmt.Errorf("%w: trustee: no attester", kbc.ErrConfig)
	}
	if opts.Version == "" {
		opts.Version = DefaultVersion
	}
	if opts.KeyAlgorithm == "" {
		opts.KeyAlgorithm = AlgECDHES
	}
	if opts.KeyAlgorithm != AlgECDHES && opts.KeyAlgorithm != AlgRSAOAEP256 {
		return nil, fmt.Errorf("%w: trustee: unsupported TEE key algorithm %q (want %s or %s)", kbc.ErrConfig, opts.KeyAlgorithm, AlgECDHES, AlgRSAOAEP256)
	}
	if opts.MaxHandshakes <= 0 {
		opts.MaxHandshakes = 3
	}
	jar, err := cookiejar.New(nil)
	if err != nil {
		return nil, err
	}
	hc, err := httpc.New(opts.URL, opts.HTTP, jar)
	if err != nil {
		return nil, err
	}
	return &Client{opts: opts, http: hc}, nil
}

// GetResource implements kbc.Client for kbs:///repo/type/tag URIs.
func (c *Client) GetResource(ctx context.Context, uri string) ([]byte, error) {
	rp, err := kbc.ParseResourceURI(uri)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.key == nil {
		if c.key, err = newTEEKey(c.opts.KeyAlgorithm); err != nil {
			return nil, err
		}
	}
	path := "/kbs/v0/resource/" + rp.Repo + "/" + rp.Type + "/" + rp.Tag
	handshakes := 0
	for {
		if !c.attested {
			if handshakes == c.opts.MaxHandshakes {
				return nil, fmt.Errorf("%w: trustee: GET %s still unauthorized after %d handshakes", kbc.ErrRefused, path, handshakes)
			}
			handshakes++
			if err := c.handshake(ctx); err != nil {
				return nil, err
			}
		}
		resp, err := c.http.Do(ctx, httpc.Request{Method: http.MethodGet, Path: path, Retry: true})
		if err != nil {
			return nil, fmt.Errorf("trustee: %w", err)
		}
		switch resp.Status {
		case http.StatusOK:
			secret, err := c.key.Decrypt(resp.Body)
			if err != nil {
				return nil, fmt.Errorf("trustee: GET %s: %w", path, err)
			}
			slog.Debug("trustee: resource released", "resource", rp.String(), "bytes", len(secret))
			return secret, nil
		case http.StatusUnauthorized:
			// Session expired, or policy denied, or (Trustee quirk) no such resource: a
			// fresh handshake distinguishes the first from the others.
			slog.Debug("trustee: resource unauthorized; redoing the handshake", "resource", rp.String(), "detail", errorDetail(resp.Body))
			c.attested = false
			if handshakes == c.opts.MaxHandshakes {
				return nil, statusError(kbc.ErrRefused, "GET "+path, resp)
			}
		case http.StatusNotFound:
			return nil, statusError(kbc.ErrNotFound, "GET "+path, resp)
		case http.StatusForbidden:
			return nil, statusError(kbc.ErrRefused, "GET "+path, resp)
		default:
			return nil, statusError(kbc.ErrProtocol, "GET "+path, resp)
		}
	}
}

type request struct {
	Version     string         `json:"version"`
	TEE         string         `json:"tee"`
	ExtraParams map[string]any `json:"extra-params"`
}

type challenge struct {
	Nonce       *string         `json:"nonce"`
	ExtraParams json.RawMessage `json:"extra-params"`
}

type attestation struct {
	InitData    *struct{}   `json:"init-data"`
	RuntimeData runtimeData `json:"runtime-data"`
	TEEEvidence teeEvidence `json:"tee-evidence"`
}

type runtimeData struct {
	Nonce     string            `json:"nonce"`
	TEEPubKey map[string]string `json:"tee-pubkey"`
}

type teeEvidence struct {
	Primary    json.RawMessage `json:"primary_evidence"`
	Additional string          `json:"additional_evidence"`
}

type tdxEvidence struct {
	CCEventLog *string `json:"cc_eventlog"`
	Quote      string  `json:"quote"`
}

// handshake runs /auth and /attest; on success the cookie jar holds an attested session.
func (c *Client) handshake(ctx context.Context) error {
	tee := c.opts.Attester.TEE()
	body, err := json.Marshal(request{Version: c.opts.Version, TEE: tee, ExtraParams: map[string]any{"supported-hash-algorithms": SupportedHashAlgorithms}})
	if err != nil {
		return err
	}
	hdr := http.Header{"Content-Type": {"application/json"}}
	resp, err := c.http.Do(ctx, httpc.Request{Method: http.MethodPost, Path: "/kbs/v0/auth", Header: hdr, Body: body, Retry: true})
	if err != nil {
		return fmt.Errorf("trustee: %w", err)
	}
	if resp.Status != http.StatusOK {
		return statusError(statusSentinel(resp.Status), "POST /kbs/v0/auth", resp)
	}
	var ch challenge
	if err := json.Unmarshal(resp.Body, &ch); err != nil || ch.Nonce == nil || *ch.Nonce == "" {
		return fmt.Errorf("%w: trustee: POST /kbs/v0/auth: not a Challenge {\"nonce\",\"extra-params\"}", kbc.ErrProtocol)
	}
	alg, err := selectedHash(ch.ExtraParams)
	if err != nil {
		return fmt.Errorf("trustee: challenge: %w", err)
	}
	rd, err := ReportData(alg, *ch.Nonce, c.key.jwk, "")
	if err != nil {
		return fmt.Errorf("trustee: %w", err)
	}
	ev, err := c.opts.Attester.Attest(ctx, rd)
	if err != nil {
		return fmt.Errorf("trustee: gathering %s evidence: %w", tee, err)
	}
	primary, err := primaryEvidence(ev)
	if err != nil {
		return err
	}
	body, err = json.Marshal(attestation{
		RuntimeData: runtimeData{Nonce: *ch.Nonce, TEEPubKey: c.key.jwk},
		TEEEvidence: teeEvidence{Primary: primary},
	})
	if err != nil {
		return err
	}
	resp, err = c.http.Do(ctx, httpc.Request{Method: http.MethodPost, Path: "/kbs/v0/attest", Header: hdr, Body: body, Retry: true})
	if err != nil {
		return fmt.Errorf("trustee: %w", err)
	}
	if resp.Status != http.StatusOK {
		return statusError(statusSentinel(resp.Status), "POST /kbs/v0/attest", resp)
	}
	var tok struct {
		Token *string `json:"token"`
	}
	if err := json.Unmarshal(resp.Body, &tok); err != nil || tok.Token == nil || strings.Count(*tok.Token, ".") != 2 {
		return fmt.Errorf("%w: trustee: POST /kbs/v0/attest: not an attestation token {\"token\":\"<JWT>\"}", kbc.ErrProtocol)
	}
	slog.Debug("trustee: attested", "tee", tee, "hash", alg)
	c.attested = true
	return nil
}

// selectedHash reads extra-params.selected-hash-algorithm (case-insensitive), defaulting to
// sha384 when extra-params is not an object or lacks it — as guest-components does.
func selectedHash(extra json.RawMessage) (string, error) {
	var m map[string]json.RawMessage
	if json.Unmarshal(extra, &m) != nil {
		return SHA384, nil
	}
	raw, ok := m["selected-hash-algorithm"]
	if !ok {
		return SHA384, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", fmt.Errorf("%w: selected-hash-algorithm is not a string", kbc.ErrProtocol)
	}
	s = strings.ToLower(s)
	if _, err := newHash(s); err != nil {
		return "", err
	}
	return s, nil
}

func primaryEvidence(ev *evidence.Evidence) (json.RawMessage, error) {
	switch ev.TEE {
	case evidence.TEETDX:
		t := tdxEvidence{Quote: base64.StdEncoding.EncodeToString(ev.Quote)}
		if len(ev.CCEventLog) > 0 {
			s := base64.StdEncoding.EncodeToString(ev.CCEventLog)
			t.CCEventLog = &s
		}
		return json.Marshal(t)
	case evidence.TEESample:
		if !json.Valid(ev.Quote) {
			return nil, fmt.Errorf("trustee: sample evidence is not a JSON document")
		}
		return json.RawMessage(ev.Quote), nil
	}
	return nil, fmt.Errorf("trustee: unsupported TEE %q", ev.TEE)
}

func statusSentinel(status int) error {
	switch status {
	case http.StatusUnauthorized, http.StatusForbidden:
		return kbc.ErrRefused
	case http.StatusNotFound:
		return kbc.ErrNotFound
	}
	return kbc.ErrProtocol
}

// ErrorInfo is Trustee's error body (kbs-types ErrorInformation).
type ErrorInfo struct {
	Type   string `json:"type"`
	Detail string `json:"detail"`
}

// errorDetail renders an error body: "<Variant>: <detail>" for ErrorInformation, else the
// sanitized text.
func errorDetail(b []byte) string {
	var e ErrorInfo
	if json.Unmarshal(b, &e) == nil && e.Type != "" {
		return kbc.Sanitize(strings.TrimPrefix(e.Type, ErrorTypePrefix) + ": " + e.Detail)
	}
	return httpc.Detail(b)
}

func statusError(sentinel error, step string, resp *httpc.Response) error {
	return fmt.Errorf("%w: trustee: %s: HTTP %d %s: %s", sentinel, step, resp.Status, http.StatusText(resp.Status), errorDetail(resp.Body))
}
