package verify

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/google/go-tdx-guest/abi"
	"github.com/google/go-tdx-guest/pcs"
	pb "github.com/google/go-tdx-guest/proto/tdx"
	"github.com/google/go-tdx-guest/verify"
)

// Hex is a byte string whose JSON form is lowercase hex.
type Hex []byte

// MarshalJSON implements json.Marshaler.
func (h Hex) MarshalJSON() ([]byte, error) { return json.Marshal(hex.EncodeToString(h)) }

// UnmarshalJSON implements json.Unmarshaler (hex, either case).
// JSON null leaves h unchanged (absent).
func (h *Hex) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := hex.DecodeString(s)
	if err != nil {
		return fmt.Errorf("not hex: %q", s)
	}
	*h = v
	return nil
}

func (h Hex) String() string { return hex.EncodeToString(h) }

// TD_ATTRIBUTES bits (little-endian 64-bit field; Intel TDX module ABI).
const (
	TDAttrDebug         = 1 << 0
	TDAttrSEPTVEDisable = 1 << 28
	TDAttrPKS           = 1 << 30
	TDAttrKL            = 1 << 31
	TDAttrPerfmon       = 1 << 63
)

// Quote is a TD quote's header and report body, the same for quote versions 4 and 5. Byte
// fields keep the quote's byte order; JSON renders them as lowercase hex.
type Quote struct {
	// Version is the quote format version (4 or 5).
	Version uint32 `json:"version"`
	// TEEType is 0x81 (TDX).
	TEEType uint32 `json:"tee_type"`
	QESVN   uint32 `json:"qe_svn"`
	PCESVN  uint32 `json:"pce_svn"`
	// BodyType is, for v5, 2 (TDX 1.0 body) or 3 (TDX 1.5 body); 0 for v4.
	BodyType uint32 `json:"body_type,omitempty"`

	TEETCBSVN      Hex `json:"tee_tcb_svn"`
	MRSEAM         Hex `json:"mr_seam"`
	MRSignerSEAM   Hex `json:"mr_signer_seam"`
	SEAMAttributes Hex `json:"seam_attributes"`
	TDAttributes   Hex `json:"td_attributes"`
	XFAM           Hex `json:"xfam"`
	MRTD           Hex `json:"mr_td"`
	MRConfigID     Hex `json:"mr_config_id"`
	MROwner        Hex `json:"mr_owner"`
	MROwnerConfig  Hex `json:"mr_owner_config"`
	RTMR0          Hex `json:"rtmr0"`
	RTMR1          Hex `json:"rtmr1"`
	RTMR2          Hex `json:"rtmr2"`
	RTMR3          Hex `json:"rtmr3"`
	ReportData     Hex `json:"report_data"`
	// Debug is TD_ATTRIBUTES bit 0: the TD is debuggable, so its memory is not confidential.
	Debug bool `json:"debug"`

	// TEETCBSVN2 and MRServiceTD exist only in TDX 1.5 bodies (v5, body type 3).
	TEETCBSVN2  Hex `json:"tee_tcb_svn2,omitempty"`
	MRServiceTD Hex `json:"mr_servicetd,omitempty"`

	// PCK describes the PCK leaf certificate embedded in the quote, when it can be decoded.
	// It is informational (e.g. to pick a verification time inside its validity) and, like
	// every field here, unverified until VerifyQuote succeeds.
	PCK *PCKInfo `json:"pck,omitempty"`
}

