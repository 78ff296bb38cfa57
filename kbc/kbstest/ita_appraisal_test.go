package kbstest_test

import (
	"bytes"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/kbc/ita"
	"github.com/cai-agent/cai-agent/kbc/kbstest"
)

func newAppraisal(t *testing.T) (*kbstest.ITA, *kbstest.ITAAppraisal, string) {
	kbs := kbstest.NewITA()
	require.NoError(t, kbs.SetKey(itaKeyID, secret))
	app := kbstest.NewITAAppraisal(kbs, appraisalKey)
	srv := httptest.NewServer(app.Handler(kbs))
	t.Cleanup(srv.Close)
	return kbs, app, srv.URL
}

type answer struct {
	status int
	header http.Header
	body   []byte
}

func do(t *testing.T, method, url string, hdr map[string]string, body string) answer {
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return answer{resp.StatusCode, resp.Header, b}
}

// boundQuote returns a quote whose REPORTDATA is SHA-512(val ‖ iat ‖ runtime).
func boundQuote(t *testing.T, n *ita.Nonce, runtime []byte) []byte {
	h := sha512.New()
	if n != nil {
		h.Write(n.Val)
		h.Write(n.Iat)
	}
	h.Write(runtime)
	var rd [64]byte
	copy(rd[:], h.Sum(nil))
	ev, err := kbstest.TDXAttester{Quote: fixture(t, "trustee-tdx_quote_4.dat")}.Attest(t.Context(), rd)
	require.NoError(t, err)
	return ev.Quote
}

// The appraisal server's answers to malformed or unauthenticated requests, and its error form
// {"error": …}.
func TestITAAppraisalWire(t *testing.T) {
	_, app, url := newAppraisal(t)
	require.NoError(t, app.SetPolicy("1f1f13e0-9fb1-4a57-ba42-361d86157fa3", nil))
	key := map[string]string{"X-Api-Key": appraisalKey, "Accept": "application/json"}
	js := map[string]string{"X-Api-Key": appraisalKey, "Accept": "application/json", "Content-Type": "application/json"}
	quote := base64.StdEncoding.EncodeToString(boundQuote(t, nil, []byte("rt")))
	rt := base64.StdEncoding.EncodeToString([]byte("rt"))
	for _, tc := range []struct {
		name, method, path string
		hdr                map[string]string
		body               string
		status             int
		err                string // contained in the "error" member
	}{
		{"nonce without key", "GET", "/appraisal/v1/nonce", map[string]string{"Accept": "application/json"}, "", 401, "API key"},
		{"nonce with another key", "GET", "/appraisal/v1/nonce", map[string]string{"X-Api-Key": "other"}, "", 401, "API key"},
		{"attest without key", "POST", "/appraisal/v1/attest", map[string]string{"Content-Type": "application/json"}, `{}`, 401, "API key"},
		{"POST nonce", "POST", "/appraisal/v1/nonce", key, "", 405, "not allowed"},
		{"GET attest", "GET", "/appraisal/v1/attest", key, "", 405, "not allowed"},
		{"v2 path", "GET", "/appraisal/v2/nonce", key, "", 404, "no such endpoint"},
		{"text body", "POST", "/appraisal/v1/attest", map[string]string{"X-Api-Key": appraisalKey, "Content-Type": "text/plain"}, `{}`, 415, "application/json"},
		{"not json", "POST", "/appraisal/v1/attest", js, `not json`, 400, "invalid request body"},
		{"unknown member", "POST", "/appraisal/v1/attest", js, `{"quote":"` + quote + `","nonce":{}}`, 400, "invalid request body"},
		{"trailing data", "POST", "/appraisal/v1/attest", js, `{"quote":"` + quote + `"} {}`, 400, "trailing data"},
		{"no quote", "POST", "/appraisal/v1/attest", js, `{"runtime_data":"` + rt + `"}`, 400, "quote is required"},
		{"not a quote", "POST", "/appraisal/v1/attest", js, `{"quote":"AAAA"}`, 400, "invalid TDX quote"},
		{"bad alg", "POST", "/appraisal/v1/attest", js, `{"quote":"` + quote + `","token_signing_alg":"HS256"}`, 400, "token_signing_alg"},
		{"unbound", "POST", "/appraisal/v1/attest", js, `{"quote":"` + quote + `","runtime_data":"AA=="}`, 400, "REPORTDATA"},
		{"bad policy id", "POST", "/appraisal/v1/attest", js, `{"quote":"` + quote + `","runtime_data":"` + rt + `","policy_ids":["p"]}`, 400, "invalid policy id"},
		{"unknown policy", "POST", "/appraisal/v1/attest", js, `{"quote":"` + quote + `","runtime_data":"` + rt + `","policy_ids":["2f1f13e0-9fb1-4a57-ba42-361d86157fa3"]}`, 400, "not found"},
		{"forged nonce", "POST", "/appraisal/v1/attest", js, `{"quote":"` + quote + `","verifier_nonce":{"val":"AA==","iat":"AA==","signature":"AA=="}}`, 400, "nonce signature does not verify"},
		{"oversized", "POST", "/appraisal/v1/attest", js, `{"quote":"` + strings.Repeat("A", kbstest.MaxAppraisalBody) + `"}`, 413, "exceeds"},
		{"bound", "POST", "/appraisal/v1/attest", js, `{"quote":"` + quote + `","runtime_data":"` + rt + `","policy_ids":["1F1F13E0-9FB1-4A57-BA42-361D86157FA3"],"policy_must_match":true,"event_log":"AA==","user_data":"AA=="}`, 200, ""},
		{"no binding asked", "POST", "/appraisal/v1/attest", js, `{"quote":"` + quote + `"}`, 200, ""},
		{"KBS path passes through", "POST", "/kbs/v1/keys/" + itaKeyID + "/transfer", map[string]string{"Accept": "application/json"}, "", 200, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := do(t, tc.method, url+tc.path, tc.hdr, tc.body)
			require.Equal(t, tc.status, a.status, "%s", a.body)
			if tc.status == 200 {
				return
			}
			require.Equal(t, "application/json", a.header.Get("Content-Type"))
			require.NotEmpty(t, a.header.Get("Trace-Id"))
			var e struct {
				Error string `json:"error"`
			}
			dec := json.NewDecoder(bytes.NewReader(a.body))
			dec.DisallowUnknownFields()
			require.NoError(t, dec.Decode(&e), "%s", a.body)
			require.Contains(t, e.Error, tc.err)
			require.NotContains(t, string(a.body), appraisalKey)
		})
	}
}

