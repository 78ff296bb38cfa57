package agent

import (
	"strconv"
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
