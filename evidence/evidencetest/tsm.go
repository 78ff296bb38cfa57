// Package evidencetest has fakes for tests of code that uses the evidence package on TDX:
// a configfs-tsm client that answers with real fixture quotes. Pair it with
// rtmr/rtmrtest.Kernel for RTMR3, and pass both through evidence.Options.
package evidencetest

import (
	"syscall"

	"github.com/google/go-configfs-tsm/configfs/configfsi"
	"github.com/google/go-configfs-tsm/configfs/faketsm"
)

// ReportDataOffset returns where REPORTDATA sits in a raw TD quote: the body starts at 48 in a
// v4 quote and at 54 in a v5 quote; REPORTDATA is at body offset 520.
func ReportDataOffset(quote []byte) int {
	if len(quote) > 0 && quote[0] == 5 {
		return 54 + 520
	}
	return 48 + 520
}

// TSM returns go-configfs-tsm's faketsm (the report subsystem's generation and inblob rules)
// answering provider (e.g. "tdx_guest") and, for outblob, the given quote — typically a REAL
// fixture quote. Like the tdx_guest provider, reading outblob fails with EINVAL unless the
// inblob is exactly 64 bytes (configfs-tsm does not pad it). With patchReportData, the
// quote's REPORTDATA field is replaced by the inblob: the result is a FAKE whose signature no
// longer verifies, but whose REPORTDATA binds what the caller asked. Without it, the quote is
// returned unchanged and still verifies (with its own REPORTDATA).
func TSM(quote []byte, patchReportData bool, provider string) configfsi.Client {
	sub := faketsm.Report611(0)
	base := sub.ReadAttr
	sub.ReadAttr = func(e *faketsm.ReportEntry, attr string) ([]byte, error) {
		switch attr {
		case "provider":
			return []byte(provider + "\n"), nil
		case "outblob":
			in := e.InAttrs["inblob"].Value
			if len(in) != 64 {
				// tdx_report_new: the inblob must be exactly TDX_REPORTDATA_LEN bytes.
				return nil, syscall.EINVAL
			}
			q := append([]byte{}, quote...)
			if patchReportData {
				if off := ReportDataOffset(q); off+64 <= len(q) {
					copy(q[off:], in)
				}
			}
			return q, nil
		}
		return base(e, attr)
	}
	return &faketsm.Client{Subsystems: map[string]configfsi.Client{"report": sub}}
}
