package ita_test

import (
	"bytes"
	"context"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/kbc"
	"github.com/cai-agent/cai-agent/kbc/ita"
	"github.com/cai-agent/cai-agent/kbc/kbstest"
)

const apiKey = "djE6ZXhhbXBsZS1pdGEtYXR0ZXN0YXRpb24ta2V5LTAxMjM0NTY3ODk"

// passportEnv is an ITA KBS and an appraisal server on one listener.
type passportEnv struct {
	kbs *kbstest.ITA
	app *kbstest.ITAAppraisal
	url string
}

func newPassportEnv(t *testing.T) *passportEnv {
	kbs := kbstest.NewITA()
	require.NoError(t, kbs.SetKey(keyID, secret))
	app := kbstest.NewITAAppraisal(kbs, apiKey)
	srv := httptest.NewServer(app.Handler(kbs))
	t.Cleanup(srv.Close)
	return &passportEnv{kbs: kbs, app: app, url: srv.URL}
}

func fastHTTP() kbc.HTTPOptions {
	return kbc.HTTPOptions{InsecureHTTP: true, Timeout: 5 * time.Second, Retries: 2, RetryBackoff: time.Millisecond}
}

func appraiser(t *testing.T, o ita.AppraiserOptions) *ita.Appraiser {
	if o.APIKey == "" {
		o.APIKey = apiKey
	}
	if o.Attester == nil {
		o.Attester = attester(t)
	}
	if o.HTTP == (kbc.HTTPOptions{}) {
		o.HTTP = fastHTTP()
	}
	a, err := ita.NewAppraiser(o)
	require.NoError(t, err)
	return a
}

func passportClient(t *testing.T, kbsURL string, a *ita.Appraiser) *ita.Client {
	c, err := ita.New(ita.Options{URL: kbsURL, Passport: a.Token, HTTP: fastHTTP()})
	require.NoError(t, err)
	return c
}

type seenRequest struct {
	method string
	header http.Header
	body   []byte
}

// record makes the appraisal server remember every request it is asked.
func record(app *kbstest.ITAAppraisal) func() []seenRequest {
	var mu sync.Mutex
	var seen []seenRequest
	app.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
		b, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(b))
		mu.Lock()
		seen = append(seen, seenRequest{r.Method, r.Header.Clone(), b})
		mu.Unlock()
		return false
	}
	return func() []seenRequest { mu.Lock(); defer mu.Unlock(); return append([]seenRequest{}, seen...) }
}

// The passport round trip: nonce from the appraisal API, a quote binding it and the TEE key,
// a token from the appraisal API, the key from the KBS for that token. The requests carry
// what trustauthority-client-for-go sends.
func TestAppraiserPassportRoundTrip(t *testing.T) {
	env := newPassportEnv(t)
	const policy = "1f1f13e0-9fb1-4a57-ba42-361d86157fa3"
	require.NoError(t, env.app.SetPolicy(policy, nil))
	seen := record(env.app)
	a := appraiser(t, ita.AppraiserOptions{URL: env.url, PolicyIDs: []string{strings.ToUpper(policy)}, PolicyMustMatch: true})
	got, err := passportClient(t, env.url, a).GetResource(t.Context(), keyID)
	require.NoError(t, err)
	require.Equal(t, secret, got)

	reqs := seen()
	require.Len(t, reqs, 2)
	uuid := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	n, at := reqs[0], reqs[1]
	require.Equal(t, http.MethodGet, n.method)
	require.Empty(t, n.body)
	require.Equal(t, http.MethodPost, at.method)
	for _, r := range reqs {
		require.Equal(t, apiKey, r.header.Get("X-Api-Key"))
		require.Equal(t, "application/json", r.header.Get("Accept"))
		require.Regexp(t, uuid, r.header.Get("Request-Id"))
	}
	require.Equal(t, n.header.Get("Request-Id"), at.header.Get("Request-Id"), "one request id per token")
	require.Equal(t, "application/json", at.header.Get("Content-Type"))

	var members map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(at.body, &members))
	var names []string
	for k := range members {
		names = append(names, k)
	}
	require.ElementsMatch(t, []string{"quote", "verifier_nonce", "runtime_data", "policy_ids", "policy_must_match"}, names)
	var body struct {
		Quote           []byte    `json:"quote"`
		Nonce           ita.Nonce `json:"verifier_nonce"`
		RuntimeData     []byte    `json:"runtime_data"`
		PolicyIDs       []string  `json:"policy_ids"`
		PolicyMustMatch bool      `json:"policy_must_match"`
	}
	require.NoError(t, json.Unmarshal(at.body, &body))
	require.Len(t, body.RuntimeData, 4+384, "runtime_data is the KBS user_data: u32le(e) ‖ n")
	require.Equal(t, []string{policy}, body.PolicyIDs)
	require.True(t, body.PolicyMustMatch)
	rd, err := kbstest.QuoteReportData(body.Quote)
	require.NoError(t, err)
	h := sha512.New()
	h.Write(body.Nonce.Val)
	h.Write(body.Nonce.Iat)
	h.Write(body.RuntimeData)
	require.Equal(t, h.Sum(nil), rd, "REPORTDATA = SHA-512(val ‖ iat ‖ runtime_data)")
	rd2 := ita.ReportData(body.Nonce.Val, body.Nonce.Iat, body.RuntimeData)
	require.Equal(t, rd, rd2[:])
	// Trust Authority writes iat as Go's time.Time String form.
	_, err = time.Parse("2006-01-02 15:04:05.999999999 -0700 MST", string(body.Nonce.Iat))
	require.NoError(t, err)
}

