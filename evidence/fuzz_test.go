package evidence

import (
	"os"
	"testing"
)

// Quotes come from outside the TD's trust (a relying party's input, a KBS's test data): the
// sample-quote parser and QuoteRTMRs (TDX quotes through go-tdx-guest's abi) return errors,
// never panic, and what they accept decodes consistently.
func FuzzQuoteRTMRs(f *testing.F) {
	for _, name := range []string{"tdx/cos-113-tdx-quote.dat", "tdx/quote_v5_sample.dat", "tdx/trustee-tdx_quote_4.dat"} {
		if b, err := os.ReadFile("../testdata/" + name); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte(`{"svn":"1","report_data":"AAAA","rtmrs":["00","00","00","00"],"unsigned":true}`))
	f.Add([]byte(`{"svn":"1","report_data":"","unsigned":true}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		if q, err := ParseSampleQuote(b); err == nil {
			if _, err := q.RTMRs(); err != nil {
				t.Fatalf("accepted sample quote with bad RTMRs: %v", err)
			}
			if _, err := q.ReportDataBytes(); err != nil {
				t.Fatalf("accepted sample quote with bad report_data: %v", err)
			}
		}
		_, _ = QuoteRTMRs(b)
	})
}
