package verify

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
)

// FuzzParseQuote: arbitrary bytes never panic, and anything that parses has the fixed field
// sizes the rest of the package relies on.
func FuzzParseQuote(f *testing.F) {
	for _, c := range quoteCases {
		f.Add(fixture(f, c.file))
	}
	f.Add([]byte{4, 0, 2, 0, 0x81, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		q, err := ParseQuote(b)
		if err != nil {
			return
		}
		if len(q.MRTD) != 48 || len(q.ReportData) != 64 || len(q.RTMR3) != 48 || len(q.TDAttributes) != 8 {
			t.Fatalf("parsed quote with wrong field sizes")
		}
		_ = q.RTMRs()
	})
}

// FuzzVerifyEvidence: arbitrary bundles (JSON) never panic and are never accepted without a
// valid signature (the real check runs: nothing a fuzzer builds is signed by Intel).
func FuzzVerifyEvidence(f *testing.F) {
	bin, _ := evidence.BinaryEvent("/usr/bin/ollama", sha(1))
	log := append(eventlog.EncodeAAEL(bin), make([]byte, 8)...)
	b := evidence.Bundle{TEE: "tdx", Quote: fixture(f, cosQuote), CCEventLog: log}
	js, _ := json.Marshal(b)
	f.Add(js, "n")
	f.Add([]byte(`{"tee":"sample","quote":"eyJzdm4iOiIxIn0="}`), "n")
	f.Fuzz(func(t *testing.T, js []byte, nonce string) {
		var b evidence.Bundle
		if json.Unmarshal(js, &b) != nil {
			return
		}
		res, err := VerifyEvidence(context.Background(), &b, nonce, nil, Options{Now: cosAt})
		if err == nil {
			t.Fatalf("accepted fuzzed evidence: %+v", res)
		}
	})
}

// FuzzParsePolicy: never panics; a parsed policy always validates.
func FuzzParsePolicy(f *testing.F) {
	f.Add(`{"mr_td":"` + strings.Repeat("00", 48) + `","allowed_binaries":[{"sha384":"` + strings.Repeat("11", 48) + `"}],"model":{"name":"m"}}`)
	f.Add(`{"min_tee_tcb_svn":"` + strings.Repeat("00", 16) + `"}`)
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParsePolicy(strings.NewReader(s))
		if err != nil {
			return
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("parsed policy does not validate: %v", err)
		}
	})
}

func BenchmarkVerifyQuote(b *testing.B) {
	raw := fixture(b, "quote_v5_sample.dat")
	ctx := context.Background()
	opts := Options{Now: date(2026, 6, 1)}
	for b.Loop() {
		if _, err := VerifyQuote(ctx, raw, opts); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyEvidence(b *testing.B) {
	bin, model, _ := events(b)
	e := tdxEvidence{quoteEvents: []evidence.Event{bin, model}, logEvents: []evidence.Event{bin, model}}
	bundle := e.bundle(b, "nonce")
	opts := patchedSignature(b, fixture(b, cosQuote))
	pol := ollamaPolicy(b)
	ctx := context.Background()
	for b.Loop() {
		if _, err := VerifyEvidence(ctx, bundle, "nonce", pol, opts); err != nil {
			b.Fatal(err)
		}
	}
}