// The token the appraisal server issues carries what the ITA KBS reads, and the policies.
func TestAppraiserTokenClaims(t *testing.T) {
	env := newPassportEnv(t)
	const match, nomatch = "1f1f13e0-9fb1-4a57-ba42-361d86157fa3", "2f1f13e0-9fb1-4a57-ba42-361d86157fa3"
	require.NoError(t, env.app.SetPolicy(match, func(c map[string]any) bool { return c["tdx_mrtd"] != "" }))
	require.NoError(t, env.app.SetPolicy(nomatch, func(c map[string]any) bool { return c["tdx_mrtd"] == "00" }))
	a := appraiser(t, ita.AppraiserOptions{URL: env.url, PolicyIDs: []string{match, nomatch}})
	ud := bytes.Repeat([]byte{3}, 388)
	tok, err := a.Token(t.Context(), ud)
	require.NoError(t, err)
	payload, err := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[1])
	require.NoError(t, err)
	var c map[string]any
	require.NoError(t, json.Unmarshal(payload, &c))
	require.Equal(t, "TDX", c["attester_type"])
	require.Equal(t, base64.StdEncoding.EncodeToString(ud), c["attester_held_data"])
	require.Len(t, c["tdx_mrtd"], 96)
	require.Len(t, c["tdx_rtmr3"], 96)
	require.Contains(t, c, "verifier_nonce")
	require.Equal(t, []any{map[string]any{"id": match, "version": "v1"}}, c["policy_ids_matched"])
	require.Equal(t, []any{map[string]any{"id": nomatch, "version": "v1"}}, c["policy_ids_unmatched"])

	// With policy_must_match, an unmatched policy gets no token.
	a = appraiser(t, ita.AppraiserOptions{URL: env.url, PolicyIDs: []string{match, nomatch}, PolicyMustMatch: true})
	_, err = a.Token(t.Context(), ud)
	require.ErrorIs(t, err, kbc.ErrRefused)
	require.Contains(t, err.Error(), "HTTP 400")
	require.Contains(t, err.Error(), "policies not matched: "+nomatch)
	// An unknown policy id.
	a = appraiser(t, ita.AppraiserOptions{URL: env.url, PolicyIDs: []string{"3f1f13e0-9fb1-4a57-ba42-361d86157fa3"}})
	_, err = a.Token(t.Context(), ud)
	require.ErrorIs(t, err, kbc.ErrRefused)
	require.Contains(t, err.Error(), "policy id 3f1f13e0-9fb1-4a57-ba42-361d86157fa3 not found")
}

