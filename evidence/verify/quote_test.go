package verify

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tdx-guest/abi"
	tdxverify "github.com/google/go-tdx-guest/verify"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func fixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "testdata", "tdx", name))
	require.NoError(t, err)
	return b
}

var zero48 = strings.Repeat("00", 48)

// quoteCase pins the values of a real fixture quote (read out once with go-tdx-guest and
// cross-checked against the byte offsets of the TDX quote format) and a verification time
// inside its PCK certificate's validity window.
type quoteCase struct {
	file       string
	version    uint32
	bodyType   uint32
	teeTCBSVN  string
	mrTDPrefix string
	rtmr3      string
	rdPrefix   string
	tdAttr     string
	xfam       string
	debug      bool
	at         time.Time
	notBefore  time.Time // PCK leaf
	notAfter   time.Time
}

var quoteCases = []quoteCase{
	{file: "tdx_prod_quote_SPR_E4.dat", version: 4, teeTCBSVN: "03000400000000000000000000000000",
		mrTDPrefix: "6363b8043668a3ad", rtmr3: zero48, rdPrefix: "6c62dec1b8191749", tdAttr: "0000004000000000", xfam: "e71a060000000000",
		at: date(2024, 1, 1), notBefore: time.Date(2022, 9, 20, 13, 20, 31, 0, time.UTC), notAfter: time.Date(2029, 9, 20, 13, 20, 31, 0, time.UTC)},
	{file: "quote_v5_sample.dat", version: 5, bodyType: 3, teeTCBSVN: "0b010400000000000000000000000000",
		mrTDPrefix: "7348651a34b2d2d3", rtmr3: zero48, rdPrefix: "945eaacf5abc1f71", tdAttr: "0000001000000000", xfam: "e702060000000000",
		at: date(2026, 6, 1), notBefore: time.Date(2026, 1, 27, 14, 36, 27, 0, time.UTC), notAfter: time.Date(2033, 1, 27, 14, 36, 27, 0, time.UTC)},
	{file: "cos-113-tdx-quote.dat", version: 4, teeTCBSVN: "04010700000000000000000000000000",
		mrTDPrefix: "dae67181d3d65e07", rtmr3: zero48, rdPrefix: strings.Repeat("0", 128), tdAttr: "0000001000000000", xfam: "e700060000000000",
		at: date(2025, 1, 1), notBefore: time.Date(2024, 7, 2, 12, 7, 37, 0, time.UTC), notAfter: time.Date(2031, 7, 2, 12, 7, 37, 0, time.UTC)},
	{file: "trustee-tdx_quote_4.dat", version: 4, teeTCBSVN: "03000500000000000000000000000000",
		mrTDPrefix: "705ee9381b8633a9", rtmr3: zero48, rdPrefix: "7c71fe2c86eff65a", tdAttr: "0100001000000000", xfam: "e742060000000000", debug: true,
		at: date(2024, 1, 1), notBefore: time.Date(2023, 2, 7, 8, 2, 55, 0, time.UTC), notAfter: time.Date(2030, 2, 7, 8, 2, 55, 0, time.UTC)},
	{file: "trustee-tdx_quote_5.dat", version: 5, bodyType: 3, teeTCBSVN: "05010200000000000000000000000000",
		mrTDPrefix: "dfba221b48a22af8", rtmr3: zero48, rdPrefix: "6d6ab13b046cff60", tdAttr: "0000001000000000", xfam: "e742060000000000",
		at: date(2025, 1, 1), notBefore: time.Date(2024, 3, 18, 8, 43, 51, 0, time.UTC), notAfter: time.Date(2031, 3, 18, 8, 43, 51, 0, time.UTC)},
	// Despite its 5006 bytes, Trustee's tdx_quote_6.dat is a v4 quote with 70 bytes of padding.
	{file: "trustee-tdx_quote_6.dat", version: 4, teeTCBSVN: "05030200000000000000000000000000",
		mrTDPrefix: "21e8dead92d6c69d", rtmr3: zero48, rdPrefix: "26cae1c77185617f", tdAttr: "0000001000000000", xfam: "e702060000000000",
		at: date(2026, 1, 1), notBefore: time.Date(2025, 4, 8, 9, 58, 52, 0, time.UTC), notAfter: time.Date(2032, 4, 8, 9, 58, 52, 0, time.UTC)},
}

func date(y int, m time.Month, d int) time.Time { return time.Date(y, m, d, 0, 0, 0, 0, time.UTC) }

