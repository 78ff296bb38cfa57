package evidence

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/cai-agent/cai-agent/evidence/internal/tcg"
)

// ErrInvalidEvent is returned for an Event that cannot be encoded unambiguously as AAEL text.
var ErrInvalidEvent = errors.New("invalid measurement event")

// Text returns the AAEL event text "domain operation content" (single spaces, no newline).
func (e Event) Text() string { return e.Domain + " " + e.Operation + " " + e.Content }

// Validate checks that e reads back unambiguously from its AAEL text: Domain and Operation are
// non-empty UTF-8 without whitespace, Content is UTF-8 without a newline (it may be empty).
func (e Event) Validate() error {
	for _, f := range []struct{ name, v string }{{"domain", e.Domain}, {"operation", e.Operation}} {
		if f.v == "" {
			return fmt.Errorf("%w: empty %s", ErrInvalidEvent, f.name)
		}
		if !utf8.ValidString(f.v) || strings.IndexFunc(f.v, unicode.IsSpace) >= 0 {
			return fmt.Errorf("%w: %s %q contains whitespace or invalid UTF-8", ErrInvalidEvent, f.name, f.v)
		}
	}
	if !utf8.ValidString(e.Content) || strings.ContainsAny(e.Content, "\n\r") {
		return fmt.Errorf("%w: content contains a newline or invalid UTF-8", ErrInvalidEvent)
	}
	return nil
}

// AAELDigest returns the digest extended into RTMR3 for ev: SHA-384 over the AAEL tagged event
// u32le 0x4141454C ‖ u32le len(text) ‖ text, where text is ev.Text(). For the event
// {"domain","operation","content"} it is dad5f0e2…3f670d02 (the attestation-agent vector).
func AAELDigest(ev Event) [48]byte { return tcg.AAELDigest(ev.Text()) }

// BinaryEvent returns the OpBinary event for a file: content {"path":path,"sha384":hex}.
func BinaryEvent(path string, sha384 []byte) (Event, error) {
	c, err := CanonicalJSON(map[string]string{"path": path, "sha384": fmt.Sprintf("%x", sha384)})
	if err != nil {
		return Event{}, err
	}
	return Event{Domain: Domain, Operation: OpBinary, Content: string(c)}, nil
}

// ModelEvent returns the OpModel event: content {"manifest_sha256":hex,"name":name}.
func ModelEvent(name string, manifestSHA256 []byte) (Event, error) {
	c, err := CanonicalJSON(ModelInfo{Name: name, ManifestSHA256: fmt.Sprintf("%x", manifestSHA256)})
	if err != nil {
		return Event{}, err
	}
	return Event{Domain: Domain, Operation: OpModel, Content: string(c)}, nil
}
