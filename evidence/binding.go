package evidence

import (
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"unicode/utf8"

	"github.com/gowebpki/jcs"
)

// CanonicalJSON marshals v and returns its RFC 8785 (JCS) canonical form: sorted keys, no
// insignificant whitespace, minimal string escaping, ECMAScript number formatting.
func CanonicalJSON(v any) ([]byte, error) {
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("canonical json: %w", err)
	}
	out, err := jcs.Transform(raw)
	if err != nil {
		return nil, fmt.Errorf("canonical json: %w", err)
	}
	return out, nil
}

// NoncePurpose tags the REPORTDATA preimage of evidence served to relying parties, so it can
// never be confused with a KBS binding (which has different keys).
const NoncePurpose = "cai-agent/evidence/v1"

// NonceReportData returns the REPORTDATA that binds a relying party's nonce and the event log
// served with the quote:
//
//	SHA-384(JCS({"event_log_sha384": hex(SHA-384(ccEventLog)), "nonce": nonce, "purpose": NoncePurpose})) ‖ 16 zero bytes
//
// ccEventLog is exactly the cc_eventlog bytes served beside the quote (nil and empty are the
// same). A nonce that is not valid UTF-8 is an error. Binding the log digest means a verifier knows the log was not swapped after the quote.
func NonceReportData(nonce string, ccEventLog []byte) ([64]byte, error) {
	// encoding/json would replace invalid UTF-8 with U+FFFD, binding many nonces alike.
	if !utf8.ValidString(nonce) {
		return [64]byte{}, fmt.Errorf("nonce is not valid UTF-8")
	}
	logDigest := sha512.Sum384(ccEventLog)
	pre, err := CanonicalJSON(map[string]string{
		"event_log_sha384": hex.EncodeToString(logDigest[:]),
		"nonce":            nonce,
		"purpose":          NoncePurpose,
	})
	if err != nil {
		return [64]byte{}, err
	}
	var rd [64]byte
	d := sha512.Sum384(pre)
	copy(rd[:], d[:])
	return rd, nil
}
