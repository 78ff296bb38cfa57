package kbstest_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/binary"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/kbc"
	"github.com/cai-agent/cai-agent/kbc/ita"
	"github.com/cai-agent/cai-agent/kbc/kbstest"
)

func newITA(t *testing.T) (*kbstest.ITA, *httptest.Server, *[]string) {
	s := kbstest.NewITA()
	require.NoError(t, s.SetKey(itaKeyID, secret))
	var steps []string
	s.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
		steps = append(steps, step)
		return false
	}
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return s, srv, &steps
}

func itaClient(t *testing.T, o ita.Options) *ita.Client {
	if o.Attester == nil && o.Passport == nil {
		o.Attester = kbstest.TDXAttester{Quote: fixture(t, "trustee-tdx_quote_5.dat")}
	}
	o.HTTP = fast()
	c, err := ita.New(o)
	require.NoError(t, err)
	return c
}

func TestITAUserData(t *testing.T) {
	k, err := rsa.GenerateKey(rand.Reader, 3072)
	require.NoError(t, err)
	ud := ita.UserData(&k.PublicKey)
	require.Len(t, ud, 4+384)
	require.Equal(t, uint32(65537), binary.LittleEndian.Uint32(ud))
	require.Equal(t, k.N.FillBytes(make([]byte, 384)), ud[4:])
	rd := ita.ReportData(nil, nil, ud)
	rd2 := ita.ReportData([]byte("v"), []byte("i"), ud)
	require.NotEqual(t, rd, rd2)
	require.Equal(t, ita.ReportData([]byte("vi"), nil, ud), rd2, "plain concatenation val‖iat‖user_data")
}

func TestITAModes(t *testing.T) {
	s, srv, steps := newITA(t)
	// Nonce mode: an empty-body request for the nonce, then the transfer.
	got, err := itaClient(t, ita.Options{URL: srv.URL, Nonce: true}).GetResource(t.Context(), "ita:///keys/"+strings.ToUpper(itaKeyID))
	require.NoError(t, err)
	require.Equal(t, secret, got)
	require.Equal(t, []string{kbstest.StepNonce, kbstest.StepTransfer}, *steps)

	// A server requiring a nonce refuses a request without one.
	s.RequireNonce = true
	_, err = itaClient(t, ita.Options{URL: srv.URL}).GetResource(t.Context(), itaKeyID)
	require.ErrorIs(t, err, kbc.ErrRefused)
	require.Contains(t, err.Error(), "a nonce is required")

	// An expired nonce is refused.
	s.Now = func() time.Time { return time.Now().Add(-time.Hour) }
	c := itaClient(t, ita.Options{URL: srv.URL, Nonce: true})
	s.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
		if step == kbstest.StepTransfer {
			s.Now = nil
		}
		return false
	}
	_, err = c.GetResource(t.Context(), itaKeyID)
	require.ErrorIs(t, err, kbc.ErrRefused)
	require.Contains(t, err.Error(), "nonce expired")
	s.Intercept = nil

	// Passport mode: the token carries user_data; no quote is sent.
	var seenUD []byte
	c = itaClient(t, ita.Options{URL: srv.URL, Passport: func(_ context.Context, ud []byte) (string, error) {
		seenUD = ud
		return s.IssueToken(ud)
	}})
	got, err = c.GetResource(t.Context(), itaKeyID)
	require.NoError(t, err)
	require.Equal(t, secret, got)
	require.Len(t, seenUD, 388)
	// A token for another key's user_data: the wrapped SWK does not open.
	c = itaClient(t, ita.Options{URL: srv.URL, Passport: func(_ context.Context, ud []byte) (string, error) {
		k, _ := rsa.GenerateKey(rand.Reader, 3072)
		return s.IssueToken(ita.UserData(&k.PublicKey))
	}})
	_, err = c.GetResource(t.Context(), itaKeyID)
	require.ErrorIs(t, err, kbc.ErrProtocol)
	// A forged token.
	c = itaClient(t, ita.Options{URL: srv.URL, Passport: func(_ context.Context, ud []byte) (string, error) {
		tok, err := kbstest.NewITA().IssueToken(ud)
		return tok, err
	}})
	_, err = c.GetResource(t.Context(), itaKeyID)
	require.ErrorIs(t, err, kbc.ErrRefused)

	// The sample TEE cannot talk to ITA.
	_, err = itaClient(t, ita.Options{URL: srv.URL, Attester: kbstest.SampleAttester{}}).GetResource(t.Context(), itaKeyID)
	require.ErrorIs(t, err, kbc.ErrConfig)
	for _, bad := range []string{"kbs:///a/b/c", "not-a-uuid", "ita:///keys/x"} {
		_, err = itaClient(t, ita.Options{URL: srv.URL}).GetResource(t.Context(), bad)
		require.ErrorIs(t, err, kbc.ErrInvalidURI)
	}
}

// The server is strict like the real KBS: unknown JSON fields, a missing Accept header (415) and
// an unknown attestation type are refused; an empty body without Attestation-Type gets a nonce.
func TestITAServerStrict(t *testing.T) {
	_, srv, _ := newITA(t)
	post := func(hdr map[string]string, body string) (int, string) {
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/kbs/v1/keys/"+itaKeyID+"/transfer", strings.NewReader(body))
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	full := map[string]string{"Accept": "application/json", "Content-Type": "application/json", "Attestation-Type": "TDX"}
	code, body := post(full, `{"quote":"AA==","user_data":"AA==","extra":1}`)
	require.Equal(t, 400, code)
	require.Contains(t, body, "Failed to JSON-decode request body")
	code, _ = post(map[string]string{"Content-Type": "application/json", "Attestation-Type": "TDX"}, `{}`)
	require.Equal(t, 415, code, "the KBS answers a bad Accept header 415")
	code, _ = post(map[string]string{"Accept": "application/json", "Content-Type": "application/json", "Attestation-Type": "SEV"}, `{}`)
	require.Equal(t, 400, code)
	code, body = post(map[string]string{"Accept": "application/json"}, ``)
	require.Equal(t, 200, code)
	var n ita.Nonce
	require.NoError(t, json.Unmarshal([]byte(body), &n))
	require.NotEmpty(t, n.Val)
	require.NotEmpty(t, n.Signature)
	resp, err := http.Post(srv.URL+"/kbs/v1/keys/not-a-uuid/transfer", "application/json", nil)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, 404, resp.StatusCode)
}
