package kbstest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cai-agent/cai-agent/crypto/ccz"
)

// ITA is an Intel Trust Authority KBS (API v1 key transfer) test server: an http.Handler
// serving POST /kbs/v1/keys/{uuid}/transfer. It plays both the KBS and, for the evidence
// check, Intel Trust Authority: it issues HMAC-signed nonces, checks the REPORTDATA binding of
// TDX quotes (signature NOT verified), verifies its own passport tokens (IssueToken), parses
// user_data as u32le(e) ‖ big-endian n (more than 2048 bits) and wraps keys for real
// (RSA-OAEP-SHA-256 SWK, crypto/ccz AES-GCM). For passport mode, ITAAppraisal plays Trust
// Authority's appraisal API with this server's keys, so the tokens it issues verify here.
//
// As the real KBS (intel/trustauthority-kbs, transport/http/key_transfer.go and
// service/key_transfer.go) it routes only version-4 UUIDs and POST (else 404/405); wants
// Accept: application/json, and Content-Type: application/json on any non-empty body (else
// 415); answers an empty body without Attestation-Type with a nonce and refuses a non-empty
// one that has neither Attestation-Type nor attestation_token (400); refuses unknown JSON
// members (400); and writes errors as {"error": "<status>: <message>"} ({"error": "<message>"}
// for the 400/415 request checks).
//
// Differences from the real service, documented: a failed evidence check answers 401 here
// (the real KBS relays the appraisal failure as 502 "Error retrieving token from Trust
// Authority service", which a client retries and then reports as a transport error); there is
// no key-transfer policy beyond the TDX attestation type; request bodies are limited to 1 MiB.
type ITA struct {
	// RequireNonce refuses background-check requests without a nonce.
	RequireNonce bool
	// NonceTTL bounds a nonce's age; 0 = 5 minutes.
	NonceTTL time.Duration
	// Now is the clock; nil = time.Now.
	Now func() time.Time
	// Log receives one line per request (never secrets); nil = discard.
	Log *slog.Logger
	Hooks

	mu       sync.Mutex
	keys     map[string][]byte
	nonceKey []byte
	tokenKey *ecdsa.PrivateKey
}

// NewITA returns an ITA server with no keys.
func NewITA() *ITA { return &ITA{} }

