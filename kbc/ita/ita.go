// Package ita is a client of the Intel Trust Authority Key Broker Service, API v1 key
// transfer (intel/trustauthority-kbs).
//
// Background-check mode (default), for key id K:
//
//	[nonce mode] POST /kbs/v1/keys/K/transfer, empty body, no Attestation-Type
//	             → {"val","iat","signature"} (std base64)
//	POST /kbs/v1/keys/K/transfer   Attestation-Type: TDX, Accept/Content-Type: application/json
//	     {"quote":b64, "user_data":b64 [,"nonce":{…}]}   (no event_log: see GetResource)
//	     → {"wrapped_key":b64, "wrapped_swk":b64}
//
// user_data is the ephemeral RSA-3072 public key as u32le(e) ‖ big-endian n (the raw form
// the KBS parses for TDX; not DER). REPORTDATA = SHA-512(user_data), or
// SHA-512(nonce.val ‖ nonce.iat ‖ user_data) in nonce mode. wrapped_swk is RSA-OAEP-SHA-256
// of a 32-byte AES key (SWK); wrapped_key is the secret sealed under the SWK in the
// 12-byte-header AES-256-GCM layout of crypto/ccz.
//
// Passport mode sends {"attestation_token": <ITA token>} without Attestation-Type; the token
// must carry the same user_data as attester_held_data. Options.Passport obtains it; an
// Appraiser's Token method gets it from Intel Trust Authority's appraisal API v1.
package ita

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"regexp"
	"strings"
	"sync"

	"github.com/cai-agent/cai-agent/crypto/ccz"
	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/kbc"
	"github.com/cai-agent/cai-agent/kbc/internal/httpc"
)

// RSABits is the size of the ephemeral key (the KBS requires more than 2048 bits).
const RSABits = 3072

// Options configures a Client.
type Options struct {
	// URL is the KBS base URL, e.g. https://kbs.example:9443 (the transfer endpoint is
	// <URL>/kbs/v1/keys/<id>/transfer).
	URL string
	// Attester produces TDX evidence (required unless Passport is set).
	Attester evidence.Attester
	// Nonce makes the client fetch a KBS nonce first and bind it into REPORTDATA.
	Nonce bool
	// Passport, when set, selects passport mode: it returns an Intel Trust Authority
	// attestation token whose attester_held_data is userData, obtained from ITA with a quote
	// whose REPORTDATA binds userData as ITA requires (Appraiser.Token does that).
	Passport func(ctx context.Context, userData []byte) (string, error)
	// HTTP configures TLS, timeouts, retries and size limits.
	HTTP kbc.HTTPOptions
}

// Client is an ITA KBS client. It keeps one ephemeral RSA key, generated on first use; its
// methods are safe for concurrent use (requests are serialized).
type Client struct {
	opts Options
	http *httpc.Client

	mu  sync.Mutex
	key *rsa.PrivateKey
}

var _ kbc.Client = (*Client)(nil)

// New checks opts and returns a Client. No request is sent.
func New(opts Options) (*Client, error) {
	if opts.Attester == nil && opts.Passport == nil {
		return nil, fmt.Errorf("%w: ita: no attester", kbc.ErrConfig)
	}
	hc, err := httpc.New(opts.URL, opts.HTTP, nil)
	if err != nil {
		return nil, err
	}
	return &Client{opts: opts, http: hc}, nil
}

var uuidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// ParseKeyID accepts a key id: a UUID (8-4-4-4-12 hex), or the URI ita:///keys/<uuid>.
// It returns the UUID in lower case.
func ParseKeyID(uri string) (string, error) {
	id := uri
	if rest, ok := strings.CutPrefix(uri, "ita:///keys/"); ok {
		id = rest
	}
	if !uuidRE.MatchString(id) {
		return "", fmt.Errorf("%w: %q: want an ITA key id (UUID) or ita:///keys/<uuid>", kbc.ErrInvalidURI, uri)
	}
	return strings.ToLower(id), nil
}

// UserData encodes an RSA public key as the KBS parses it for TDX: u32le(e) ‖ big-endian n
// (n in exactly ⌈bits/8⌉ bytes).
func UserData(pub *rsa.PublicKey) []byte {
	n := pub.N.FillBytes(make([]byte, (pub.N.BitLen()+7)/8))
	out := binary.LittleEndian.AppendUint32(nil, uint32(pub.E))
	return append(out, n...)
}

// ReportData returns SHA-512(nonceVal ‖ nonceIat ‖ userData) (nonce parts may be nil).
func ReportData(nonceVal, nonceIat, userData []byte) [64]byte {
	h := sha512.New()
	h.Write(nonceVal)
	h.Write(nonceIat)
	h.Write(userData)
	var rd [64]byte
	copy(rd[:], h.Sum(nil))
	return rd
}

// Nonce is a KBS (ITA) nonce; JSON fields are std base64 byte strings.
type Nonce struct {
	Val       []byte `json:"val"`
	Iat       []byte `json:"iat"`
	Signature []byte `json:"signature"`
}

// TransferRequest is the transfer body (only the fields the KBS knows; it rejects others).
type TransferRequest struct {
	AttestationToken string `json:"attestation_token,omitempty"`
	Quote            []byte `json:"quote,omitempty"`
	Nonce            *Nonce `json:"nonce,omitempty"`
	UserData         []byte `json:"user_data,omitempty"`
	EventLog         []byte `json:"event_log,omitempty"`
}

// TransferResponse is the transfer answer.
type TransferResponse struct {
	WrappedKey []byte `json:"wrapped_key"`
	WrappedSWK []byte `json:"wrapped_swk"`
}

