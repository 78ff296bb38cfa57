package kbstest

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"

	"github.com/google/go-tdx-guest/abi"
	pb "github.com/google/go-tdx-guest/proto/tdx"
)

// QuoteReportData returns the 64-byte REPORTDATA of a raw TD quote (v4 or v5), parsed with
// go-tdx-guest's abi package. The quote's signature and certificate chain are NOT verified:
// that is the attestation service's job (Trustee's AS, Intel Trust Authority), out of scope
// for a test broker, which checks only the binding of the nonce and key.
func QuoteReportData(raw []byte) ([]byte, error) {
	b, err := quoteBody(raw)
	if err != nil {
		return nil, err
	}
	rd := b.GetReportData()
	if len(rd) != 64 {
		return nil, fmt.Errorf("quote REPORTDATA is %d bytes", len(rd))
	}
	return rd, nil
}

// tdBody is what the TD quote bodies of v4 and v5 quotes have in common.
type tdBody interface {
	GetMrSeam() []byte
	GetTdAttributes() []byte
	GetXfam() []byte
	GetMrTd() []byte
	GetMrConfigId() []byte
	GetMrOwner() []byte
	GetMrOwnerConfig() []byte
	GetRtmrs() [][]byte
	GetReportData() []byte
}

// quoteBody parses a raw TD quote (v4 or v5; signature NOT verified) and returns its body.
func quoteBody(raw []byte) (tdBody, error) {
	q, err := abi.QuoteToProto(raw)
	if err != nil {
		return nil, fmt.Errorf("parse TD quote: %w", err)
	}
	switch q := q.(type) {
	case *pb.QuoteV4:
		if b := q.GetTdQuoteBody(); b != nil {
			return b, nil
		}
	case *pb.QuoteV5:
		if b := q.GetTdQuoteBodyDescriptor().GetTdQuoteBodyV5(); b != nil {
			return b, nil
		}
	default:
		return nil, fmt.Errorf("unsupported quote type %T", q)
	}
	return nil, fmt.Errorf("TD quote without a TD body")
}

// quoteClaims are the TDX claims Intel Trust Authority puts in a token (model.TDXClaims of
// intel/trustauthority-kbs), those a quote body gives: hex strings, and tdx_is_debuggable
// (TUD.DEBUG, bit 0 of TDATTRIBUTES).
func quoteClaims(b tdBody) map[string]any {
	c := map[string]any{
		"tdx_mrseam":              hex.EncodeToString(b.GetMrSeam()),
		"tdx_td_attributes":       hex.EncodeToString(b.GetTdAttributes()),
		"tdx_xfam":                hex.EncodeToString(b.GetXfam()),
		"tdx_mrtd":                hex.EncodeToString(b.GetMrTd()),
		"tdx_mrconfigid":          hex.EncodeToString(b.GetMrConfigId()),
		"tdx_mrowner":             hex.EncodeToString(b.GetMrOwner()),
		"tdx_mrownerconfig":       hex.EncodeToString(b.GetMrOwnerConfig()),
		"tdx_report_data":         hex.EncodeToString(b.GetReportData()),
		"tdx_is_debuggable":       len(b.GetTdAttributes()) > 0 && b.GetTdAttributes()[0]&1 == 1,
		"tdx_td_attributes_debug": len(b.GetTdAttributes()) > 0 && b.GetTdAttributes()[0]&1 == 1,
	}
	for i, r := range b.GetRtmrs() {
		c[fmt.Sprintf("tdx_rtmr%d", i)] = hex.EncodeToString(r)
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