func TestParseFixtures(t *testing.T) {
	for _, c := range quoteCases {
		t.Run(c.file, func(t *testing.T) {
			q, err := ParseQuote(fixture(t, c.file))
			require.NoError(t, err)
			assert.Equal(t, c.version, q.Version)
			assert.Equal(t, uint32(0x81), q.TEEType)
			assert.Equal(t, c.bodyType, q.BodyType)
			assert.Equal(t, c.teeTCBSVN, q.TEETCBSVN.String())
			assert.True(t, strings.HasPrefix(q.MRTD.String(), c.mrTDPrefix), "mr_td %s", q.MRTD)
			assert.Equal(t, c.rtmr3, q.RTMR3.String())
			assert.True(t, strings.HasPrefix(q.ReportData.String(), c.rdPrefix), "report_data %s", q.ReportData)
			assert.Equal(t, c.tdAttr, q.TDAttributes.String())
			assert.Equal(t, c.xfam, q.XFAM.String())
			assert.Equal(t, c.debug, q.Debug)
			for _, f := range []Hex{q.MRSEAM, q.MRSignerSEAM, q.MRConfigID, q.MROwner, q.MROwnerConfig, q.RTMR0, q.RTMR1, q.RTMR2} {
				assert.Len(t, f, 48)
			}
			assert.Len(t, q.SEAMAttributes, 8)
			if c.bodyType == 3 {
				assert.Len(t, q.TEETCBSVN2, 16)
				assert.Len(t, q.MRServiceTD, 48)
			} else {
				assert.Nil(t, q.TEETCBSVN2)
				assert.Nil(t, q.MRServiceTD)
			}
			require.NotNil(t, q.PCK)
			assert.Equal(t, c.notBefore, q.PCK.NotBefore)
			assert.Equal(t, c.notAfter, q.PCK.NotAfter)
			assert.Regexp(t, "^Intel SGX PCK (Platform|Processor) CA$", q.PCK.Issuer)
			assert.Regexp(t, "^[0-9a-f]{12}$", q.PCK.FMSPC)
			// The neutral struct holds the bytes at the TDX quote format's offsets.
			raw := fixture(t, c.file)
			body := 48
			if c.version == 5 {
				body = 54
			}
			assert.Equal(t, raw[body+136:body+184], []byte(q.MRTD))
			assert.Equal(t, raw[body+328:body+376], []byte(q.RTMR0))
			assert.Equal(t, raw[body+520:body+584], []byte(q.ReportData))
		})
	}
	for file, fmspc := range map[string]string{"tdx_prod_quote_SPR_E4.dat": "50806f000000", "quote_v5_sample.dat": "90c06f000000", "cos-113-tdx-quote.dat": "00806f050000"} {
		q, err := ParseQuote(fixture(t, file))
		require.NoError(t, err)
		assert.Equal(t, fmspc, q.PCK.FMSPC, file)
	}
	// The v5 sample's extra TDX 1.5 fields.
	q, err := ParseQuote(fixture(t, "quote_v5_sample.dat"))
	require.NoError(t, err)
	assert.Equal(t, "0d010400000000000000000000000000", q.TEETCBSVN2.String())
	assert.Equal(t, zero48, q.MRServiceTD.String())
	q, err = ParseQuote(fixture(t, "trustee-tdx_quote_5.dat"))
	require.NoError(t, err)
	assert.True(t, strings.HasPrefix(q.MRServiceTD.String(), "383c87d3bbb047b2"))
}

func TestParseRejects(t *testing.T) {
	raw := fixture(t, "tdx_prod_quote_SPR_E4.dat")
	for name, b := range map[string][]byte{
		"empty":     nil,
		"truncated": raw[:600],
		"version 3": append([]byte{3}, raw[1:]...),
		"json":      []byte(`{"svn":"1"}`),
	} {
		_, err := ParseQuote(b)
		assert.ErrorIs(t, err, ErrFormat, name)
	}
	tee := append([]byte{}, raw...)
	tee[4] = 0 // TEE type 0x81 → 0x00 (SGX)
	_, err := ParseQuote(tee)
	assert.ErrorIs(t, err, ErrFormat)
}

func TestIntelRootIsTheFixturesRoot(t *testing.T) {
	assert.Equal(t, "Intel SGX Root CA", IntelRootCA().Subject.CommonName)
	for _, c := range quoteCases {
		p, err := abi.QuoteToProto(fixture(t, c.file))
		require.NoError(t, err)
		chain, err := tdxverify.ExtractChainFromQuote(p)
		require.NoError(t, err)
		assert.True(t, IntelRootCA().Equal(chain.RootCertificate), c.file)
		assert.Equal(t, c.notBefore, chain.PCKCertificate.NotBefore.UTC(), c.file)
		assert.Equal(t, c.notAfter, chain.PCKCertificate.NotAfter.UTC(), c.file)
	}
}