// GetResource implements kbc.Client: uri is a key id (see ParseKeyID).
func (c *Client) GetResource(ctx context.Context, uri string) ([]byte, error) {
	id, err := ParseKeyID(uri)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.key == nil {
		if c.key, err = rsa.GenerateKey(rand.Reader, RSABits); err != nil {
			return nil, err
		}
	}
	path := "/kbs/v1/keys/" + id + "/transfer"
	userData := UserData(&c.key.PublicKey)
	req := TransferRequest{}
	hdr := http.Header{"Accept": {"application/json"}, "Content-Type": {"application/json"}}
	if c.opts.Passport != nil {
		tok, err := c.opts.Passport(ctx, userData)
		if err != nil {
			return nil, fmt.Errorf("ita: obtaining the attestation token: %w", err)
		}
		req.AttestationToken = tok
	} else {
		if tee := c.opts.Attester.TEE(); tee != evidence.TEETDX {
			return nil, fmt.Errorf("%w: ita: the ITA KBS needs TDX evidence, the attester is %q", kbc.ErrConfig, tee)
		}
		var nonce *Nonce
		if c.opts.Nonce {
			if nonce, err = c.nonce(ctx, path); err != nil {
				return nil, err
			}
		}
		var rd [64]byte
		if nonce != nil {
			rd = ReportData(nonce.Val, nonce.Iat, userData)
		} else {
			rd = ReportData(nil, nil, userData)
		}
		ev, err := c.opts.Attester.Attest(ctx, rd)
		if err != nil {
			return nil, fmt.Errorf("ita: gathering TDX evidence: %w", err)
		}
		// No event_log: the KBS passes it to Intel Trust Authority's appraisal v1, which
		// expects its own JSON of parsed RTMR events (trustauthority-client-for-go v1.x), not
		// the raw CCEL; ITA appraises the quote's MRTD and RTMR values without it.
		req = TransferRequest{Quote: ev.Quote, Nonce: nonce, UserData: userData}
		hdr.Set("Attestation-Type", "TDX")
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(ctx, httpc.Request{Method: http.MethodPost, Path: path, Header: hdr, Body: body, Retry: true})
	if err != nil {
		return nil, doError("", err, resp)
	}
	if resp.Status != http.StatusOK {
		return nil, statusError("POST "+path, resp)
	}
	var tr TransferResponse
	if err := decodeJSON(resp.Body, &tr); err != nil || len(tr.WrappedKey) == 0 || len(tr.WrappedSWK) == 0 {
		return nil, fmt.Errorf("%w: ita: POST %s: not a key transfer response {\"wrapped_key\",\"wrapped_swk\"}", kbc.ErrProtocol, path)
	}
	swk, err := rsa.DecryptOAEP(sha256.New(), nil, c.key, tr.WrappedSWK, nil)
	if err != nil || len(swk) != 32 {
		return nil, fmt.Errorf("%w: ita: wrapped_swk does not unwrap to a 32-byte key with the TEE key (RSA-OAEP-SHA-256)", kbc.ErrProtocol)
	}
	defer clear(swk)
	secret, err := ccz.Open(swk, tr.WrappedKey)
	if err != nil {
		return nil, fmt.Errorf("%w: ita: wrapped_key does not open with the SWK: %v", kbc.ErrProtocol, err)
	}
	slog.Debug("ita: key released", "key_id", id, "bytes", len(secret))
	return secret, nil
}

// nonce asks the KBS for a nonce: the transfer endpoint with an empty body and no
// Attestation-Type.
func (c *Client) nonce(ctx context.Context, path string) (*Nonce, error) {
	resp, err := c.http.Do(ctx, httpc.Request{Method: http.MethodPost, Path: path, Header: http.Header{"Accept": {"application/json"}}, Retry: true})
	if err != nil {
		return nil, doError("nonce: ", err, resp)
	}
	if resp.Status != http.StatusOK {
		return nil, statusError("POST "+path+" (nonce)", resp)
	}
	var n Nonce
	if err := decodeJSON(resp.Body, &n); err != nil || len(n.Val) == 0 || len(n.Iat) == 0 {
		return nil, fmt.Errorf("%w: ita: POST %s: not a nonce {\"val\",\"iat\",\"signature\"}", kbc.ErrProtocol, path)
	}
	return &n, nil
}

// decodeJSON decodes one JSON object; unknown members are ignored (a newer server may add
// some), trailing data is not.
func decodeJSON(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return fmt.Errorf("trailing data")
	}
	return nil
}

// doError wraps a failed request. A 5xx that outlived the retries keeps the KBS's explanation:
// the KBS answers 502 also when Intel Trust Authority refuses the evidence.
func doError(step string, err error, resp *httpc.Response) error {
	if resp != nil {
		return fmt.Errorf("ita: %s%w: %s", step, err, httpc.Detail(resp.Body))
	}
	return fmt.Errorf("ita: %s%w", step, err)
}

func statusError(step string, resp *httpc.Response) error {
	var sentinel error
	switch resp.Status {
	case http.StatusUnauthorized, http.StatusForbidden:
		sentinel = kbc.ErrRefused
	case http.StatusNotFound:
		sentinel = kbc.ErrNotFound
	default:
		sentinel = kbc.ErrProtocol
	}
	return fmt.Errorf("%w: ita: %s: HTTP %d %s: %s", sentinel, step, resp.Status, http.StatusText(resp.Status), httpc.Detail(resp.Body))
}
