// Package kbstest has faithful test servers for the key broker protocols cai-agent speaks — a
// Confidential Containers Trustee KBS (RCAR 0.4.0) and an Intel Trust Authority KBS (v1 key
// transfer) — and a conformance suite that every kbc client passes against them.
//
// The servers are strict where the real ones are strict (exact protocol version, nonce and
// session checks, REPORTDATA binding recomputed from the server's own typed view of the key,
// unknown JSON fields for ITA, modulus size), and emit byte-exact wire formats (JWE protected
// headers in Trustee's member order). They do NOT verify quote signatures or collateral, nor
// replay event logs: that is the attestation service's job. The Trustee server is also the
// engine of `cai-agent dev-kbs`; nothing here is fit to guard a real secret.
package kbstest

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/kbc"
)

// Step names passed to the Intercept and Rewrite hooks.
const (
	StepAuth     = "auth"
	StepAttest   = "attest"
	StepResource = "resource"
	StepNonce    = "nonce"    // ITA: empty-body transfer request answered with a nonce
	StepTransfer = "transfer" // ITA: key transfer
)

// Hooks let a test make a server misbehave at one step.
type Hooks struct {
	// Intercept, when it returns true, has answered the request itself (e.g. a 500, a slow or
	// garbage answer); the server does nothing more for it.
	Intercept func(step string, w http.ResponseWriter, r *http.Request) bool
	// Rewrite replaces the body of a successful answer (e.g. to tamper with a JWE or a nonce).
	Rewrite func(step string, body []byte) []byte
}

// TrusteeVersion is the RCAR protocol version the Trustee server demands by default.
const TrusteeVersion = "0.4.0"

// Trustee is a Trustee KBS (RCAR 0.4.0) test server: an http.Handler serving /kbs/v0.
// Configure its exported fields before serving; use SetResource to add resources.
type Trustee struct {
	// Version demanded from clients (exact match); "" = TrusteeVersion.
	Version string
	// SelectedHash, if set, is sent as extra-params {"selected-hash-algorithm": …} and used
	// for the binding (as Trustee does for IBM SE); otherwise extra-params is "" and the
	// binding uses sha384.
	SelectedHash string
	// SessionTimeout is the session lifetime; 0 = 5 minutes (Trustee's default).
	SessionTimeout time.Duration
	// AllowedTEEs are the TEEs the resource policy releases to; nil = tdx and sample.
	// Others attest but get 401 PolicyDeny on resources (Trustee answers 401 to every error
	// but a bad path or plugin; its default policy denies sample evidence, this server
	// allows it).
	AllowedTEEs []string
	// Now is the clock; nil = time.Now.
	Now func() time.Time
	// Log receives one line per request (never secrets); nil = discard.
	Log *slog.Logger
	Hooks

	mu        sync.Mutex
	resources map[string][]byte
	sessions  map[string]*session
	tokenKey  *ecdsa.PrivateKey
}

type session struct {
	tee      string
	nonce    string
	expires  time.Time
	attested bool
	token    string
	pubkey   *typedPubKey
}

// NewTrustee returns a Trustee server with no resources.
func NewTrustee() *Trustee { return &Trustee{} }

// SetResource stores secret under a kbs:///repo/type/tag URI.
func (t *Trustee) SetResource(uri string, secret []byte) error {
	rp, err := kbc.ParseResourceURI(uri)
	if err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.resources == nil {
		t.resources = map[string][]byte{}
	}
	t.resources[rp.Repo+"/"+rp.Type+"/"+rp.Tag] = append([]byte{}, secret...)
	return nil
}

// Resources returns the URIs of the stored resources.
func (t *Trustee) Resources() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []string
	for k := range t.resources {
		out = append(out, "kbs:///"+k)
	}
	return out
}

func (t *Trustee) now() time.Time {
	if t.Now != nil {
		return t.Now()
	}
	return time.Now()
}

func (t *Trustee) version() string {
	if t.Version != "" {
		return t.Version
	}
	return TrusteeVersion
}

func (t *Trustee) timeout() time.Duration {
	if t.SessionTimeout > 0 {
		return t.SessionTimeout
	}
	return 5 * time.Minute
}