// The API key is a secret: a wrong one is refused (exit 11 in the CLI) and no error, even
// one repeating a service's echo of the request, contains it.
func TestAppraiserAPIKeySecret(t *testing.T) {
	env := newPassportEnv(t)
	wrong := strings.Repeat("w", 40)
	_, err := appraiser(t, ita.AppraiserOptions{URL: env.url, APIKey: wrong}).Token(t.Context(), []byte("ud"))
	require.ErrorIs(t, err, kbc.ErrRefused)
	require.Contains(t, err.Error(), "GET /appraisal/v1/nonce: HTTP 401 Unauthorized")
	require.Contains(t, err.Error(), "API key")
	require.Regexp(t, `request-id [0-9a-f-]{36}, trace-id [0-9a-f]+\)$`, err.Error())
	require.NotContains(t, err.Error(), wrong)

	// A service that echoes the key in its body and headers, at either step.
	for _, step := range []string{"nonce", "attest"} {
		for _, status := range []int{400, 401, 500} {
			t.Run(fmt.Sprint(step, status), func(t *testing.T) {
				app := kbstest.NewITAAppraisal(env.kbs, apiKey)
				app.Intercept = func(s string, w http.ResponseWriter, r *http.Request) bool {
					if !strings.HasSuffix(s, step) {
						return false
					}
					k := r.Header.Get("X-Api-Key")
					w.Header().Set("Trace-Id", "t-"+k)
					w.WriteHeader(status)
					fmt.Fprintf(w, `{"error":"bad request %s, key %s"}`, strings.Repeat("x", 280), k)
					return true
				}
				srv := httptest.NewServer(app)
				t.Cleanup(srv.Close)
				_, err := appraiser(t, ita.AppraiserOptions{URL: srv.URL}).Token(t.Context(), []byte("ud"))
				require.Error(t, err)
				require.NotContains(t, err.Error(), apiKey)
				require.NotContains(t, err.Error(), apiKey[:20], "not even shortened")
			})
		}
	}

	// Configuration errors never repeat it either.
	for _, o := range []ita.AppraiserOptions{
		{URL: "http://127.0.0.1:1", APIKey: apiKey, Attester: attester(t)},
		{URL: "https://x", APIKey: apiKey + " ", Attester: attester(t)},
		{URL: "https://x", APIKey: apiKey, Attester: attester(t), PolicyIDs: []string{apiKey}},
	} {
		_, err := ita.NewAppraiser(o)
		require.ErrorIs(t, err, kbc.ErrConfig)
		require.NotContains(t, err.Error(), apiKey[:20])
	}
}

func TestAppraiserConfig(t *testing.T) {
	for name, o := range map[string]ita.AppraiserOptions{
		"no attester":     {URL: "https://x", APIKey: apiKey},
		"no key":          {URL: "https://x", Attester: attester(t)},
		"key with space":  {URL: "https://x", APIKey: "a b", Attester: attester(t)},
		"key with ctl":    {URL: "https://x", APIKey: "a\nb", Attester: attester(t)},
		"bad policy id":   {URL: "https://x", APIKey: apiKey, Attester: attester(t), PolicyIDs: []string{"p1"}},
		"plain http":      {URL: "http://x", APIKey: apiKey, Attester: attester(t)},
		"url with query":  {URL: "https://x/?k=v", APIKey: apiKey, Attester: attester(t)},
		"not a URL at al": {URL: "::", APIKey: apiKey, Attester: attester(t)},
	} {
		_, err := ita.NewAppraiser(o)
		require.ErrorIs(t, err, kbc.ErrConfig, name)
	}
	// The sample TEE: refused before any request.
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits.Add(1) }))
	t.Cleanup(srv.Close)
	_, err := appraiser(t, ita.AppraiserOptions{URL: srv.URL, Attester: kbstest.SampleAttester{}}).Token(t.Context(), []byte("ud"))
	require.ErrorIs(t, err, kbc.ErrConfig)
	require.Zero(t, hits.Load())
}

