package ita

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strings"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/kbc"
	"github.com/cai-agent/cai-agent/kbc/internal/httpc"
)

// The Intel Trust Authority appraisal API v1 endpoints, relative to the API URL (e.g.
// https://api.trustauthority.intel.com, or https://api.eu.trustauthority.intel.com).
const (
	AppraisalNoncePath  = "/appraisal/v1/nonce"
	AppraisalAttestPath = "/appraisal/v1/attest"
)

// maxNonceBytes bounds a nonce answer (trustauthority-client-for-go refuses more, too).
const maxNonceBytes = 4096

// AppraiserOptions configures an Appraiser.
type AppraiserOptions struct {
	// URL is the Intel Trust Authority API URL, e.g. https://api.trustauthority.intel.com
	// (the endpoints are <URL>/appraisal/v1/nonce and <URL>/appraisal/v1/attest).
	URL string
	// APIKey is the attestation API key, sent as x-api-key. It is a secret: never logged,
	// and removed from any text of the service's that an error repeats.
	APIKey string
	// PolicyIDs are appraisal policy ids (UUIDs) for Trust Authority to evaluate, in addition
	// to the policies attached to the API key.
	PolicyIDs []string
	// PolicyMustMatch asks Trust Authority to issue no token unless every policy matches.
	PolicyMustMatch bool
	// Attester produces the TDX quote (required).
	Attester evidence.Attester
	// HTTP configures TLS, timeouts, retries and size limits.
	HTTP kbc.HTTPOptions
}

// Appraiser obtains Intel Trust Authority attestation tokens for passport mode through the
// appraisal API v1, as trustauthority-client-for-go's connector does (GetNonce, then GetToken
// with TDX evidence):
//
//	GET  <URL>/appraisal/v1/nonce    x-api-key, Accept: application/json, request-id
//	     → {"val","iat","signature"} (std base64)
//	POST <URL>/appraisal/v1/attest   x-api-key, Accept/Content-Type: application/json, request-id
//	     {"quote":b64, "verifier_nonce":{…}, "runtime_data":b64(user data)
//	      [,"policy_ids":[uuid…]] [,"policy_must_match":true]}
//	     → {"token": <JWT>}
//
// The quote's REPORTDATA is SHA-512(nonce.val ‖ nonce.iat ‖ user data) (ReportData); Trust
// Authority checks it and returns the user data in the token's attester_held_data claim, which
// the ITA KBS decodes as the key to wrap to. No event_log is sent: appraisal v1 expects its
// own JSON of parsed RTMR events, not the raw CCEL (as for GetResource in background-check
// mode). Its methods are safe for concurrent use.
type Appraiser struct {
	opts      AppraiserOptions
	http      *httpc.Client
	policyIDs []string
}

// NewAppraiser checks opts and returns an Appraiser. No request is sent.
func NewAppraiser(opts AppraiserOptions) (*Appraiser, error) {
	if opts.Attester == nil {
		return nil, fmt.Errorf("%w: ita appraisal: no attester", kbc.ErrConfig)
	}
	if opts.APIKey == "" {
		return nil, fmt.Errorf("%w: ita appraisal: no API key", kbc.ErrConfig)
	}
	if !ValidAPIKey(opts.APIKey) {
		return nil, fmt.Errorf("%w: ita appraisal: the API key must be printable ASCII without spaces (at most 4096 bytes)", kbc.ErrConfig)
	}
	var ids []string
	for i, id := range opts.PolicyIDs {
		if !uuidRE.MatchString(id) {
			// Not repeated: a secret pasted into the wrong place would end up in a log.
			return nil, fmt.Errorf("%w: ita appraisal: policy id #%d is not a UUID (8-4-4-4-12 hex digits)", kbc.ErrConfig, i+1)
		}
		ids = append(ids, strings.ToLower(id))
	}
	hc, err := httpc.New(opts.URL, opts.HTTP, nil)
	if err != nil {
		return nil, fmt.Errorf("ita appraisal URL: %w", err)
	}
	return &Appraiser{opts: opts, http: hc, policyIDs: ids}, nil
}

// ValidAPIKey reports whether key can be an API key: 1 to 4096 bytes of printable ASCII
// without spaces (it travels in an HTTP header).
func ValidAPIKey(key string) bool {
	if key == "" || len(key) > 4096 {
		return false
	}
	for _, c := range []byte(key) {
		if c < 0x21 || c > 0x7e {
			return false
		}
	}
	return true
}