// Trustee error variants (kbs/src/error.rs) with their HTTP status: 404 for
// InvalidRequestPath and PluginNotFound, 401 for every other one. cause is what Trustee logs
// but does not send.
type kbsError struct {
	status  int
	variant string
	detail  string
	cause   string
}

func (e *kbsError) Error() string { return e.detail }

// errAuth is a failed /auth: Trustee's RcarAuthFailed shows its cause.
func errAuth(format string, args ...any) *kbsError {
	return &kbsError{http.StatusUnauthorized, "AttestationError", "Attestation error: RCAR handshake Auth failed: " + fmt.Sprintf(format, args...), ""}
}

// errAttest is a failed /attest: Trustee's RcarAttestFailed does not show its cause (nonce,
// session, evidence, binding or init-data), it only logs it.
func errAttest(format string, args ...any) *kbsError {
	return &kbsError{http.StatusUnauthorized, "AttestationError", "Attestation error: RCAR handshake Attest failed", fmt.Sprintf(format, args...)}
}

// errTokenNotFound is a resource request without an attested session.
var errTokenNotFound = &kbsError{status: http.StatusUnauthorized, variant: "TokenNotFound", detail: "Attestation Token not found"}

// maxRequest is Trustee's default payload_request_size (2 MiB).
const maxRequest = 2 << 20

// ServeHTTP implements http.Handler.
func (t *Trustee) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	serveLogged(t.Log, "kbs request", w, r, t.serve)
}

// serveLogged runs serve and, with a logger, logs the request: method, path, status, bytes
// written, duration, and the cause of an error answer.
func serveLogged(log *slog.Logger, msg string, w http.ResponseWriter, r *http.Request, serve func(http.ResponseWriter, *http.Request)) {
	rec := &statusRecorder{ResponseWriter: w, status: 200}
	start := time.Now()
	serve(rec, r)
	if log == nil {
		return
	}
	attrs := []any{"method", r.Method, "path", r.URL.Path, "status", rec.status, "bytes", rec.n, "duration", time.Since(start).Round(time.Microsecond)}
	if rec.cause != "" {
		attrs = append(attrs, "error", rec.cause)
	}
	log.Info(msg, attrs...)
}

func (t *Trustee) serve(w http.ResponseWriter, r *http.Request) {
	rest, ok := strings.CutPrefix(r.URL.Path, "/kbs/v0/")
	if !ok {
		t.fail(w, &kbsError{http.StatusNotFound, "InvalidRequestPath", "Request path " + r.URL.Path + " is invalid", ""})
		return
	}
	seg := strings.Split(rest, "/")
	step := ""
	switch {
	case seg[0] == "auth" && len(seg) == 1 && r.Method == http.MethodPost:
		step = StepAuth
	case seg[0] == "attest" && len(seg) == 1 && r.Method == http.MethodPost:
		step = StepAttest
	case seg[0] == "resource" && r.Method == http.MethodGet:
		step = StepResource
	case seg[0] == "auth" || seg[0] == "attest" || seg[0] == "resource":
		t.fail(w, &kbsError{http.StatusNotFound, "InvalidRequestPath", "Request path " + r.URL.Path + " is invalid", ""})
		return
	default:
		t.fail(w, &kbsError{http.StatusNotFound, "PluginNotFound", "Plugin " + seg[0] + " not found", ""})
		return
	}
	if t.Intercept != nil && t.Intercept(step, w, r) {
		return
	}
	var err error
	switch step {
	case StepAuth:
		err = t.auth(w, r)
	case StepAttest:
		err = t.attest(w, r)
	case StepResource:
		err = t.resource(w, r, seg[1:])
	}
	if err != nil {
		var ke *kbsError
		if !errors.As(err, &ke) {
			ke = &kbsError{http.StatusUnauthorized, "SerdeError", "Serialize/Deserialize failed", err.Error()}
		}
		t.fail(w, ke)
	}
}

func (t *Trustee) fail(w http.ResponseWriter, e *kbsError) {
	if rec, ok := w.(*statusRecorder); ok {
		rec.cause = e.detail
		if e.cause != "" {
			rec.cause += ": " + e.cause
		}
	}
	b, _ := json.Marshal(ErrorInformation{ErrorTypePrefix + e.variant, e.detail})
	w.WriteHeader(e.status)
	w.Write(b)
}

