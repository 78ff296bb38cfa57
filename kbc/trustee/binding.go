package trustee

import (
	"crypto/sha256"
	"crypto/sha512"
	"fmt"
	"hash"
	"strings"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/kbc"
)

// Hash algorithm names as Trustee spells them in extra-params.
const (
	SHA256 = "sha256"
	SHA384 = "sha384"
	SHA512 = "sha512"
)

// SupportedHashAlgorithms is what the client offers in Request.extra-params. (Trustee also
// knows sm3; cai-agent does not implement it.)
var SupportedHashAlgorithms = []string{SHA256, SHA384, SHA512}

func newHash(name string) (hash.Hash, error) {
	switch strings.ToLower(name) {
	case SHA256:
		return sha256.New(), nil
	case SHA384:
		return sha512.New384(), nil
	case SHA512:
		return sha512.New(), nil
	}
	return nil, fmt.Errorf("%w: unsupported hash algorithm %q", kbc.ErrProtocol, name)
}

// ReportData computes the REPORTDATA that binds a Trustee challenge to the TEE key (RCAR
// 0.3.0+ runtime data):
//
//	H(JCS({"additional-evidence": additional, "nonce": nonce, "tee-pubkey": jwk})) ‖ zero padding to 64 bytes
//
// where H is hashAlg (sha256, sha384 — Trustee's default — or sha512), nonce is the
// challenge's nonce string verbatim and jwk the tee-pubkey exactly as sent (a JSON object of
// strings). JCS is RFC 8785 (evidence.CanonicalJSON).
func ReportData(hashAlg, nonce string, jwk map[string]string, additional string) ([64]byte, error) {
	var rd [64]byte
	h, err := newHash(hashAlg)
	if err != nil {
		return rd, err
	}
	pre, err := evidence.CanonicalJSON(map[string]any{
		"additional-evidence": additional,
		"nonce":               nonce,
		"tee-pubkey":          jwk,
	})
	if err != nil {
		return rd, err
	}
	h.Write(pre)
	copy(rd[:], h.Sum(nil))
	return rd, nil
}
