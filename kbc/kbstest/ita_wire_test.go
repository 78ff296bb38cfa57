package kbstest_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/kbc/ita"
	"github.com/cai-agent/cai-agent/kbc/kbstest"
)

// The ITA test server answers as intel/trustauthority-kbs does
// (transport/http/key_transfer.go, transport/http/http.go, service/key_transfer.go):
// bad Accept/Content-Type are 415, a non-empty body needs Content-Type: application/json
// whatever the mode, a body with neither Attestation-Type nor attestation_token is 400 (only
// an empty body asks for a nonce), errors are {"error": "<code>: <message>"} for the
// service's errors and {"error": "<message>"} for the transport's, the route only matches
// version-4 UUIDs and POST.
func TestITAServerWire(t *testing.T) {
	s, srv, _ := newITA(t)
	tok, err := s.IssueToken(bytes.Repeat([]byte{1}, 4+384))
	require.NoError(t, err)
	tokBody := `{"attestation_token":"` + tok + `"}`
	const (
		acc = "Accept"
		ct  = "Content-Type"
		at  = "Attestation-Type"
		js  = "application/json"
	)
	path := "/kbs/v1/keys/" + itaKeyID + "/transfer"
	for _, tc := range []struct {
		name   string
		method string
		path   string
		hdr    map[string]string
		body   string
		status int
		err    string // the "error" member; "" = not an ITA error body
	}{
		{"no Accept", "POST", path, nil, "", 415, "Invalid Accept header"},
		{"Accept with parameters", "POST", path, map[string]string{acc: js + "; charset=utf-8"}, "", 415, "Invalid Accept header"},
		{"bad Content-Type", "POST", path, map[string]string{acc: js, ct: "text/plain", at: "TDX"}, `{}`, 415, "Invalid Content-type header"},
		{"passport without Content-Type", "POST", path, map[string]string{acc: js}, tokBody, 415, "Invalid Content-type header"},
		{"body without type or token", "POST", path, map[string]string{acc: js, ct: js}, `{}`, 400, "Invalid request body"},
		{"blank body", "POST", path, map[string]string{acc: js, ct: js}, ` `, 400, "Failed to JSON-decode request body"},
		{"unknown member", "POST", path, map[string]string{acc: js, ct: js, at: "TDX"}, `{"x":1}`, 400, "Failed to JSON-decode request body"},
		{"bad type", "POST", path, map[string]string{acc: js, ct: js, at: "SEV"}, `{}`, 400, "Invalid attestion type header"},
		{"unknown key", "POST", "/kbs/v1/keys/00000000-0000-4000-8000-000000000000/transfer", map[string]string{acc: js}, "", 404, "404: Key with specified id does not exist"},
		{"type not the policy's", "POST", path, map[string]string{acc: js, ct: js, at: "SGX"}, `{}`, 401, "401: attestation-type in request header does not match with attestation-type in key-transfer policy"},
		{"forged token", "POST", path, map[string]string{acc: js, ct: js}, `{"attestation_token":"a.b.c"}`, 401, "401: Failed to authenticate attestation-token"},
		{"GET", "GET", path, map[string]string{acc: js}, "", 405, ""},
		{"not a v4 UUID", "POST", "/kbs/v1/keys/6f9a5b3c-2e1d-1c8b-9a7f-0e1d2c3b4a59/transfer", map[string]string{acc: js}, "", 404, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := do(t, tc.method, srv.URL+tc.path, tc.hdr, tc.body)
			b := a.body
			require.Equal(t, tc.status, a.status, "%s", b)
			if tc.err == "" {
				return
			}
			var e struct {
				Error string `json:"error"`
			}
			dec := json.NewDecoder(bytes.NewReader(b))
			dec.DisallowUnknownFields()
			require.NoError(t, dec.Decode(&e), "%s", b)
			require.Equal(t, tc.err, e.Error)
		})
	}
}

// Success answers carry Attestation-Type (the policy's on a nonce, empty on a key) and are
// written by json.Encoder (newline-terminated).
func TestITAServerSuccessHeaders(t *testing.T) {
	s := kbstest.NewITA()
	require.NoError(t, s.SetKey(itaKeyID, secret))
	var seen []http.Header
	var bodies [][]byte
	s.Rewrite = func(step string, body []byte) []byte { bodies = append(bodies, body); return body }
	srv := httptest.NewServer(&headerRecorder{h: s, seen: &seen})
	t.Cleanup(srv.Close)
	_, err := itaClient(t, ita.Options{URL: srv.URL, Nonce: true}).GetResource(t.Context(), itaKeyID)
	require.NoError(t, err)
	require.Len(t, seen, 2)
	require.Equal(t, []string{"TDX"}, seen[0].Values("Attestation-Type"), "nonce")
	require.Equal(t, []string{""}, seen[1].Values("Attestation-Type"), "key")
	require.Len(t, bodies, 2)
	for _, b := range bodies {
		require.True(t, bytes.HasSuffix(b, []byte("}\n")), "%q", b)
	}
}

type headerRecorder struct {
	h    http.Handler
	seen *[]http.Header
}

func (r *headerRecorder) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.h.ServeHTTP(w, req)
	*r.seen = append(*r.seen, w.Header().Clone())
}

// The real KBS creates keys with version-4 UUIDs and routes only those.
func TestITASetKeyV4(t *testing.T) {
	s := kbstest.NewITA()
	require.NoError(t, s.SetKey(strings.ToUpper(itaKeyID), secret))
	require.Error(t, s.SetKey("6f9a5b3c-2e1d-1c8b-9a7f-0e1d2c3b4a59", secret))
	require.Error(t, s.SetKey("6f9a5b3c-2e1d-4c8b-7a7f-0e1d2c3b4a59", secret))
}