// ErrorInformation is Trustee's error body (kbs-types ErrorInformation).
type ErrorInformation struct {
	Type   string `json:"type"`
	Detail string `json:"detail"`
}

// ErrorTypePrefix prefixes Trustee's ErrorInformation types.
const ErrorTypePrefix = "https://github.com/confidential-containers/kbs/errors/"

func (t *Trustee) reply(w http.ResponseWriter, step string, body []byte) {
	if t.Rewrite != nil {
		body = t.Rewrite(step, body)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	w.Write(body)
}

// readJSON reads the body into v. An oversized body is a *kbsError (413); a malformed one a
// plain error, which the step reports as Trustee does.
func readJSON(r *http.Request, v any) error {
	b, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, maxRequest))
	if err != nil {
		return &kbsError{http.StatusRequestEntityTooLarge, "SerdeError", "Serialize/Deserialize failed", err.Error()}
	}
	return json.Unmarshal(b, v)
}

// auth handles POST /kbs/v0/auth.
func (t *Trustee) auth(w http.ResponseWriter, r *http.Request) error {
	var req struct {
		Version     *string         `json:"version"`
		TEE         *string         `json:"tee"`
		ExtraParams json.RawMessage `json:"extra-params"`
	}
	if err := readJSON(r, &req); err != nil {
		var ke *kbsError
		if errors.As(err, &ke) {
			return ke
		}
		return errAuth("deserialize Request")
	}
	if req.Version == nil || req.TEE == nil || req.ExtraParams == nil {
		return errAuth("deserialize Request")
	}
	if *req.Version != t.version() {
		return errAuth("KBS Client Protocol Version Mismatch: expect =%s while the request is %s", t.version(), *req.Version)
	}
	switch *req.TEE {
	case evidence.TEETDX, evidence.TEESample:
	default:
		return errAuth("unsupported TEE %s in this test server", *req.TEE)
	}
	nb := make([]byte, 32)
	rand.Read(nb)
	idb := make([]byte, 16)
	rand.Read(idb)
	idb[6] = idb[6]&0x0f | 0x40 // UUIDv4, simple form
	idb[8] = idb[8]&0x3f | 0x80
	id := hex.EncodeToString(idb)
	s := &session{tee: *req.TEE, nonce: base64.StdEncoding.EncodeToString(nb), expires: t.now().Add(t.timeout())}
	t.mu.Lock()
	if t.sessions == nil {
		t.sessions = map[string]*session{}
	}
	t.gcLocked()
	t.sessions[id] = s
	t.mu.Unlock()
	extra := json.RawMessage(`""`)
	if t.SelectedHash != "" {
		extra, _ = json.Marshal(map[string]string{"selected-hash-algorithm": t.SelectedHash})
	}
	body, _ := json.Marshal(struct {
		Nonce       string          `json:"nonce"`
		ExtraParams json.RawMessage `json:"extra-params"`
	}{s.nonce, extra})
	t.setCookie(w, id, s)
	t.reply(w, StepAuth, body)
	return nil
}

func (t *Trustee) setCookie(w http.ResponseWriter, id string, s *session) {
	// Only Expires, like Trustee (no Path, Secure or HttpOnly).
	w.Header().Add("Set-Cookie", "kbs-session-id="+id+"; Expires="+s.expires.UTC().Format(http.TimeFormat))
}

func (t *Trustee) gcLocked() {
	now := t.now()
	for id, s := range t.sessions {
		if !now.Before(s.expires) {
			delete(t.sessions, id)
		}
	}
}

