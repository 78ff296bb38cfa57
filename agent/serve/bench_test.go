package serve

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"testing"

	"github.com/cai-agent/cai-agent/evidence"
)

// BenchmarkEvidence measures GET /v1/evidence end to end over the unix socket (HTTP, queue,
// binding, sample quote, log parsing, JSON) with 8 RTMR3 events in the log.
func BenchmarkEvidence(b *testing.B) {
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(quietLogger())
	p := samplePlatform(b)
	for i := range 8 {
		if _, err := p.Measure(context.Background(), evidence.Event{Domain: "example.com", Operation: "Bench", Content: fmt.Sprint(i)}); err != nil {
			b.Fatal(err)
		}
	}
	h := start(b, Config{Platform: p, MaxQueue: 1024})
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			i++
			if r := h.evidence(b, true, fmt.Sprintf("bench-%d", i)); r.status != http.StatusOK {
				b.Fatalf("status %d: %s", r.status, r.body)
			}
		}
	})
}