// AttestRequest is the appraisal v1 attest body for TDX (trustauthority-client-for-go's
// tokenRequest, without the members this client never sends).
type AttestRequest struct {
	Quote           []byte   `json:"quote"`
	VerifierNonce   *Nonce   `json:"verifier_nonce,omitempty"`
	RuntimeData     []byte   `json:"runtime_data,omitempty"`
	PolicyIDs       []string `json:"policy_ids,omitempty"`
	PolicyMustMatch bool     `json:"policy_must_match,omitempty"`
}

// AttestResponse is the appraisal v1 attest answer.
type AttestResponse struct {
	Token string `json:"token"`
}

// Token returns an attestation token whose attester_held_data is userData: it fetches a
// Trust Authority nonce, gets a TDX quote whose REPORTDATA binds the nonce and userData, and
// has Trust Authority appraise it. It has the signature of Options.Passport.
//
// Errors wrap kbc.ErrConfig (not a TDX attester), kbc.ErrRefused (HTTP 401/403: the API key;
// 400 on attest: Trust Authority refused the evidence, the nonce or a policy),
// kbc.ErrTransport (unreachable, 429, 5xx after the retries) or kbc.ErrProtocol (any other
// answer, a malformed nonce or token, a token for other user data), or are the context's
// error; failures of the Attester are wrapped unchanged.
func (a *Appraiser) Token(ctx context.Context, userData []byte) (string, error) {
	if tee := a.opts.Attester.TEE(); tee != evidence.TEETDX {
		return "", fmt.Errorf("%w: ita appraisal: Intel Trust Authority needs TDX evidence, the attester is %q", kbc.ErrConfig, tee)
	}
	reqID := requestID()
	nonce, err := a.nonce(ctx, reqID)
	if err != nil {
		return "", err
	}
	rd := ReportData(nonce.Val, nonce.Iat, userData)
	ev, err := a.opts.Attester.Attest(ctx, rd)
	if err != nil {
		return "", fmt.Errorf("ita appraisal: gathering TDX evidence: %w", err)
	}
	body, err := json.Marshal(AttestRequest{Quote: ev.Quote, VerifierNonce: nonce, RuntimeData: userData,
		PolicyIDs: a.policyIDs, PolicyMustMatch: a.opts.PolicyMustMatch})
	if err != nil {
		return "", err
	}
	hdr := a.header(reqID)
	hdr.Set("Content-Type", "application/json")
	const step = "POST " + AppraisalAttestPath
	resp, err := a.http.Do(ctx, httpc.Request{Method: http.MethodPost, Path: AppraisalAttestPath, Header: hdr, Body: body, Retry: true})
	if err != nil {
		return "", a.doError(reqID, err, resp)
	}
	if resp.Status != http.StatusOK {
		return "", a.statusError(step, reqID, resp)
	}
	var ar AttestResponse
	if err := decodeJSON(resp.Body, &ar); err != nil || ar.Token == "" {
		return "", fmt.Errorf("%w: ita appraisal: %s: not a token answer {\"token\"}%s", kbc.ErrProtocol, step, a.ids(reqID, resp))
	}
	if err := checkToken(ar.Token, userData); err != nil {
		return "", fmt.Errorf("%w: ita appraisal: %s: %v%s", kbc.ErrProtocol, step, err, a.ids(reqID, resp))
	}
	slog.Debug("ita appraisal: attestation token issued", "request_id", reqID, "trace_id", a.traceID(resp), "policy_ids", len(a.policyIDs))
	return ar.Token, nil
}

func (a *Appraiser) header(reqID string) http.Header {
	return http.Header{"X-Api-Key": {a.opts.APIKey}, "Accept": {"application/json"}, "Request-Id": {reqID}}
}

// nonce gets a Trust Authority nonce.
func (a *Appraiser) nonce(ctx context.Context, reqID string) (*Nonce, error) {
	const step = "GET " + AppraisalNoncePath
	resp, err := a.http.Do(ctx, httpc.Request{Method: http.MethodGet, Path: AppraisalNoncePath, Header: a.header(reqID), Retry: true})
	if err != nil {
		return nil, a.doError(reqID, err, resp)
	}
	if resp.Status != http.StatusOK {
		return nil, a.statusError(step, reqID, resp)
	}
	if len(resp.Body) > maxNonceBytes {
		return nil, fmt.Errorf("%w: ita appraisal: %s: the nonce answer exceeds %d bytes%s", kbc.ErrProtocol, step, maxNonceBytes, a.ids(reqID, resp))
	}
	var n Nonce
	if err := decodeJSON(resp.Body, &n); err != nil || len(n.Val) == 0 || len(n.Iat) == 0 || len(n.Signature) == 0 {
		return nil, fmt.Errorf("%w: ita appraisal: %s: not a nonce {\"val\",\"iat\",\"signature\"}%s", kbc.ErrProtocol, step, a.ids(reqID, resp))
	}
	return &n, nil
}