// idRE is the KBS route's key id: a version-4 UUID (constant.UUIDReg).
var idRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$`)

// SetKey stores key under id, a version-4 UUID (the only ids the KBS creates and routes).
func (s *ITA) SetKey(id string, key []byte) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("kbstest: key id %q is not a version-4 UUID", id)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.keys == nil {
		s.keys = map[string][]byte{}
	}
	s.keys[strings.ToLower(id)] = append([]byte{}, key...)
	return nil
}

func (s *ITA) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

func (s *ITA) secrets() ([]byte, *ecdsa.PrivateKey) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.nonceKey == nil {
		s.nonceKey = make([]byte, 32)
		rand.Read(s.nonceKey)
		s.tokenKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	return s.nonceKey, s.tokenKey
}

// itaError is a refusal. The KBS's request checks answer their message as is; its service's
// errors (HandledError) answer "<status>: <message>".
type itaError struct {
	status  int
	msg     string
	handled bool
}

func (e *itaError) Error() string {
	if e.handled {
		return fmt.Sprintf("%d: %s", e.status, e.msg)
	}
	return e.msg
}

// handled is a service error. Errors of the KBS's validateClaimsAndGetKey are wrapped twice
// there, so their message is itself "0: <message>".
func handled(status int, msg string) error { return &itaError{status, msg, true} }

func keyError(status int, msg string) error { return handled(status, "0: "+msg) }

// ServeHTTP implements http.Handler.
func (s *ITA) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	serveLogged(s.Log, "ita kbs request", w, r, s.serve)
}

func (s *ITA) serve(w http.ResponseWriter, r *http.Request) {
	rest, ok := strings.CutPrefix(r.URL.Path, "/kbs/v1/keys/")
	id, ok2 := strings.CutSuffix(rest, "/transfer")
	if !ok || !ok2 || !idRE.MatchString(id) {
		http.NotFound(w, r)
		return
	}
	if r.Method != http.MethodPost {
		w.WriteHeader(http.StatusMethodNotAllowed) // gorilla/mux: no body
		return
	}
	step := StepTransfer
	if r.Header.Get("Attestation-Type") == "" && r.ContentLength == 0 {
		step = StepNonce
	}
	if s.Intercept != nil && s.Intercept(step, w, r) {
		return
	}
	body, attType, err := s.transfer(r, strings.ToLower(id))
	if err != nil {
		var ie *itaError
		if !errors.As(err, &ie) {
			ie = &itaError{http.StatusInternalServerError, err.Error(), true}
		}
		// The KBS's errorEncoder: status, then {"error": …}; no Content-Type.
		w.WriteHeader(ie.status)
		json.NewEncoder(w).Encode(map[string]string{"error": ie.Error()})
		return
	}
	if s.Rewrite != nil {
		body = s.Rewrite(step, body)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Attestation-Type", attType) // the policy's on a nonce, empty on a key
	w.WriteHeader(http.StatusOK)
	w.Write(body)
}

type itaNonce struct {
	Val       []byte `json:"val"`
	Iat       []byte `json:"iat"`
	Signature []byte `json:"signature"`
}

type transferRequest struct {
	AttestationToken string    `json:"attestation_token,omitempty"`
	Quote            []byte    `json:"quote,omitempty"`
	Nonce            *itaNonce `json:"nonce,omitempty"`
	UserData         []byte    `json:"user_data,omitempty"`
	EventLog         []byte    `json:"event_log,omitempty"`
}

// encode writes v as the KBS does (json.Encoder: newline-terminated).
func encode(v any) ([]byte, error) {
	var b bytes.Buffer
	err := json.NewEncoder(&b).Encode(v)
	return b.Bytes(), err
}

// transfer answers a request with the body and Attestation-Type header of a 200, or an error.
func (s *ITA) transfer(r *http.Request, id string) ([]byte, string, error) {
	// The KBS's decodeTransferKeyHTTPRequest.
	if r.Header.Get("Accept") != "application/json" {
		return nil, "", &itaError{status: http.StatusUnsupportedMediaType, msg: "Invalid Accept header"}
	}
	attType := r.Header.Get("Attestation-Type")
	var req transferRequest
	if r.ContentLength != 0 {
		if r.Header.Get("Content-Type") != "application/json" {
			return nil, "", &itaError{status: http.StatusUnsupportedMediaType, msg: "Invalid Content-type header"}
		}
		dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			return nil, "", &itaError{status: http.StatusBadRequest, msg: "Failed to JSON-decode request body"}
		}
		if attType != "" {
			if attType != "SGX" && attType != "TDX" {
				return nil, "", &itaError{status: http.StatusBadRequest, msg: "Invalid attestion type header"}
			}
		} else if req.AttestationToken == "" {
			return nil, "", &itaError{status: http.StatusBadRequest, msg: "Invalid request body"}
		}
	}
	// The KBS's TransferKeyWithEvidence; the key's transfer policy is TDX.
	s.mu.Lock()
	key, found := s.keys[id]
	s.mu.Unlock()
	if !found {
		return nil, "", handled(http.StatusNotFound, "Key with specified id does not exist")
	}
	var userData []byte
	switch {
	case attType == "" && req.AttestationToken == "":
		b, err := s.newNonce()
		return b, "TDX", err
	case attType == "":
		typ, held, err := s.verifyToken(req.AttestationToken)
		if err != nil {
			return nil, "", handled(http.StatusUnauthorized, "Failed to authenticate attestation-token")
		}
		if typ != "TDX" {
			return nil, "", handled(http.StatusUnauthorized, "attestation-token is not valid for attestation-type in key-transfer policy")
		}
		// The KBS decodes attester_held_data (std base64) when it wraps the key.
		if userData, err = base64.StdEncoding.DecodeString(held); err != nil {
			return nil, "", keyError(http.StatusInternalServerError, "Error in getting public key")
		}
	case attType != "TDX":
		return nil, "", handled(http.StatusUnauthorized, "attestation-type in request header does not match with attestation-type in key-transfer policy")
	default:
		if err := s.checkEvidence(&req); err != nil {
			return nil, "", handled(http.StatusUnauthorized, "evidence check failed: "+err.Error())
		}
		userData = req.UserData
	}
	pub, err := parseUserData(userData)
	if err != nil {
		return nil, "", keyError(http.StatusInternalServerError, "Error in getting public key")
	}
	swk := make([]byte, 32)
	rand.Read(swk)
	defer clear(swk)
	wk, err := ccz.Seal(swk, key, rand.Reader)
	if err != nil {
		return nil, "", keyError(http.StatusInternalServerError, "Failed to encrypt secret key with swk")
	}
	ws, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, swk, nil)
	if err != nil {
		return nil, "", keyError(http.StatusInternalServerError, "Failed to wrap key")
	}
	b, err := encode(struct {
		WrappedKey []byte `json:"wrapped_key"`
		WrappedSWK []byte `json:"wrapped_swk,omitempty"`
	}{wk, ws})
	return b, "", err
}

// parseUserData parses u32le(e) ‖ big-endian n, requiring more than 2048 bits (the KBS rule).
func parseUserData(b []byte) (*rsa.PublicKey, error) {
	if len(b) < 5 {
		return nil, errors.New("attester held data is missing or invalid")
	}
	n := new(big.Int).SetBytes(b[4:])
	if n.BitLen() <= 2048 {
		return nil, errors.New("RSA key size must be greater than 2048 bits")
	}
	e := binary.LittleEndian.Uint32(b[:4])
	if e < 3 || e%2 == 0 || e > 1<<31-1 {
		return nil, errors.New("bad RSA exponent")
	}
	return &rsa.PublicKey{N: n, E: int(e)}, nil
}

func (s *ITA) nonceMAC(val, iat []byte) []byte {
	k, _ := s.secrets()
	m := hmac.New(sha256.New, k)
	m.Write(val)
	m.Write(iat)
	return m.Sum(nil)
}

// nonceIatLayout is how Intel Trust Authority writes a nonce's iat: Go's time.Time String
// form, e.g. "2022-08-24 12:36:32.929722075 +0000 UTC" (trustauthority-client-for-go's
// connector tests).
const nonceIatLayout = "2006-01-02 15:04:05.999999999 -0700 MST"

// mintNonceAt returns a nonce issued at now as Intel Trust Authority issues them: 64 random
// bytes, the issue time, a signature (here an HMAC under a key of this server's).
func (s *ITA) mintNonceAt(now time.Time) itaNonce {
	val := make([]byte, 64)
	rand.Read(val)
	iat := []byte(now.UTC().Format(nonceIatLayout))
	return itaNonce{Val: val, Iat: iat, Signature: s.nonceMAC(val, iat)}
}

// checkNonce verifies n's signature and that it is at most ttl (0 = 5 minutes) old at now.
func (s *ITA) checkNonce(n *itaNonce, now time.Time, ttl time.Duration) error {
	if !hmac.Equal(n.Signature, s.nonceMAC(n.Val, n.Iat)) {
		return errors.New("nonce signature does not verify")
	}
	if ttl <= 0 {
		ttl = 5 * time.Minute
	}
	iat, err := time.Parse(nonceIatLayout, string(n.Iat))
	if err != nil || now.Sub(iat) > ttl {
		return errors.New("nonce expired")
	}
	return nil
}

func (s *ITA) newNonce() ([]byte, error) { return encode(s.mintNonceAt(s.now())) }

func (s *ITA) checkEvidence(req *transferRequest) error {
	if len(req.Quote) == 0 || len(req.UserData) == 0 {
		return errors.New("quote and user_data are required")
	}
	rd, err := QuoteReportData(req.Quote)
	if err != nil {
		return err
	}
	h := sha512.New()
	if req.Nonce != nil {
		if err := s.checkNonce(req.Nonce, s.now(), s.NonceTTL); err != nil {
			return err
		}
		h.Write(req.Nonce.Val)
		h.Write(req.Nonce.Iat)
	} else if s.RequireNonce {
		return errors.New("a nonce is required")
	}
	h.Write(req.UserData)
	if !bytes.Equal(rd, h.Sum(nil)) {
		return errors.New("TDX quote REPORTDATA does not bind the nonce and user_data")
	}
	return nil
}

// IssueToken plays Intel Trust Authority in passport mode without any evidence: it returns an
// ES256 token whose attester_held_data is userData, valid for 5 minutes, which this server
// accepts. ITAAppraisal issues such tokens after checking a quote.
func (s *ITA) IssueToken(userData []byte) (string, error) {
	return s.issueToken(userData, s.now(), nil)
}

// issueToken signs a token with attester_type TDX, attester_held_data userData, iat now and
// exp 5 minutes later, plus the extra claims.
func (s *ITA) issueToken(userData []byte, now time.Time, extra map[string]any) (string, error) {
	_, k := s.secrets()
	claims := map[string]any{}
	for c, v := range extra {
		claims[c] = v
	}
	claims["attester_type"] = "TDX"
	claims["attester_held_data"] = base64.StdEncoding.EncodeToString(userData)
	claims["iat"] = now.Unix()
	claims["exp"] = now.Add(5 * time.Minute).Unix()
	return signES256(k, map[string]string{"alg": "ES256", "typ": "JWT"}, claims)
}

// verifyToken checks the signature and expiry of a token from IssueToken and returns its
// attester_type and attester_held_data claims.
func (s *ITA) verifyToken(tok string) (typ, held string, err error) {
	_, k := s.secrets()
	parts := strings.Split(strings.TrimSpace(tok), ".")
	if len(parts) != 3 {
		return "", "", errors.New("not a JWT")
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil || len(sig) != 64 {
		return "", "", errors.New("bad signature encoding")
	}
	d := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if !ecdsa.Verify(&k.PublicKey, d[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
		return "", "", errors.New("bad signature")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return "", "", err
	}
	var c struct {
		Type string          `json:"attester_type"`
		Held string          `json:"attester_held_data"`
		Exp  json.Number     `json:"exp"`
		_    json.RawMessage `json:"-"`
	}
	if err := json.Unmarshal(payload, &c); err != nil {
		return "", "", err
	}
	exp, err := strconv.ParseInt(c.Exp.String(), 10, 64)
	if err != nil || s.now().Unix() >= exp {
		return "", "", errors.New("token expired")
	}
	return c.Type, c.Held, nil
}