// A quote that does not bind the nonce and user data, a nonce that is not Trust Authority's,
// or an expired one: Trust Authority refuses (400), the client reports a refusal.
func TestAppraiserEvidenceRefused(t *testing.T) {
	env := newPassportEnv(t)
	_, err := appraiser(t, ita.AppraiserOptions{URL: env.url, Attester: wrongRD{attester(t)}}).Token(t.Context(), []byte("ud"))
	require.ErrorIs(t, err, kbc.ErrRefused)
	require.Contains(t, err.Error(), "POST /appraisal/v1/attest: HTTP 400 Bad Request: TDX quote REPORTDATA is not SHA-512")

	env.app.Rewrite = func(step string, body []byte) []byte {
		var n ita.Nonce
		require.NoError(t, json.Unmarshal(body, &n))
		n.Val[0] ^= 1
		b, _ := json.Marshal(n)
		return b
	}
	_, err = appraiser(t, ita.AppraiserOptions{URL: env.url}).Token(t.Context(), []byte("ud"))
	require.ErrorIs(t, err, kbc.ErrRefused)
	require.Contains(t, err.Error(), "nonce signature does not verify")
	env.app.Rewrite = nil

	env.app.Now = func() time.Time { return time.Now().Add(-time.Hour) }
	a := appraiser(t, ita.AppraiserOptions{URL: env.url})
	env.app.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
		if step == kbstest.StepAppraisalAttest {
			env.app.Now = nil
		}
		return false
	}
	_, err = a.Token(t.Context(), []byte("ud"))
	require.ErrorIs(t, err, kbc.ErrRefused)
	require.Contains(t, err.Error(), "nonce expired")
}

// Server failures: 5xx is retried, then a transport error keeping the service's text; 429 is
// a transport error too; 404 and other statuses are protocol errors.
func TestAppraiserServerErrors(t *testing.T) {
	for _, tc := range []struct {
		step     string
		status   int
		body     string
		sentinel error
		want     string
		attempts int32
	}{
		{kbstest.StepAppraisalNonce, 503, `{"error":"service unavailable"}`, kbc.ErrTransport, "HTTP 503: service unavailable", 3},
		{kbstest.StepAppraisalAttest, 500, "internal", kbc.ErrTransport, "HTTP 500: internal", 3},
		{kbstest.StepAppraisalAttest, 502, `{"message":"bad gateway"}`, kbc.ErrTransport, "HTTP 502: bad gateway", 3},
		{kbstest.StepAppraisalAttest, 429, `{"error":"Too Many Requests"}`, kbc.ErrTransport, "HTTP 429 Too Many Requests: Too Many Requests (rate limited", 1},
		{kbstest.StepAppraisalNonce, 404, "", kbc.ErrProtocol, "HTTP 404 Not Found: (empty body) (is the URL the Trust Authority API URL?)", 1},
		{kbstest.StepAppraisalNonce, 400, `{"error":"x"}`, kbc.ErrProtocol, "GET /appraisal/v1/nonce: HTTP 400 Bad Request: x", 1},
		{kbstest.StepAppraisalAttest, 403, `{"error":"forbidden"}`, kbc.ErrRefused, "HTTP 403 Forbidden: forbidden (check the attestation API key)", 1},
		{kbstest.StepAppraisalAttest, 307, "", kbc.ErrProtocol, "HTTP 307", 1},
	} {
		t.Run(fmt.Sprint(tc.step, tc.status), func(t *testing.T) {
			env := newPassportEnv(t)
			var n atomic.Int32
			env.app.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
				if step != tc.step {
					return false
				}
				n.Add(1)
				if tc.status == 307 {
					w.Header().Set("Location", "http://127.0.0.1:1/")
				}
				w.WriteHeader(tc.status)
				w.Write([]byte(tc.body))
				return true
			}
			_, err := appraiser(t, ita.AppraiserOptions{URL: env.url}).Token(t.Context(), []byte("ud"))
			require.ErrorIs(t, err, tc.sentinel)
			require.Contains(t, err.Error(), tc.want)
			require.Equal(t, tc.attempts, n.Load())
		})
	}
}

