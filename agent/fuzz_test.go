package agent

import (
	"bytes"
	"encoding/base64"
	"errors"
	"strconv"
	"strings"
	"testing"
)

func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"bytes 0-9/10", "bytes 5-9/*", "bytes 9-5/10", "bytes 0-9/9", "bytes -1-2/3", "bytes 1-2", "items 0-1/2", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		start, total, ok := parseContentRange(s)
		if !ok {
			return
		}
		if start < 0 || (total != -1 && total <= start) {
			t.Fatalf("%q: start %d total %d", s, start, total)
		}
		if total >= 0 {
			// The range it came from round-trips.
			if _, _, ok := parseContentRange("bytes " + strconv.FormatInt(start, 10) + "-" + strconv.FormatInt(start, 10) + "/" + strconv.FormatInt(total, 10)); !ok {
				t.Fatalf("%q: canonical form refused", s)
			}
		}
	})
}

func TestParseContentRange(t *testing.T) {
	for s, want := range map[string][3]int64{
		"bytes 0-9/10":   {0, 10, 1},
		"bytes 5-9/*":    {5, -1, 1},
		"bytes 9-5/10":   {0, 0, 0},
		"bytes 0-9/9":    {0, 0, 0},
		"bytes 1-2":      {0, 0, 0},
		"items 0-1/2":    {0, 0, 0},
		"bytes 10-19/20": {10, 20, 1},
	} {
		start, total, ok := parseContentRange(s)
		if ok != (want[2] == 1) || (ok && (start != want[0] || total != want[1])) {
			t.Errorf("%q: got %d %d %v", s, start, total, ok)
		}
	}
}

// ParseKey sees a secret from a key broker: it accepts exactly the two documented forms and
// its error never carries the secret (nor its base64 body).
func FuzzParseKey(f *testing.F) {
	key := bytes.Repeat([]byte{0x5a}, 32)
	f.Add(key)
	f.Add([]byte(base64.StdEncoding.EncodeToString(key) + "\n"))
	f.Add([]byte(" \t" + base64.StdEncoding.EncodeToString(key[:31])))
	f.Add([]byte("not a key at all, but long enough to be recognised"))
	f.Fuzz(func(t *testing.T, secret []byte) {
		k, err := ParseKey(secret)
		if err != nil {
			if !errors.Is(err, ErrKey) {
				t.Fatalf("error %v is not ErrKey", err)
			}
			if trimmed := bytes.TrimSpace(secret); len(trimmed) >= 4 && strings.Contains(err.Error(), string(trimmed)) {
				t.Fatalf("error %q contains the secret", err)
			}
			return
		}
		if len(k) != 32 {
			t.Fatalf("key of %d bytes", len(k))
		}
		if len(secret) != 32 {
			if d, err := base64.StdEncoding.DecodeString(string(bytes.TrimSpace(secret))); err != nil || !bytes.Equal(d, k) {
				t.Fatalf("accepted %q as a key it does not encode", secret)
			}
		} else if !bytes.Equal(secret, k) {
			t.Fatal("a 32-byte secret is not taken as the raw key")
		}
	})
}
