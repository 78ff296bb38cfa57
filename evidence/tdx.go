package evidence

import (
	"bytes"
	"context"
	"fmt"
	"strings"

	"github.com/google/go-configfs-tsm/configfs/configfsi"
	"github.com/google/go-configfs-tsm/configfs/linuxtsm"
	"github.com/google/go-configfs-tsm/report"
	"github.com/google/go-tdx-guest/abi"
	pb "github.com/google/go-tdx-guest/proto/tdx"
)

// TSMProviderTDX is the configfs-tsm provider of a TDX guest.
const TSMProviderTDX = "tdx_guest"

// tdxQuoter gets TD quotes through configfs-tsm (Linux ≥ 6.7, or the Anolis 5.10 backport).
type tdxQuoter struct {
	client configfsi.Client
}

// openTDX checks that configfs-tsm exists and reports the tdx_guest provider. It creates one
// report entry to read the provider, writes a zero inblob but never reads outblob (so no
// quote is generated), and always removes the entry.
func openTDX(client configfsi.Client) (*tdxQuoter, error) {
	if client == nil {
		c, err := linuxtsm.MakeClient()
		if err != nil {
			return nil, fmt.Errorf("%w: configfs-tsm is not available (%v): not a TDX guest, or Linux < 6.7 without the configfs-tsm backport", ErrNoTEE, err)
		}
		client = c
	}
	r, err := report.CreateOpenReport(client)
	if err != nil {
		return nil, fmt.Errorf("%w: configfs-tsm: %v", ErrNoTEE, err)
	}
	// Writing inblob is cheap (the quote is only generated when outblob is read) and makes the
	// entry's attributes current, as every configfs-tsm implementation expects before reads.
	err = r.WriteOption("inblob", make([]byte, 64))
	var prov []byte
	if err == nil {
		prov, err = r.ReadOption("provider")
	}
	if derr := r.Destroy(); derr != nil && err == nil {
		err = derr
	}
	if err != nil {
		return nil, fmt.Errorf("%w: configfs-tsm provider: %v", ErrNoTEE, err)
	}
	if p := strings.TrimSpace(string(prov)); p != TSMProviderTDX {
		return nil, fmt.Errorf("%w: configfs-tsm provider is %q, not %q", ErrNoTEE, p, TSMProviderTDX)
	}
	return &tdxQuoter{client: client}, nil
}

// quote returns a raw TD quote whose REPORTDATA is reportData. It checks the provider of the
// report entry it used, that the quote parses as a TD quote v4/v5, and that its REPORTDATA is
// the one requested (a generation race or a misbehaving provider fails closed).
func (t *tdxQuoter) quote(ctx context.Context, reportData [64]byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	resp, err := report.Get(t.client, &report.Request{InBlob: reportData[:]})
	if err != nil {
		return nil, fmt.Errorf("%w: configfs-tsm: %v", ErrQuote, err)
	}
	if p := strings.TrimSpace(resp.Provider); p != TSMProviderTDX {
		return nil, fmt.Errorf("%w: configfs-tsm provider is %q, not %q", ErrQuote, p, TSMProviderTDX)
	}
	body, err := quoteBody(resp.OutBlob)
	if err != nil {
		return nil, fmt.Errorf("%w: the kernel returned something that is not a TD quote: %v", ErrQuote, err)
	}
	if !bytes.Equal(body.reportData, reportData[:]) {
		return nil, fmt.Errorf("%w: the quote's REPORTDATA is not the one requested", ErrQuote)
	}
	return resp.OutBlob, nil
}

func (t *tdxQuoter) rtmrs(ctx context.Context) ([4][48]byte, error) {
	var out [4][48]byte
	q, err := t.quote(ctx, [64]byte{})
	if err != nil {
		return out, err
	}
	body, _ := quoteBody(q)
	for i := range out {
		copy(out[i][:], body.rtmrs[i])
	}
	return out, nil
}

type tdBody struct {
	rtmrs      [][]byte
	reportData []byte
}

// quoteBody extracts the fields this package needs from a v4 or v5 TD quote (go-tdx-guest abi).
func quoteBody(raw []byte) (_ *tdBody, err error) {
	// go-tdx-guest's abi panics on some hostile quotes (index out of range in the
	// certification data); a quote comes from outside the TD's trust, so that is an error.
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("malformed quote (parser panic: %v)", r)
		}
	}()
	q, err := abi.QuoteToProto(raw)
	if err != nil {
		return nil, err
	}
	var b tdBody
	switch q := q.(type) {
	case *pb.QuoteV4:
		b.rtmrs, b.reportData = q.GetTdQuoteBody().GetRtmrs(), q.GetTdQuoteBody().GetReportData()
	case *pb.QuoteV5:
		v5 := q.GetTdQuoteBodyDescriptor().GetTdQuoteBodyV5()
		b.rtmrs, b.reportData = v5.GetRtmrs(), v5.GetReportData()
	default:
		return nil, fmt.Errorf("unsupported quote type %T", q)
	}
	if len(b.rtmrs) != 4 || len(b.reportData) != 64 {
		return nil, fmt.Errorf("quote body has %d RTMRs and %d bytes of REPORTDATA", len(b.rtmrs), len(b.reportData))
	}
	for _, r := range b.rtmrs {
		if len(r) != 48 {
			return nil, fmt.Errorf("quote RTMR is %d bytes", len(r))
		}
	}
	return &b, nil
}

// QuoteRTMRs returns RTMR0..3 of a raw TD quote (v4 or v5) or of a sample TEE quote.
func QuoteRTMRs(quote []byte) ([4][48]byte, error) {
	var out [4][48]byte
	if s, err := ParseSampleQuote(quote); err == nil {
		return s.RTMRs()
	}
	b, err := quoteBody(quote)
	if err != nil {
		return out, fmt.Errorf("parse quote: %w", err)
	}
	for i := range out {
		copy(out[i][:], b.rtmrs[i])
	}
	return out, nil
}
