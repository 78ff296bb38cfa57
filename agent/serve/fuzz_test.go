package serve

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/cai-agent/cai-agent/evidence"
)

// FuzzDecodeMeasurement: any body either is refused with a 4xx or yields an event that
// validates, within the size limits, outside the reserved domain.
func FuzzDecodeMeasurement(f *testing.F) {
	for _, s := range []string{
		`{"domain":"a","operation":"b","content":"c"}`,
		`{"domain":"a","operation":"b","content":"{\"z\":1,\"a\":[1,2]}"}`,
		`{"domain":"a b","operation":"b","content":"c"}`,
		`{"domain":"a","operation":"b","content":"x\ny"}`,
		`{"domain":"github.com/cai-agent","operation":"Model","content":"{}"}`,
		`{"domain":"a","operation":"b"}`,
		`[]`, `null`, `{}{}`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		w := httptest.NewRecorder()
		r := httptest.NewRequest(http.MethodPost, PathMeasurements, strings.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		ev, status, err := decodeMeasurement(w, r)
		if err != nil {
			if status < 400 || status > 499 {
				t.Fatalf("error %v with status %d", err, status)
			}
			return
		}
		if err := ev.Validate(); err != nil {
			t.Fatalf("accepted an invalid event: %v", err)
		}
		if ev.Domain == evidence.Domain || len(ev.Domain) > MaxFieldLen || len(ev.Operation) > MaxFieldLen || len(ev.Content) > MaxContentLen {
			t.Fatalf("accepted %+v", ev)
		}
	})
}