// sessionFor returns the live session named by the request's cookie, or why there is none.
func (t *Trustee) sessionFor(r *http.Request) (string, *session, string) {
	c, err := r.Cookie("kbs-session-id")
	if err != nil {
		return "", nil, "cookie not found"
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	s, ok := t.sessions[c.Value]
	if !ok {
		return "", nil, "session not found"
	}
	if !t.now().Before(s.expires) {
		delete(t.sessions, c.Value)
		return "", nil, "session expired"
	}
	return c.Value, s, ""
}

// typedPubKey is the server's typed view of a tee-pubkey (kbs-types TeePubKey, internally
// tagged on kty). Re-serializing it yields exactly alg,crv,kty,x,y (EC) or alg,e,kty,n (RSA)
// in JCS order, whatever else the client sent.
type typedPubKey struct {
	ec  *ecPubKey
	rsa *rsaPubKey
}

type ecPubKey struct {
	Alg string `json:"alg"`
	Crv string `json:"crv"`
	Kty string `json:"kty"`
	X   string `json:"x"`
	Y   string `json:"y"`
}

type rsaPubKey struct {
	Alg string `json:"alg"`
	E   string `json:"e"`
	Kty string `json:"kty"`
	N   string `json:"n"`
}

func parsePubKey(raw json.RawMessage) (*typedPubKey, error) {
	var tag struct {
		Kty string `json:"kty"`
	}
	if err := json.Unmarshal(raw, &tag); err != nil {
		return nil, err
	}
	switch tag.Kty {
	case "EC":
		var k ecPubKey
		if err := json.Unmarshal(raw, &k); err != nil || k.Alg == "" || k.Crv == "" || k.X == "" || k.Y == "" {
			return nil, errors.New("EC tee-pubkey needs alg, crv, x, y")
		}
		return &typedPubKey{ec: &k}, nil
	case "RSA":
		var k rsaPubKey
		if err := json.Unmarshal(raw, &k); err != nil || k.Alg == "" || k.N == "" || k.E == "" {
			return nil, errors.New("RSA tee-pubkey needs alg, n, e")
		}
		return &typedPubKey{rsa: &k}, nil
	}
	return nil, fmt.Errorf("unknown tee-pubkey kty %q", tag.Kty)
}

func (k *typedPubKey) value() any {
	if k.ec != nil {
		return k.ec
	}
	return k.rsa
}

func hashByName(name string) (hash.Hash, error) {
	switch strings.ToLower(name) {
	case "", "sha384":
		return sha512.New384(), nil
	case "sha256":
		return sha256.New(), nil
	case "sha512":
		return sha512.New(), nil
	}
	return nil, fmt.Errorf("unsupported hash %q", name)
}

// attest handles POST /kbs/v0/attest, in Trustee's order: cookie, Attestation (its
// tee-pubkey typed), session, already attested, nonce, init-data, evidence.
func (t *Trustee) attest(w http.ResponseWriter, r *http.Request) error {
	if _, err := r.Cookie("kbs-session-id"); err != nil {
		return errAttest("cookie not found")
	}
	var att struct {
		InitData    json.RawMessage `json:"init-data"`
		RuntimeData *struct {
			Nonce     *string         `json:"nonce"`
			TEEPubKey json.RawMessage `json:"tee-pubkey"`
		} `json:"runtime-data"`
		TEEEvidence *struct {
			Primary    json.RawMessage `json:"primary_evidence"`
			Additional *string         `json:"additional_evidence"`
		} `json:"tee-evidence"`
	}
	if err := readJSON(r, &att); err != nil {
		var ke *kbsError
		if errors.As(err, &ke) {
			return ke
		}
		return errAttest("deserialize Attestation: %v", err)
	}
	if att.RuntimeData == nil || att.RuntimeData.Nonce == nil || att.TEEEvidence == nil || att.TEEEvidence.Primary == nil || att.TEEEvidence.Additional == nil {
		return errAttest("deserialize Attestation: missing member")
	}
	pk, err := parsePubKey(att.RuntimeData.TEEPubKey)
	if err != nil {
		return errAttest("deserialize Attestation: tee-pubkey: %v", err)
	}
	id, s, why := t.sessionFor(r)
	if why != "" {
		return errAttest("%s", why)
	}
	t.mu.Lock()
	if s.attested {
		// Trustee returns the stored token without re-verifying.
		tok := s.token
		t.mu.Unlock()
		body, _ := json.Marshal(map[string]string{"token": tok})
		t.setCookie(w, id, s)
		t.reply(w, StepAttest, body)
		return nil
	}
	t.mu.Unlock()
	if len(att.InitData) > 0 && string(att.InitData) != "null" {
		var id struct {
			Format string `json:"format"`
			Body   string `json:"body"`
		}
		if json.Unmarshal(att.InitData, &id) != nil || id.Format != "toml" {
			return errAttest("unsupported init-data (want null or format toml)")
		}
	}
	if *att.RuntimeData.Nonce != s.nonce {
		return errAttest("runtime-data nonce differs from the session's challenge")
	}
	h, err := hashByName(t.SelectedHash)
	if err != nil {
		return errAttest("%v", err)
	}
	pre, err := evidence.CanonicalJSON(struct {
		Additional string `json:"additional-evidence"`
		Nonce      string `json:"nonce"`
		TEEPubKey  any    `json:"tee-pubkey"`
	}{*att.TEEEvidence.Additional, s.nonce, pk.value()})
	if err != nil {
		return errAttest("%v", err)
	}
	h.Write(pre)
	digest := h.Sum(nil)
	if err := checkBinding(s.tee, att.TEEEvidence.Primary, digest); err != nil {
		return errAttest("verify TEE evidence failed: %v", err)
	}
	tok, err := t.token(s, pk, *att.TEEEvidence.Additional)
	if err != nil {
		return errAttest("%v", err)
	}
	t.mu.Lock()
	s.attested, s.token, s.pubkey = true, tok, pk
	t.mu.Unlock()
	body, _ := json.Marshal(map[string]string{"token": tok})
	t.setCookie(w, id, s)
	t.reply(w, StepAttest, body)
	return nil
}

// checkBinding checks that the evidence's REPORTDATA carries digest: for sample evidence
// byte for byte (Trustee's sample verifier), for TDX padded to 64 bytes (regularize_data).
func checkBinding(tee string, primary json.RawMessage, digest []byte) error {
	switch tee {
	case evidence.TEESample:
		rd, err := sampleReportData(primary)
		if err != nil {
			return err
		}
		if !equal(rd, digest) {
			return errors.New("sample evidence report_data does not match the runtime data")
		}
		return nil
	case evidence.TEETDX:
		var ev struct {
			CCEventLog *string `json:"cc_eventlog"`
			Quote      string  `json:"quote"`
		}
		if err := json.Unmarshal(primary, &ev); err != nil {
			return fmt.Errorf("tdx evidence: %v", err)
		}
		if ev.CCEventLog != nil {
			if _, err := base64.StdEncoding.DecodeString(*ev.CCEventLog); err != nil {
				return errors.New("tdx evidence: cc_eventlog is not std base64")
			}
		}
		q, err := base64.StdEncoding.DecodeString(ev.Quote)
		if err != nil {
			return errors.New("tdx evidence: quote is not std base64")
		}
		rd, err := QuoteReportData(q)
		if err != nil {
			return err
		}
		if !equal(rd, regularize(digest, 64)) {
			return errors.New("TDX quote REPORTDATA does not match the runtime data")
		}
		return nil
	}
	return fmt.Errorf("unsupported tee %s", tee)
}

// token issues a JWT-shaped ES256 token carrying the runtime data claims where Trustee's EAR
// puts them. Clients treat it as opaque.
func (t *Trustee) token(s *session, pk *typedPubKey, additional string) (string, error) {
	t.mu.Lock()
	if t.tokenKey == nil {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.mu.Unlock()
			return "", err
		}
		t.tokenKey = k
	}
	key := t.tokenKey
	t.mu.Unlock()
	now := t.now()
	claims := map[string]any{
		"eat_profile": "tag:github.com,2024:confidential-containers/Trustee",
		"iat":         now.Unix(),
		"exp":         now.Add(5 * time.Minute).Unix(),
		"submods": map[string]any{"cpu0": map[string]any{"ear.veraison.annotated-evidence": map[string]any{
			"runtime_data_claims": map[string]any{"nonce": s.nonce, "tee-pubkey": pk.value(), "additional-evidence": additional},
		}}},
	}
	return signES256(key, map[string]any{"alg": "ES256", "typ": "JWT"}, claims)
}