// Garbage and oversized answers are protocol errors naming the step.
func TestAppraiserGarbage(t *testing.T) {
	env := newPassportEnv(t)
	otherTok, err := env.kbs.IssueToken([]byte("someone else's key"))
	require.NoError(t, err)
	hdr := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"ES256"}`))
	noHeld := hdr + "." + base64.RawURLEncoding.EncodeToString([]byte(`{"attester_type":"TDX"}`)) + ".c2ln"
	notJSON := hdr + "." + base64.RawURLEncoding.EncodeToString([]byte(`not json`)) + ".c2ln"
	for _, tc := range []struct {
		step, body, want string
	}{
		{kbstest.StepAppraisalNonce, "", "not a nonce"},
		{kbstest.StepAppraisalNonce, "not json", "not a nonce"},
		{kbstest.StepAppraisalNonce, "{}", "not a nonce"},
		{kbstest.StepAppraisalNonce, `{"val":"AA==","iat":"AA=="}`, "not a nonce"},
		{kbstest.StepAppraisalNonce, `{"val":"AA==","iat":"AA==","signature":"AA=="} {}`, "not a nonce"},
		{kbstest.StepAppraisalNonce, `{"val":"` + strings.Repeat("A", 5000) + `","iat":"AA==","signature":"AA=="}`, "exceeds 4096 bytes"},
		{kbstest.StepAppraisalAttest, "", "not a token answer"},
		{kbstest.StepAppraisalAttest, "[]", "not a token answer"},
		{kbstest.StepAppraisalAttest, `{"token":""}`, "not a token answer"},
		{kbstest.StepAppraisalAttest, `{"token":"abc"}`, "not a JWT"},
		{kbstest.StepAppraisalAttest, `{"token":"a.b"}`, "not a JWT"},
		{kbstest.StepAppraisalAttest, `{"token":"` + notJSON + `"}`, "payload is not base64url JSON"},
		{kbstest.StepAppraisalAttest, `{"token":"` + noHeld + `"}`, "no attester_held_data claim"},
		{kbstest.StepAppraisalAttest, `{"token":"` + otherTok + `"}`, "attester_held_data is not this request's user data"},
	} {
		env.app.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
			if step != tc.step {
				return false
			}
			w.Write([]byte(tc.body))
			return true
		}
		_, err := appraiser(t, ita.AppraiserOptions{URL: env.url}).Token(t.Context(), []byte("ud"))
		require.ErrorIs(t, err, kbc.ErrProtocol, "%s %q", tc.step, tc.body)
		require.Contains(t, err.Error(), tc.want, "%s %q", tc.step, tc.body)
		require.Contains(t, err.Error(), "(request-id ")
	}

	env.app.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
		if step != kbstest.StepAppraisalAttest {
			return false
		}
		w.Write(bytes.Repeat([]byte("A"), 64<<10))
		return true
	}
	o := fastHTTP()
	o.MaxResponseBytes = 16 << 10
	_, err = appraiser(t, ita.AppraiserOptions{URL: env.url, HTTP: o}).Token(t.Context(), []byte("ud"))
	require.ErrorIs(t, err, kbc.ErrProtocol)
	require.Contains(t, err.Error(), "/appraisal/v1/attest: response body exceeds 16384 bytes")
}

// Through the KBS client: a failing appraisal fails GetResource with the same sentinel; an
// attester failure comes back unchanged; a cancelled context is a cancellation.
func TestAppraiserThroughClient(t *testing.T) {
	env := newPassportEnv(t)
	_, err := passportClient(t, env.url, appraiser(t, ita.AppraiserOptions{URL: env.url, APIKey: "wrong-key"})).GetResource(t.Context(), keyID)
	require.ErrorIs(t, err, kbc.ErrRefused)
	require.Contains(t, err.Error(), "ita: obtaining the attestation token: ")

	boom := errors.New("no quote today")
	_, err = passportClient(t, env.url, appraiser(t, ita.AppraiserOptions{URL: env.url, Attester: failing{boom}})).GetResource(t.Context(), keyID)
	require.ErrorIs(t, err, boom)

	ctx, cancel := context.WithCancel(t.Context())
	env.app.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
		cancel()
		<-r.Context().Done()
		return true
	}
	_, err = passportClient(t, env.url, appraiser(t, ita.AppraiserOptions{URL: env.url})).GetResource(ctx, keyID)
	require.ErrorIs(t, err, context.Canceled)
}

type wrongRD struct{ evidence.Attester }

func (w wrongRD) Attest(ctx context.Context, rd [64]byte) (*evidence.Evidence, error) {
	rd[0] ^= 1
	return w.Attester.Attest(ctx, rd)
}

type failing struct{ err error }

func (failing) TEE() string { return evidence.TEETDX }
func (f failing) Attest(context.Context, [64]byte) (*evidence.Evidence, error) {
	return nil, f.err
}
