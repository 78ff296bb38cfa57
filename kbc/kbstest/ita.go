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
	"io"
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
// (RSA-OAEP-SHA-256 SWK, crypto/ccz AES-GCM).
//
// Differences from the real service, documented: a failed evidence check answers 401 here
// (the real KBS relays the appraisal failure as 502 "Error retrieving token from appraisal
// service"); error bodies are {"message": …}; PEM user_data is not accepted.
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

var idRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// SetKey stores key under the UUID id.
func (s *ITA) SetKey(id string, key []byte) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("kbstest: key id %q is not a UUID", id)
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

type itaError struct {
	status int
	msg    string
}

func (e *itaError) Error() string { return e.msg }

// ServeHTTP implements http.Handler.
func (s *ITA) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rec := &statusRecorder{ResponseWriter: w, status: 200}
	start := time.Now()
	s.serve(rec, r)
	if s.Log != nil {
		s.Log.Info("ita kbs request", "method", r.Method, "path", r.URL.Path, "status", rec.status, "bytes", rec.n, "duration", time.Since(start).Round(time.Microsecond))
	}
}

func (s *ITA) serve(w http.ResponseWriter, r *http.Request) {
	rest, ok := strings.CutPrefix(r.URL.Path, "/kbs/v1/keys/")
	id, ok2 := strings.CutSuffix(rest, "/transfer")
	if !ok || !ok2 || !idRE.MatchString(id) || r.Method != http.MethodPost {
		http.NotFound(w, r)
		return
	}
	step := StepTransfer
	if r.Header.Get("Attestation-Type") == "" && r.ContentLength <= 0 {
		step = StepNonce
	}
	if s.Intercept != nil && s.Intercept(step, w, r) {
		return
	}
	body, err := s.transfer(r, strings.ToLower(id))
	if err != nil {
		var ie *itaError
		if !errors.As(err, &ie) {
			ie = &itaError{http.StatusInternalServerError, err.Error()}
		}
		b, _ := json.Marshal(map[string]string{"message": ie.msg})
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(ie.status)
		w.Write(b)
		return
	}
	if s.Rewrite != nil {
		body = s.Rewrite(step, body)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Attestation-Type", "TDX")
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

func (s *ITA) transfer(r *http.Request, id string) ([]byte, error) {
	if r.Header.Get("Accept") != "application/json" {
		return nil, &itaError{http.StatusBadRequest, "Invalid Accept header"}
	}
	attType := r.Header.Get("Attestation-Type")
	var req transferRequest
	if attType != "" {
		if r.Header.Get("Content-Type") != "application/json" {
			return nil, &itaError{http.StatusBadRequest, "Invalid Content-type header"}
		}
		if attType != "SGX" && attType != "TDX" {
			return nil, &itaError{http.StatusBadRequest, "Invalid attestion type header"}
		}
		if r.ContentLength == 0 {
			return nil, &itaError{http.StatusBadRequest, "Request body was not provided"}
		}
	}
	raw, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, 1<<20))
	if err != nil {
		return nil, &itaError{http.StatusBadRequest, "Failed to read request body"}
	}
	if len(bytes.TrimSpace(raw)) > 0 {
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			return nil, &itaError{http.StatusBadRequest, "Failed to JSON-decode request body"}
		}
	}
	s.mu.Lock()
	key, found := s.keys[id]
	s.mu.Unlock()
	if !found {
		return nil, &itaError{http.StatusNotFound, "Key with specified id does not exist"}
	}
	var userData []byte
	switch {
	case attType == "" && req.AttestationToken == "":
		return s.newNonce()
	case attType == "":
		if userData, err = s.verifyToken(req.AttestationToken); err != nil {
			return nil, &itaError{http.StatusUnauthorized, "Failed to authenticate attestation-token"}
		}
	case attType != "TDX":
		return nil, &itaError{http.StatusUnauthorized, "attestation-type in request header does not match with attestation-type in key-transfer policy"}
	default:
		if err := s.checkEvidence(&req); err != nil {
			return nil, &itaError{http.StatusUnauthorized, "evidence check failed: " + err.Error()}
		}
		userData = req.UserData
	}
	pub, err := parseUserData(userData)
	if err != nil {
		return nil, &itaError{http.StatusInternalServerError, "Error in getting public key"}
	}
	swk := make([]byte, 32)
	rand.Read(swk)
	defer clear(swk)
	wk, err := ccz.Seal(swk, key, rand.Reader)
	if err != nil {
		return nil, &itaError{http.StatusInternalServerError, "Failed to encrypt secret key with swk"}
	}
	ws, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, swk, nil)
	if err != nil {
		return nil, &itaError{http.StatusInternalServerError, "Failed to wrap key"}
	}
	return json.Marshal(struct {
		WrappedKey []byte `json:"wrapped_key"`
		WrappedSWK []byte `json:"wrapped_swk"`
	}{wk, ws})
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

func (s *ITA) newNonce() ([]byte, error) {
	val := make([]byte, 64)
	rand.Read(val)
	iat := []byte(s.now().UTC().Format(time.RFC3339Nano))
	return json.Marshal(itaNonce{Val: val, Iat: iat, Signature: s.nonceMAC(val, iat)})
}

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
		if !hmac.Equal(req.Nonce.Signature, s.nonceMAC(req.Nonce.Val, req.Nonce.Iat)) {
			return errors.New("nonce signature does not verify")
		}
		iat, err := time.Parse(time.RFC3339Nano, string(req.Nonce.Iat))
		ttl := s.NonceTTL
		if ttl <= 0 {
			ttl = 5 * time.Minute
		}
		if err != nil || s.now().Sub(iat) > ttl {
			return errors.New("nonce expired")
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

// IssueToken plays Intel Trust Authority in passport mode: it returns an ES256 token whose
// attester_held_data is userData, valid for 5 minutes, which this server accepts.
func (s *ITA) IssueToken(userData []byte) (string, error) {
	_, k := s.secrets()
	now := s.now()
	return signES256(k, map[string]string{"alg": "ES256", "typ": "JWT"}, map[string]any{
		"attester_type": "TDX", "attester_held_data": base64.StdEncoding.EncodeToString(userData),
		"iat": now.Unix(), "exp": now.Add(5 * time.Minute).Unix(),
	})
}

func (s *ITA) verifyToken(tok string) ([]byte, error) {
	_, k := s.secrets()
	parts := strings.Split(strings.TrimSpace(tok), ".")
	if len(parts) != 3 {
		return nil, errors.New("not a JWT")
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil || len(sig) != 64 {
		return nil, errors.New("bad signature encoding")
	}
	d := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if !ecdsa.Verify(&k.PublicKey, d[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
		return nil, errors.New("bad signature")
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return nil, err
	}
	var c struct {
		Type string          `json:"attester_type"`
		Held string          `json:"attester_held_data"`
		Exp  json.Number     `json:"exp"`
		_    json.RawMessage `json:"-"`
	}
	if err := json.Unmarshal(payload, &c); err != nil {
		return nil, err
	}
	exp, err := strconv.ParseInt(c.Exp.String(), 10, 64)
	if err != nil || s.now().Unix() >= exp || c.Type != "TDX" {
		return nil, errors.New("token expired or not TDX")
	}
	return base64.StdEncoding.DecodeString(c.Held)
}
