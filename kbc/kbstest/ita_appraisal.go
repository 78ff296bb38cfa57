package kbstest

import (
	"bytes"
	"crypto/rand"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"mime"
	"net/http"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cai-agent/cai-agent/evidence/verify"
)

// Step names of the ITA appraisal test server, for the Intercept and Rewrite hooks.
const (
	StepAppraisalNonce  = "appraisal-nonce"  // GET /appraisal/v1/nonce
	StepAppraisalAttest = "appraisal-attest" // POST /appraisal/v1/attest
)

// The appraisal API v1 paths (as in kbc/ita).
const (
	appraisalNoncePath  = "/appraisal/v1/nonce"
	appraisalAttestPath = "/appraisal/v1/attest"
)

// MaxAppraisalBody is the request body limit of the appraisal test server: Intel Trust
// Authority's documented REST body size limit (500,000 bytes).
const MaxAppraisalBody = 500_000

// ITAAppraisal is an Intel Trust Authority appraisal API v1 test server, the attestation
// service behind passport mode: an http.Handler serving GET /appraisal/v1/nonce and
// POST /appraisal/v1/attest. Its tokens are signed with the key of KBS (the ITA KBS test
// server), which therefore accepts them in passport mode.
//
// Wire format, as trustauthority-client-for-go's connector (go-connector nonce.go, token.go,
// request.go, const.go; v1.x for the v1 paths) speaks it: every request carries the API key
// in x-api-key (else 401); the nonce answer is {"val","iat","signature"} (std base64; iat is
// Go's time.Time String form, as Trust Authority writes it); the attest body is
// {"quote", "verifier_nonce", "runtime_data", "user_data", "policy_ids", "event_log",
// "token_signing_alg", "policy_must_match"} (byte strings in std base64) and the answer
// {"token": <JWT>}. Answers echo the request-id header and carry a trace-id header, as the
// connector reads them. Errors are {"error": "<message>"} (the form Confidential Containers
// Trustee's Intel Trust Authority backend parses).
//
// The evidence check: the quote must parse as a TD quote (v4 or v5; its signature is NOT
// verified), the verifier_nonce (if any) must be one this server or KBS issued, at most
// NonceTTL old, and the quote's REPORTDATA must be SHA-512(nonce.val ‖ nonce.iat ‖
// runtime_data) when there is a nonce or runtime_data. The token carries attester_type TDX,
// attester_held_data (runtime_data, std base64), the quote's tdx_* claims, verifier_nonce,
// policy_ids_matched and policy_ids_unmatched ({"id","version"}), and expires after 5 minutes.
//
// Behaviour the public sources do not document, chosen here: a request without a valid
// x-api-key is 401; a body that is not one JSON object of the known members is 400 (stricter
// than the service, so that a misspelt member fails a test); an attest body whose
// Content-Type is not application/json is 415; a body over MaxAppraisalBody is 413; a bad
// quote, nonce, binding or token_signing_alg, an unknown policy id and, with
// policy_must_match, an unmatched policy are 400. event_log and user_data are accepted and
// ignored; no TCB status claims are issued (nothing is verified); tokens are ES256, whatever
// token_signing_alg asks.
type ITAAppraisal struct {
	// KBS is the ITA KBS test server whose token key signs this server's tokens and whose
	// nonce key signs its nonces (the real KBS relays Trust Authority's nonces). Required.
	KBS *ITA
	// APIKey is the attestation API key requests must carry in x-api-key.
	APIKey string
	// NonceTTL bounds a verifier_nonce's age; 0 = 5 minutes.
	NonceTTL time.Duration
	// Now is the clock; nil = KBS's.
	Now func() time.Time
	// Log receives one line per request (never the API key); nil = discard.
	Log *slog.Logger
	Hooks

	mu       sync.Mutex
	policies map[string]func(claims map[string]any) bool
}

// NewITAAppraisal returns an appraisal server for kbs accepting apiKey, with no policies.
func NewITAAppraisal(kbs *ITA, apiKey string) *ITAAppraisal {
	return &ITAAppraisal{KBS: kbs, APIKey: apiKey}
}

var policyIDRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// SetPolicy defines the appraisal policy id (a UUID): match decides from the token's claims
// whether it matches; nil always matches. A request naming a policy id not defined here is
// refused (400).
func (a *ITAAppraisal) SetPolicy(id string, match func(claims map[string]any) bool) error {
	if !policyIDRE.MatchString(id) {
		return fmt.Errorf("kbstest: policy id %q is not a UUID", id)
	}
	if match == nil {
		match = func(map[string]any) bool { return true }
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.policies == nil {
		a.policies = map[string]func(map[string]any) bool{}
	}
	a.policies[strings.ToLower(id)] = match
	return nil
}

// Handler serves the appraisal API under /appraisal/ and passes every other request to next
// (e.g. the ITA KBS test server), so that one listener plays Trust Authority and the KBS.
func (a *ITAAppraisal) Handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/appraisal/") {
			a.ServeHTTP(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (a *ITAAppraisal) now() time.Time {
	if a.Now != nil {
		return a.Now()
	}
	return a.KBS.now()
}

// ServeHTTP implements http.Handler.
func (a *ITAAppraisal) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	serveLogged(a.Log, "ita appraisal request", w, r, a.serve)
}

// appraisalError is an error answer.
type appraisalError struct {
	status int
	msg    string
}

func (e *appraisalError) Error() string { return e.msg }

func badRequest(format string, args ...any) error {
	return &appraisalError{http.StatusBadRequest, fmt.Sprintf(format, args...)}
}

func (a *ITAAppraisal) serve(w http.ResponseWriter, r *http.Request) {
	var tid [12]byte
	rand.Read(tid[:])
	w.Header().Set("Trace-Id", hex.EncodeToString(tid[:]))
	if id := r.Header.Get("Request-Id"); id != "" {
		w.Header().Set("Request-Id", id)
	}
	var step, method string
	switch r.URL.Path {
	case appraisalNoncePath:
		step, method = StepAppraisalNonce, http.MethodGet
	case appraisalAttestPath:
		step, method = StepAppraisalAttest, http.MethodPost
	default:
		a.fail(w, &appraisalError{http.StatusNotFound, "no such endpoint " + r.URL.Path})
		return
	}
	if r.Method != method {
		w.Header().Set("Allow", method)
		a.fail(w, &appraisalError{http.StatusMethodNotAllowed, "method " + r.Method + " not allowed"})
		return
	}
	if key := r.Header.Get("X-Api-Key"); a.APIKey == "" || subtle.ConstantTimeCompare([]byte(key), []byte(a.APIKey)) != 1 {
		a.fail(w, &appraisalError{http.StatusUnauthorized, "Unauthorized: missing or invalid API key"})
		return
	}
	if a.Intercept != nil && a.Intercept(step, w, r) {
		return
	}
	var body []byte
	var err error
	if step == StepAppraisalNonce {
		body, err = encode(a.KBS.mintNonceAt(a.now()))
	} else {
		body, err = a.attest(r)
	}
	if err != nil {
		a.fail(w, err)
		return
	}
	if a.Rewrite != nil {
		body = a.Rewrite(step, body)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", fmt.Sprint(len(body)))
	w.WriteHeader(http.StatusOK)
	w.Write(body)
}

func (a *ITAAppraisal) fail(w http.ResponseWriter, err error) {
	var ae *appraisalError
	if !errors.As(err, &ae) {
		ae = &appraisalError{http.StatusInternalServerError, err.Error()}
	}
	if rec, ok := w.(*statusRecorder); ok {
		rec.cause = ae.msg
	}
	b, _ := encode(map[string]string{"error": ae.msg})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(ae.status)
	w.Write(b)
}

// attestRequest is the appraisal v1 attest body (trustauthority-client-for-go's
// tokenRequest).
type attestRequest struct {
	Quote           []byte    `json:"quote"`
	VerifierNonce   *itaNonce `json:"verifier_nonce"`
	RuntimeData     []byte    `json:"runtime_data"`
	PolicyIDs       []string  `json:"policy_ids"`
	UserData        []byte    `json:"user_data"`
	EventLog        []byte    `json:"event_log"`
	TokenSigningAlg string    `json:"token_signing_alg"`
	PolicyMustMatch bool      `json:"policy_must_match"`
}

type policyClaim struct {
	ID      string `json:"id"`
	Version string `json:"version"`
}

// attest answers POST /appraisal/v1/attest with {"token"} or an error.
func (a *ITAAppraisal) attest(r *http.Request) ([]byte, error) {
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		return nil, &appraisalError{http.StatusUnsupportedMediaType, "Content-Type must be application/json"}
	}
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, MaxAppraisalBody))
	dec.DisallowUnknownFields()
	var req attestRequest
	if err := dec.Decode(&req); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, &appraisalError{http.StatusRequestEntityTooLarge, fmt.Sprintf("request body exceeds %d bytes", MaxAppraisalBody)}
		}
		return nil, badRequest("invalid request body: %v", err)
	}
	if dec.More() {
		return nil, badRequest("invalid request body: trailing data")
	}
	if len(req.Quote) == 0 {
		return nil, badRequest("quote is required")
	}
	switch req.TokenSigningAlg {
	case "", "RS256", "PS384":
	default:
		return nil, badRequest("unsupported token_signing_alg %q", req.TokenSigningAlg)
	}
	q, err := verify.ParseQuote(req.Quote)
	if err != nil {
		return nil, badRequest("invalid TDX quote: %v", err)
	}
	now := a.now()
	if n := req.VerifierNonce; n != nil {
		if err := a.KBS.checkNonce(n, now, a.NonceTTL); err != nil {
			return nil, badRequest("invalid verifier_nonce: %v", err)
		}
	}
	if req.VerifierNonce != nil || len(req.RuntimeData) > 0 {
		h := sha512.New()
		if n := req.VerifierNonce; n != nil {
			h.Write(n.Val)
			h.Write(n.Iat)
		}
		h.Write(req.RuntimeData)
		if !bytes.Equal(q.ReportData, h.Sum(nil)) {
			return nil, badRequest("TDX quote REPORTDATA is not SHA-512(verifier_nonce.val || verifier_nonce.iat || runtime_data)")
		}
	}
	claims := quoteClaims(q)
	if n := req.VerifierNonce; n != nil {
		claims["verifier_nonce"] = n
	}
	matched, unmatched := []policyClaim{}, []policyClaim{}
	a.mu.Lock()
	policies := a.policies
	a.mu.Unlock()
	for _, id := range req.PolicyIDs {
		if !policyIDRE.MatchString(id) {
			return nil, badRequest("invalid policy id %q", id)
		}
		match, ok := policies[strings.ToLower(id)]
		if !ok {
			return nil, badRequest("policy id %s not found", strings.ToLower(id))
		}
		pc := policyClaim{strings.ToLower(id), "v1"}
		if match(claims) {
			matched = append(matched, pc)
		} else {
			unmatched = append(unmatched, pc)
		}
	}
	if req.PolicyMustMatch && len(unmatched) > 0 {
		ids := make([]string, len(unmatched))
		for i, p := range unmatched {
			ids[i] = p.ID
		}
		sort.Strings(ids)
		return nil, badRequest("policy_must_match: policies not matched: %s", strings.Join(ids, ", "))
	}
	if len(matched) > 0 {
		claims["policy_ids_matched"] = matched
	}
	if len(unmatched) > 0 {
		claims["policy_ids_unmatched"] = unmatched
	}
	claims["ver"] = "1.0"
	claims["iss"] = "Intel Trust Authority (cai-agent kbstest)"
	var jti [16]byte
	rand.Read(jti[:])
	claims["jti"] = hex.EncodeToString(jti[:])
	tok, err := a.KBS.issueToken(req.RuntimeData, now, claims)
	if err != nil {
		return nil, err
	}
	return encode(map[string]string{"token": tok})
}