func signES256(key *ecdsa.PrivateKey, header, claims any) (string, error) {
	h, _ := json.Marshal(header)
	c, err := json.Marshal(claims)
	if err != nil {
		return "", err
	}
	input := b64u(h) + "." + b64u(c)
	d := sha256.Sum256([]byte(input))
	r, s, err := ecdsa.Sign(rand.Reader, key, d[:])
	if err != nil {
		return "", err
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return input + "." + b64u(sig), nil
}

func b64u(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// resource handles GET /kbs/v0/resource/<repo>/<type>/<tag>.
func (t *Trustee) resource(w http.ResponseWriter, r *http.Request, seg []string) error {
	_, s, why := t.sessionFor(r)
	if why != "" {
		// Trustee then looks for a bearer token, finds none: TokenNotFound.
		return errTokenNotFound
	}
	t.mu.Lock()
	attested, pk, tee := s.attested, s.pubkey, s.tee
	t.mu.Unlock()
	if !attested {
		return errTokenNotFound
	}
	allowed := t.AllowedTEEs
	if allowed == nil {
		allowed = []string{evidence.TEETDX, evidence.TEESample}
	}
	ok := false
	for _, a := range allowed {
		ok = ok || a == tee
	}
	if !ok {
		return &kbsError{http.StatusUnauthorized, "PolicyDeny", "Access denied by policy", ""}
	}
	if len(seg) != 3 || !kbc.ValidSegment(seg[0]) || !kbc.ValidSegment(seg[1]) || !kbc.ValidSegment(seg[2]) {
		return &kbsError{http.StatusUnauthorized, "PluginInternalError", "Plugin internal error", "resource path must be repo/type/tag"}
	}
	t.mu.Lock()
	secret, found := t.resources[strings.Join(seg, "/")]
	t.mu.Unlock()
	if !found {
		// Trustee: the resource plugin bails, which maps to PluginInternalError (401).
		return &kbsError{http.StatusUnauthorized, "PluginInternalError", "Plugin internal error", "resource not found"}
	}
	body, err := sealJWE(pk, secret)
	if err != nil {
		return &kbsError{http.StatusUnauthorized, "JweError", "JWE failed", err.Error()}
	}
	t.reply(w, StepResource, body)
	return nil
}

// SealJWEToJWK encrypts plaintext to a tee-pubkey given as its JSON (EC P-256 ECDH-ES+A256KW or
// RSA RSA-OAEP-256), as Trustee does: a flattened JWE {"protected","encrypted_key","iv",
// "ciphertext","tag"} with A256GCM and the protected header in Trustee's member order, e.g.
// {"alg":"ECDH-ES+A256KW","enc":"A256GCM","epk":{"crv":"P-256","kty":"EC","x":…,"y":…}}.
func SealJWEToJWK(jwk []byte, plaintext []byte) ([]byte, error) {
	pk, err := parsePubKey(jwk)
	if err != nil {
		return nil, err
	}
	return sealJWE(pk, plaintext)
}

func sealJWE(pk *typedPubKey, plaintext []byte) ([]byte, error) {
	cek := make([]byte, 32)
	rand.Read(cek)
	var protected, encKey []byte
	switch {
	case pk.ec != nil && pk.ec.Alg == "ECDH-ES+A256KW" && pk.ec.Crv == "P-256":
		x, err1 := base64.RawURLEncoding.DecodeString(pk.ec.X)
		y, err2 := base64.RawURLEncoding.DecodeString(pk.ec.Y)
		if err1 != nil || err2 != nil || len(x) != 32 || len(y) != 32 {
			return nil, errors.New("bad EC tee-pubkey coordinates")
		}
		peer, err := ecdh.P256().NewPublicKey(append(append([]byte{4}, x...), y...))
		if err != nil {
			return nil, err
		}
		eph, err := ecdh.P256().GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		z, err := eph.ECDH(peer)
		if err != nil {
			return nil, err
		}
		kek := concatKDF(z, "ECDH-ES+A256KW", 256)
		if encKey, err = aesKeyWrap(kek, cek); err != nil {
			return nil, err
		}
		ep := eph.PublicKey().Bytes()
		protected = fmt.Appendf(nil, `{"alg":"ECDH-ES+A256KW","enc":"A256GCM","epk":{"crv":"P-256","kty":"EC","x":"%s","y":"%s"}}`, b64u(ep[1:33]), b64u(ep[33:]))
	case pk.rsa != nil && pk.rsa.Alg == "RSA-OAEP-256":
		n, err1 := base64.RawURLEncoding.DecodeString(pk.rsa.N)
		e, err2 := base64.RawURLEncoding.DecodeString(pk.rsa.E)
		if err1 != nil || err2 != nil || len(e) > 4 {
			return nil, errors.New("bad RSA tee-pubkey")
		}
		pub := &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}
		var err error
		if encKey, err = rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, cek, nil); err != nil {
			return nil, err
		}
		protected = []byte(`{"alg":"RSA-OAEP-256","enc":"A256GCM"}`)
	default:
		return nil, errors.New("unsupported tee-pubkey algorithm")
	}
	prot := b64u(protected)
	block, _ := aes.NewCipher(cek)
	gcm, _ := cipher.NewGCM(block)
	iv := make([]byte, 12)
	rand.Read(iv)
	sealed := gcm.Seal(nil, iv, plaintext, []byte(prot))
	ct, tag := sealed[:len(sealed)-16], sealed[len(sealed)-16:]
	return json.Marshal(struct {
		Protected    string `json:"protected"`
		EncryptedKey string `json:"encrypted_key"`
		IV           string `json:"iv"`
		Ciphertext   string `json:"ciphertext"`
		Tag          string `json:"tag"`
	}{prot, b64u(encKey), b64u(iv), b64u(ct), b64u(tag)})
}