// PCKInfo is what a quote's PCK leaf certificate says about the platform.
type PCKInfo struct {
	// FMSPC identifies the platform model and configuration (PCS collateral is per FMSPC).
	FMSPC     string    `json:"fmspc"`
	Issuer    string    `json:"issuer"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
}

// RTMRs returns RTMR0..3.
func (q *Quote) RTMRs() [4][48]byte {
	var out [4][48]byte
	for i, r := range []Hex{q.RTMR0, q.RTMR1, q.RTMR2, q.RTMR3} {
		copy(out[i][:], r)
	}
	return out
}

// rtmr returns RTMR i.
func (q *Quote) rtmr(i int) Hex { return []Hex{q.RTMR0, q.RTMR1, q.RTMR2, q.RTMR3}[i] }

// tdAttributes returns TD_ATTRIBUTES as a little-endian integer.
func (q *Quote) tdAttributes() uint64 {
	var v uint64
	for i := len(q.TDAttributes) - 1; i >= 0; i-- {
		v = v<<8 | uint64(q.TDAttributes[i])
	}
	return v
}

// ParseQuote parses a raw TD quote, v4 or v5 (trailing padding, as some providers return, is
// allowed), with go-tdx-guest's abi, which checks the header, sizes and TEE type. It does not
// verify anything: use VerifyQuote. Errors wrap ErrFormat.
func ParseQuote(raw []byte) (*Quote, error) {
	q, _, err := parseQuote(raw)
	return q, err
}

// parseQuote returns the neutral Quote and go-tdx-guest's proto (for verify).
// go-tdx-guest's abi panics on some malformed quotes (found by FuzzParseQuote: a slice
// bound in qeAuthDataToProto); a quote is attacker-controlled, so a panic is a format error.
func parseQuote(raw []byte) (q *Quote, p any, err error) {
	defer func() {
		if r := recover(); r != nil {
			q, p, err = nil, nil, fmt.Errorf("%w: malformed TD quote (the parser failed: %v)", ErrFormat, r)
		}
	}()
	return parseQuoteUnsafe(raw)
}

func parseQuoteUnsafe(raw []byte) (*Quote, any, error) {
	p, err := abi.QuoteToProto(raw)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: not a TD quote v4/v5: %v", ErrFormat, err)
	}
	if err := abi.CheckQuote(p); err != nil {
		return nil, nil, fmt.Errorf("%w: TD quote: %v", ErrFormat, err)
	}
	var (
		q    Quote
		hdr  *pb.Header
		body interface {
			GetTeeTcbSvn() []byte
			GetMrSeam() []byte
			GetMrSignerSeam() []byte
			GetSeamAttributes() []byte
			GetTdAttributes() []byte
			GetXfam() []byte
			GetMrTd() []byte
			GetMrConfigId() []byte
			GetMrOwner() []byte
			GetMrOwnerConfig() []byte
			GetRtmrs() [][]byte
			GetReportData() []byte
		}
	)
	switch p := p.(type) {
	case *pb.QuoteV4:
		hdr, body = p.GetHeader(), p.GetTdQuoteBody()
	case *pb.QuoteV5:
		hdr = p.GetHeader()
		d := p.GetTdQuoteBodyDescriptor()
		v5 := d.GetTdQuoteBodyV5()
		body = v5
		q.BodyType = uint32(d.GetTdQuoteBodyType())
		if q.BodyType == 3 {
			q.TEETCBSVN2, q.MRServiceTD = v5.GetTeeTcbSvn2(), v5.GetMrServiceTd()
		}
	default:
		return nil, nil, fmt.Errorf("%w: unsupported quote type %T", ErrFormat, p)
	}
	q.Version, q.TEEType, q.QESVN, q.PCESVN = hdr.GetVersion(), hdr.GetTeeType(), le16(hdr.GetQeSvn()), le16(hdr.GetPceSvn())
	q.TEETCBSVN, q.MRSEAM, q.MRSignerSEAM = body.GetTeeTcbSvn(), body.GetMrSeam(), body.GetMrSignerSeam()
	q.SEAMAttributes, q.TDAttributes, q.XFAM = body.GetSeamAttributes(), body.GetTdAttributes(), body.GetXfam()
	q.MRTD, q.MRConfigID, q.MROwner, q.MROwnerConfig = body.GetMrTd(), body.GetMrConfigId(), body.GetMrOwner(), body.GetMrOwnerConfig()
	q.ReportData = body.GetReportData()
	r := body.GetRtmrs()
	if len(r) != 4 || len(q.ReportData) != 64 || len(q.TDAttributes) != 8 || len(q.TEETCBSVN) != 16 || len(q.MRTD) != 48 {
		return nil, nil, fmt.Errorf("%w: TD quote body has wrong field sizes", ErrFormat)
	}
	for i := range r {
		if len(r[i]) != 48 {
			return nil, nil, fmt.Errorf("%w: TD quote RTMR%d is %d bytes", ErrFormat, i, len(r[i]))
		}
	}
	q.RTMR0, q.RTMR1, q.RTMR2, q.RTMR3 = r[0], r[1], r[2], r[3]
	q.Debug = q.tdAttributes()&TDAttrDebug != 0
	if chain, err := verify.ExtractChainFromQuote(p); err == nil && chain.PCKCertificate != nil {
		pck := chain.PCKCertificate
		q.PCK = &PCKInfo{Issuer: pck.Issuer.CommonName, NotBefore: pck.NotBefore.UTC(), NotAfter: pck.NotAfter.UTC()}
		if ext, err := pcs.PckCertificateExtensions(pck); err == nil {
			q.PCK.FMSPC = strings.ToLower(ext.FMSPC)
		}
	}
	return &q, p, nil
}

func le16(b []byte) uint32 {
	if len(b) != 2 {
		return 0
	}
	return uint32(b[0]) | uint32(b[1])<<8
}

// DecodeQuote returns the raw quote in b, which holds a quote as quote files and APIs carry
// it: raw bytes (a TD quote starts with its version, 4 or 5, as a little-endian u16), lowercase
// or uppercase hex (optionally "0x"-prefixed; the Open WebUI quote API's form), or standard or
// URL-safe base64 (Trustee's and `cai-agent evidence --json`'s form), with surrounding
// whitespace. A sample TEE quote (a JSON object) is returned unchanged. The encodings cannot
// be confused: a raw TD quote's first byte is not printable.
func DecodeQuote(b []byte) []byte {
	t := bytes.TrimSpace(b)
	if len(t) == 0 || t[0] == '{' {
		return b
	}
	if h := bytes.TrimPrefix(t, []byte("0x")); len(h)%2 == 0 {
		if v, err := hex.DecodeString(string(h)); err == nil {
			return v
		}
	}
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding, base64.RawStdEncoding, base64.RawURLEncoding} {
		if v, err := enc.DecodeString(string(t)); err == nil {
			return v
		}
	}
	return b
}
