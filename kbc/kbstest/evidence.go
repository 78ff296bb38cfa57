package kbstest

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"

	"github.com/cai-agent/cai-agent/evidence/verify"
)

// QuoteReportData returns the 64-byte REPORTDATA of a raw TD quote (v4 or v5), parsed by
// evidence/verify (go-tdx-guest's abi). The quote's signature and certificate chain are NOT
// verified: that is the attestation service's job (Trustee's AS, Intel Trust Authority), out
// of scope for a test broker, which checks only the binding of the nonce and key.
func QuoteReportData(raw []byte) ([]byte, error) {
	q, err := verify.ParseQuote(raw)
	if err != nil {
		return nil, err
	}
	return q.ReportData, nil
}

// quoteClaims are the TDX claims Intel Trust Authority puts in a token (model.TDXClaims of
// intel/trustauthority-kbs), those a quote body gives: hex strings, and tdx_is_debuggable
// (TUD.DEBUG, bit 0 of TDATTRIBUTES).
func quoteClaims(q *verify.Quote) map[string]any {
	c := map[string]any{
		"tdx_mrseam":              q.MRSEAM.String(),
		"tdx_td_attributes":       q.TDAttributes.String(),
		"tdx_xfam":                q.XFAM.String(),
		"tdx_mrtd":                q.MRTD.String(),
		"tdx_mrconfigid":          q.MRConfigID.String(),
		"tdx_mrowner":             q.MROwner.String(),
		"tdx_mrownerconfig":       q.MROwnerConfig.String(),
		"tdx_report_data":         q.ReportData.String(),
		"tdx_is_debuggable":       q.Debug,
		"tdx_td_attributes_debug": q.Debug,
	}
	for i, r := range []verify.Hex{q.RTMR0, q.RTMR1, q.RTMR2, q.RTMR3} {
		c[fmt.Sprintf("tdx_rtmr%d", i)] = r.String()
	}
	return c
}

// sampleReportData returns the decoded report_data of a Confidential Containers sample
// evidence document ({"svn":…,"report_data":"<std b64>"}; other members are ignored, as
// Trustee's sample verifier ignores them).
func sampleReportData(doc []byte) ([]byte, error) {
	var s struct {
		SVN        *string `json:"svn"`
		ReportData *string `json:"report_data"`
	}
	if err := json.Unmarshal(doc, &s); err != nil || s.SVN == nil || s.ReportData == nil {
		return nil, fmt.Errorf("sample evidence: want {\"svn\",\"report_data\"}")
	}
	rd, err := base64.StdEncoding.DecodeString(*s.ReportData)
	if err != nil {
		return nil, fmt.Errorf("sample evidence: report_data is not std base64")
	}
	return rd, nil
}

// regularize pads with zeros or truncates b to n bytes (Trustee's regularize_data).
func regularize(b []byte, n int) []byte {
	out := make([]byte, n)
	copy(out, b)
	return out
}

func equal(a, b []byte) bool { return bytes.Equal(a, b) }
