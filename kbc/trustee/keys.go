package trustee

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"strings"

	"github.com/go-jose/go-jose/v4"

	"github.com/cai-agent/cai-agent/kbc"
)

// Key algorithms of the ephemeral TEE key (the tee-pubkey "alg").
const (
	// AlgECDHES is EC P-256 with ECDH-ES+A256KW, the default (as in guest-components).
	AlgECDHES = "ECDH-ES+A256KW"
	// AlgRSAOAEP256 is RSA-3072 with RSA-OAEP-256.
	AlgRSAOAEP256 = "RSA-OAEP-256"
)

// RSABits is the size of the ephemeral RSA key.
const RSABits = 3072

// teeKey is the client's ephemeral key pair.
type teeKey struct {
	alg  string
	priv any // *ecdsa.PrivateKey or *rsa.PrivateKey
	jwk  map[string]string
}

func b64u(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func newTEEKey(alg string) (*teeKey, error) {
	switch alg {
	case AlgECDHES:
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		return ecKey(k)
	case AlgRSAOAEP256:
		k, err := rsa.GenerateKey(rand.Reader, RSABits)
		if err != nil {
			return nil, err
		}
		return rsaKey(k), nil
	}
	return nil, fmt.Errorf("%w: unsupported TEE key algorithm %q (want %s or %s)", kbc.ErrConfig, alg, AlgECDHES, AlgRSAOAEP256)
}

// ecKey returns the P-256 key with its JWK: exactly alg, crv, kty, x, y, coordinates as
// fixed-length (32-byte) unpadded base64url.
func ecKey(k *ecdsa.PrivateKey) (*teeKey, error) {
	pub, err := k.PublicKey.Bytes() // 0x04 ‖ X ‖ Y, fixed length
	if err != nil {
		return nil, err
	}
	if len(pub) != 65 {
		return nil, errors.New("trustee: TEE key is not P-256")
	}
	return &teeKey{alg: AlgECDHES, priv: k, jwk: map[string]string{
		"kty": "EC", "crv": "P-256", "alg": AlgECDHES,
		"x": b64u(pub[1:33]), "y": b64u(pub[33:]),
	}}, nil
}

// rsaKey returns the RSA key with its JWK: exactly alg, e, kty, n (big-endian, unpadded
// base64url, no leading zeros).
func rsaKey(k *rsa.PrivateKey) *teeKey {
	return &teeKey{alg: AlgRSAOAEP256, priv: k, jwk: map[string]string{
		"kty": "RSA", "alg": AlgRSAOAEP256,
		"n": b64u(k.N.Bytes()), "e": b64u(big.NewInt(int64(k.E)).Bytes()),
	}}
}

// jweMembers are the members of Trustee's flattened JWE (kbs-types Response). "aad" is
// optional in kbs-types but Trustee never sends it, and kbs-types treats it differently from
// RFC 7516, so cai-agent refuses it.
type flatJWE struct {
	Protected    string `json:"protected"`
	EncryptedKey string `json:"encrypted_key"`
	IV           string `json:"iv"`
	Ciphertext   string `json:"ciphertext"`
	Tag          string `json:"tag"`
}

// Decrypt opens a resource JWE (flattened JSON serialization) addressed to this key.
//
// Checked: only the members protected, encrypted_key, iv, ciphertext, tag (names matched
// exactly, as go-jose matches them); every member is
// canonical unpadded base64url, so the GCM additional data go-jose uses (its re-encoding of
// the protected header) is exactly the received "protected" string (RFC 7516 §5.2); alg is
// this key's algorithm and enc is A256GCM (go-jose allow-list); no "zip" or "crit"; for EC,
// epk is on P-256. All failures wrap kbc.ErrProtocol.
func (k *teeKey) Decrypt(body []byte) ([]byte, error) {
	// encoding/json matches member names case-insensitively, go-jose's parser exactly: with
	// "Protected" beside "protected" the checks below would read one header and go-jose
	// decrypt under the other. So every member name must be exactly one of the five.
	var members map[string]json.RawMessage
	if err := json.Unmarshal(body, &members); err != nil {
		return nil, fmt.Errorf("%w: resource is not a flattened JWE: %v", kbc.ErrProtocol, err)
	}
	for name := range members {
		switch name {
		case "protected", "encrypted_key", "iv", "ciphertext", "tag":
		default:
			return nil, fmt.Errorf("%w: resource JWE has an unexpected member %q", kbc.ErrProtocol, kbc.Sanitize(name))
		}
	}
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	var j flatJWE
	if err := dec.Decode(&j); err != nil {
		return nil, fmt.Errorf("%w: resource is not a flattened JWE: %v", kbc.ErrProtocol, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: resource JWE has trailing data", kbc.ErrProtocol)
	}
	for name, v := range map[string]string{"protected": j.Protected, "encrypted_key": j.EncryptedKey, "iv": j.IV, "ciphertext": j.Ciphertext, "tag": j.Tag} {
		if _, err := base64.RawURLEncoding.Strict().DecodeString(v); err != nil || (v == "" && name != "ciphertext") {
			return nil, fmt.Errorf("%w: resource JWE member %q is not canonical unpadded base64url", kbc.ErrProtocol, name)
		}
	}
	hdrJSON, _ := base64.RawURLEncoding.DecodeString(j.Protected)
	var hdr map[string]json.RawMessage
	if err := json.Unmarshal(hdrJSON, &hdr); err != nil {
		return nil, fmt.Errorf("%w: resource JWE protected header: %v", kbc.ErrProtocol, err)
	}
	for _, bad := range []string{"zip", "crit"} {
		if _, ok := hdr[bad]; ok {
			return nil, fmt.Errorf("%w: resource JWE protected header has %q", kbc.ErrProtocol, bad)
		}
	}
	if k.alg == AlgECDHES {
		var epk struct {
			Crv string `json:"crv"`
		}
		if err := json.Unmarshal(hdr["epk"], &epk); err != nil || epk.Crv != "P-256" {
			return nil, fmt.Errorf("%w: resource JWE epk is not a P-256 key", kbc.ErrProtocol)
		}
	}
	obj, err := jose.ParseEncryptedJSON(string(body), []jose.KeyAlgorithm{jose.KeyAlgorithm(k.alg)}, []jose.ContentEncryption{jose.A256GCM})
	if err != nil {
		return nil, fmt.Errorf("%w: resource JWE: %v", kbc.ErrProtocol, err)
	}
	pt, err := obj.Decrypt(k.priv)
	if err != nil {
		return nil, fmt.Errorf("%w: resource JWE does not decrypt with the TEE key (tampered or addressed to another key): %v", kbc.ErrProtocol, err)
	}
	return pt, nil
}