// checkToken checks that tok is a compact JWS whose payload's attester_held_data is userData.
// The signature is the KBS's to verify (against Trust Authority's published keys).
func checkToken(tok string, userData []byte) error {
	parts := strings.Split(tok, ".")
	if len(parts) != 3 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
		return fmt.Errorf("the token is not a JWT (header.payload.signature)")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	var claims struct {
		Held *string `json:"attester_held_data"`
	}
	if err != nil || json.Unmarshal(payload, &claims) != nil {
		return fmt.Errorf("the token's payload is not base64url JSON")
	}
	if claims.Held == nil {
		return fmt.Errorf("the token has no attester_held_data claim (the KBS wraps the key to it)")
	}
	held, err := base64.StdEncoding.DecodeString(*claims.Held)
	if err != nil || !bytes.Equal(held, userData) {
		return fmt.Errorf("the token's attester_held_data is not this request's user data")
	}
	return nil
}

// requestID returns a fresh random UUID (version 4) for the request-id header, which Trust
// Authority's logs (and its support) can correlate.
func requestID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// redact removes the API key from service-supplied text (an echo of the request, say),
// before it is shortened or sanitized for an error.
func (a *Appraiser) redact(s string) string {
	return strings.ReplaceAll(s, a.opts.APIKey, "[redacted]")
}

// traceID is Trust Authority's trace-id answer header, sanitized ("" if absent).
func (a *Appraiser) traceID(resp *httpc.Response) string {
	if resp == nil {
		return ""
	}
	t := a.redact(resp.Header.Get("Trace-Id"))
	if len(t) > 128 {
		t = t[:128]
	}
	return kbc.Sanitize(t)
}

// ids is the " (request-id …, trace-id …)" suffix of an error.
func (a *Appraiser) ids(reqID string, resp *httpc.Response) string {
	if t := a.traceID(resp); t != "" {
		return " (request-id " + reqID + ", trace-id " + t + ")"
	}
	return " (request-id " + reqID + ")"
}

// detail summarizes an error body: the "error" (or "message") member of a JSON object, else
// the text; the API key removed, sanitized.
func (a *Appraiser) detail(b []byte) string {
	var m struct {
		Error   *string `json:"error"`
		Message *string `json:"message"`
	}
	s := string(b)
	if json.Unmarshal(b, &m) == nil {
		switch {
		case m.Error != nil:
			s = *m.Error
		case m.Message != nil:
			s = *m.Message
		}
	}
	return httpc.Detail([]byte(a.redact(s)))
}

// doError wraps a failed request; a 5xx that outlived the retries keeps the service's text.
func (a *Appraiser) doError(reqID string, err error, resp *httpc.Response) error {
	if resp != nil {
		return fmt.Errorf("ita appraisal: %w: %s%s", err, a.detail(resp.Body), a.ids(reqID, resp))
	}
	return fmt.Errorf("ita appraisal: %w", err)
}

// statusError maps a non-200, non-5xx answer to a sentinel.
func (a *Appraiser) statusError(step, reqID string, resp *httpc.Response) error {
	sentinel, hint := kbc.ErrProtocol, ""
	switch resp.Status {
	case http.StatusUnauthorized, http.StatusForbidden:
		sentinel, hint = kbc.ErrRefused, " (check the attestation API key)"
	case http.StatusBadRequest:
		if step == "POST "+AppraisalAttestPath {
			sentinel, hint = kbc.ErrRefused, " (Trust Authority refused the evidence, nonce or policies)"
		}
	case http.StatusTooManyRequests:
		sentinel, hint = kbc.ErrTransport, " (rate limited; try again later)"
	case http.StatusNotFound:
		hint = " (is the URL the Trust Authority API URL?)"
	}
	return fmt.Errorf("%w: ita appraisal: %s: HTTP %d %s: %s%s%s", sentinel, step, resp.Status, http.StatusText(resp.Status),
		a.detail(resp.Body), hint, a.ids(reqID, resp))
}
