package kbstest

import (
	"bytes"
	"encoding/base64"
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
	q, err := abi.QuoteToProto(raw)
	if err != nil {
		return nil, fmt.Errorf("parse TD quote: %w", err)
	}
	var rd []byte
	switch q := q.(type) {
	case *pb.QuoteV4:
		rd = q.GetTdQuoteBody().GetReportData()
	case *pb.QuoteV5:
		rd = q.GetTdQuoteBodyDescriptor().GetTdQuoteBodyV5().GetReportData()
	default:
		return nil, fmt.Errorf("unsupported quote type %T", q)
	}
	if len(rd) != 64 {
		return nil, fmt.Errorf("quote REPORTDATA is %d bytes", len(rd))
	}
	return rd, nil
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