// concatKDF is NIST SP 800-56A Concat KDF with SHA-256 as JWA (RFC 7518 §4.6.2) uses it
// with empty apu/apv: otherInfo = len‖alg ‖ u32(0) ‖ u32(0) ‖ u32(keyBits).
func concatKDF(z []byte, alg string, keyBits int) []byte {
	var out []byte
	for round := uint32(1); len(out) < keyBits/8; round++ {
		h := sha256.New()
		binary.Write(h, binary.BigEndian, round)
		h.Write(z)
		binary.Write(h, binary.BigEndian, uint32(len(alg)))
		h.Write([]byte(alg))
		binary.Write(h, binary.BigEndian, uint32(0))
		binary.Write(h, binary.BigEndian, uint32(0))
		binary.Write(h, binary.BigEndian, uint32(keyBits))
		out = h.Sum(out)
	}
	return out[:keyBits/8]
}

// aesKeyWrap is RFC 3394 AES key wrap with the default IV.
func aesKeyWrap(kek, key []byte) ([]byte, error) {
	if len(key)%8 != 0 {
		return nil, errors.New("key wrap: key length not a multiple of 8")
	}
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	n := len(key) / 8
	r := make([][]byte, n)
	for i := range r {
		r[i] = append([]byte{}, key[i*8:(i+1)*8]...)
	}
	a := []byte{0xa6, 0xa6, 0xa6, 0xa6, 0xa6, 0xa6, 0xa6, 0xa6}
	buf := make([]byte, 16)
	for j := 0; j < 6; j++ {
		for i := 0; i < n; i++ {
			copy(buf, a)
			copy(buf[8:], r[i])
			block.Encrypt(buf, buf)
			t := uint64(n*j + i + 1)
			binary.BigEndian.PutUint64(a, binary.BigEndian.Uint64(buf[:8])^t)
			copy(r[i], buf[8:])
		}
	}
	out := append([]byte{}, a...)
	for _, b := range r {
		out = append(out, b...)
	}
	return out, nil
}

type statusRecorder struct {
	http.ResponseWriter
	status int
	n      int
	cause  string // of an error answer, for the log
}

func (s *statusRecorder) WriteHeader(c int) { s.status = c; s.ResponseWriter.WriteHeader(c) }
func (s *statusRecorder) Write(b []byte) (int, error) {
	n, err := s.ResponseWriter.Write(b)
	s.n += n
	return n, err
}

// Flush lets hooks stream slowly.
func (s *statusRecorder) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}