func TestVerifyFixtures(t *testing.T) {
	ctx := context.Background()
	for _, c := range quoteCases {
		t.Run(c.file, func(t *testing.T) {
			raw := fixture(t, c.file)
			q, err := VerifyQuote(ctx, raw, Options{Now: c.at})
			require.NoError(t, err)
			assert.Equal(t, c.version, q.Version)
			// Inside the window up to its edges; outside it on either side.
			_, err = VerifyQuote(ctx, raw, Options{Now: c.notBefore.Add(time.Second)})
			require.NoError(t, err)
			_, err = VerifyQuote(ctx, raw, Options{Now: c.notBefore.Add(-time.Second)})
			require.ErrorIs(t, err, ErrSignature)
			assert.Contains(t, err.Error(), "not yet valid")
			_, err = VerifyQuote(ctx, raw, Options{Now: c.notAfter.Add(time.Second)})
			require.ErrorIs(t, err, ErrSignature)
			assert.Contains(t, err.Error(), "expired")

			// An untrusted root.
			_, err = VerifyQuote(ctx, raw, Options{Now: c.at, Roots: x509.NewCertPool()})
			require.ErrorIs(t, err, ErrSignature)

			// One bit flipped anywhere that is signed: header, body fields, the quote
			// signature, the attestation key, the QE report, its signature, the PCK chain.
			body := 48
			if c.version == 5 {
				body = 54
			}
			sig := body + 584 + 4
			if c.version == 5 {
				sig = body + int(q.bodySize()) + 4
			}
			for name, off := range map[string]int{
				"header qe_svn":     8,
				"body tee_tcb_svn":  body,
				"body td_attrs":     body + 120,
				"body mr_td":        body + 136 + 7,
				"body rtmr3":        body + 472 + 47,
				"body report_data":  body + 520,
				"quote signature":   sig + 10,
				"attestation key":   sig + 64 + 5,
				"qe report":         sig + 128 + 6 + 100,
				"qe report sig":     sig + 128 + 6 + 384 + 3,
				"pck chain (leaf)":  len(raw) - len(trailing(t, raw)) - 1500,
				"report_data last":  body + 583,
				"body xfam":         body + 128,
				"body mr_config_id": body + 184,
			} {
				b := append([]byte{}, raw...)
				b[off] ^= 0x04
				_, err := VerifyQuote(ctx, b, Options{Now: c.at})
				// Every flip parses (the format is intact) and fails the signature check.
				assert.ErrorIs(t, err, ErrSignature, name)
			}
		})
	}
}

// bodySize is the TD report body size (584 for TDX 1.0, 648 for TDX 1.5 bodies).
func (q *Quote) bodySize() uint32 {
	if q.BodyType == 3 {
		return 648
	}
	return 584
}

// trailing returns the padding after the signed data (not covered by any signature).
func trailing(t testing.TB, raw []byte) []byte {
	p, err := abi.QuoteToProto(raw)
	require.NoError(t, err)
	switch p := p.(type) {
	case interface{ GetExtraBytes() []byte }:
		return p.GetExtraBytes()
	}
	return nil
}

// go-tdx-guest prints a warning on stdout when no trusted root is given; VerifyQuote always
// gives one, so a CLI's --json output stays clean.
func TestVerifyPrintsNothing(t *testing.T) {
	r, w, err := os.Pipe()
	require.NoError(t, err)
	old := os.Stdout
	os.Stdout = w
	_, verr := VerifyQuote(context.Background(), fixture(t, "tdx_prod_quote_SPR_E4.dat"), Options{Now: date(2024, 1, 1)})
	os.Stdout = old
	require.NoError(t, w.Close())
	out, _ := io.ReadAll(r)
	require.NoError(t, verr)
	assert.Empty(t, string(out))
}

func TestQuoteJSON(t *testing.T) {
	q, err := ParseQuote(fixture(t, "quote_v5_sample.dat"))
	require.NoError(t, err)
	b, err := jsonMarshal(q)
	require.NoError(t, err)
	for _, k := range []string{`"version":5`, `"tee_tcb_svn":"0b010400000000000000000000000000"`, `"mr_td":"7348651a34b2d2d3`, `"rtmr3":"` + zero48 + `"`, `"debug":false`, `"td_attributes":"0000001000000000"`, `"xfam":"e702060000000000"`, `"mr_servicetd":"`, `"tee_tcb_svn2":"0d01`, `"body_type":3`} {
		assert.Contains(t, string(b), k)
	}
	_, err = hex.DecodeString(q.MRSEAM.String())
	require.NoError(t, err)
}

func TestDecodeQuote(t *testing.T) {
	raw := fixture(t, "tdx_prod_quote_SPR_E4.dat")
	for name, in := range map[string][]byte{
		"raw":       raw,
		"hex":       []byte(hex.EncodeToString(raw) + "\n"),
		"HEX 0x":    []byte("0x" + strings.ToUpper(hex.EncodeToString(raw))),
		"base64":    []byte(base64.StdEncoding.EncodeToString(raw) + "\n"),
		"base64url": []byte(base64.RawURLEncoding.EncodeToString(raw)),
	} {
		assert.Equal(t, raw, DecodeQuote(in), name)
	}
	js := []byte(`{"svn":"1"}`)
	assert.Equal(t, js, DecodeQuote(js))
	assert.Equal(t, []byte("not a quote!"), DecodeQuote([]byte("not a quote!")))
}