// Success answers: the nonce and the token, with request-id echoed, trace-id and
// Content-Length (the connector treats a 200 without a length as an error).
func TestITAAppraisalAnswers(t *testing.T) {
	_, _, url := newAppraisal(t)
	hdr := map[string]string{"X-Api-Key": appraisalKey, "Accept": "application/json", "Request-Id": "req-1"}
	a := do(t, "GET", url+"/appraisal/v1/nonce", hdr, "")
	require.Equal(t, 200, a.status)
	require.Equal(t, "req-1", a.header.Get("Request-Id"))
	require.NotEmpty(t, a.header.Get("Trace-Id"))
	require.Equal(t, "application/json", a.header.Get("Content-Type"))
	require.NotEmpty(t, a.header.Get("Content-Length"))
	var n ita.Nonce
	dec := json.NewDecoder(bytes.NewReader(a.body))
	dec.DisallowUnknownFields()
	require.NoError(t, dec.Decode(&n))
	require.Len(t, n.Val, 64)
	require.NotEmpty(t, n.Signature)
	iat, err := time.Parse("2006-01-02 15:04:05.999999999 -0700 MST", string(n.Iat))
	require.NoError(t, err)
	require.WithinDuration(t, time.Now(), iat, time.Minute)

	// A nonce from the KBS (which relays Trust Authority's) is Trust Authority's too.
	kn := do(t, "POST", url+"/kbs/v1/keys/"+itaKeyID+"/transfer", map[string]string{"Accept": "application/json"}, "")
	require.Equal(t, 200, kn.status)
	var kbsNonce ita.Nonce
	require.NoError(t, json.Unmarshal(kn.body, &kbsNonce))

	for _, nonce := range []*ita.Nonce{&n, &kbsNonce} {
		k := []byte("user data")
		body, err := json.Marshal(ita.AttestRequest{Quote: boundQuote(t, nonce, k), VerifierNonce: nonce, RuntimeData: k})
		require.NoError(t, err)
		hdr["Content-Type"] = "application/json"
		a = do(t, "POST", url+"/appraisal/v1/attest", hdr, string(body))
		require.Equal(t, 200, a.status, "%s", a.body)
		var tr ita.AttestResponse
		dec = json.NewDecoder(bytes.NewReader(a.body))
		dec.DisallowUnknownFields()
		require.NoError(t, dec.Decode(&tr))
		payload, err := base64.RawURLEncoding.DecodeString(strings.Split(tr.Token, ".")[1])
		require.NoError(t, err)
		var c struct {
			Type  string    `json:"attester_type"`
			Held  []byte    `json:"attester_held_data"`
			Nonce ita.Nonce `json:"verifier_nonce"`
			RD    string    `json:"tdx_report_data"`
			Exp   int64     `json:"exp"`
		}
		require.NoError(t, json.Unmarshal(payload, &c))
		require.Equal(t, "TDX", c.Type)
		require.Equal(t, k, c.Held)
		require.Equal(t, *nonce, c.Nonce)
		require.Len(t, c.RD, 128)
		require.InDelta(t, time.Now().Add(5*time.Minute).Unix(), c.Exp, 5)
	}
}

// The appraisal's tokens are the KBS's passport tokens; another server's are not.
func TestITAAppraisalTokensForTheKBS(t *testing.T) {
	_, _, url := newAppraisal(t)
	ap, err := ita.NewAppraiser(ita.AppraiserOptions{URL: url, APIKey: appraisalKey,
		Attester: kbstest.TDXAttester{Quote: fixture(t, "trustee-tdx_quote_5.dat")}, HTTP: fast()})
	require.NoError(t, err)
	c, err := ita.New(ita.Options{URL: url, Passport: ap.Token, HTTP: fast()})
	require.NoError(t, err)
	got, err := c.GetResource(t.Context(), itaKeyID)
	require.NoError(t, err)
	require.Equal(t, secret, got)

	// An appraisal server for another KBS: its tokens do not authenticate here.
	other := kbstest.NewITAAppraisal(kbstest.NewITA(), appraisalKey)
	osrv := httptest.NewServer(other)
	t.Cleanup(osrv.Close)
	ap2, err := ita.NewAppraiser(ita.AppraiserOptions{URL: osrv.URL, APIKey: appraisalKey,
		Attester: kbstest.TDXAttester{Quote: fixture(t, "trustee-tdx_quote_5.dat")}, HTTP: fast()})
	require.NoError(t, err)
	c, err = ita.New(ita.Options{URL: url, Passport: ap2.Token, HTTP: fast()})
	require.NoError(t, err)
	_, err = c.GetResource(t.Context(), itaKeyID)
	require.ErrorContains(t, err, "401: Failed to authenticate attestation-token")
}
