package agent

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// A redirect from the base URL's origin to anywhere else carries neither the extra headers
// (the bearer token) nor the base URL's query (a SAS), not even in a Referer: Go's client
// forwards Authorization to the same host name on another port and to subdomains, and sends
// the previous URL, query included, as the Referer.
func TestHTTPSourceRedirectKeepsCredentialsAtOrigin(t *testing.T) {
	var mu sync.Mutex
	var elsewhere []string // every header value the other hosts saw
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		for k, vs := range r.Header {
			elsewhere = append(elsewhere, k+": "+strings.Join(vs, ","))
		}
		elsewhere = append(elsewhere, "query: "+r.URL.RawQuery)
		mu.Unlock()
		io.WriteString(w, "ciphertext")
	}))
	defer other.Close()
	_, otherPort, err := net.SplitHostPort(other.Listener.Addr().String())
	require.NoError(t, err)

	var target string // where the origin redirects to
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("sig") != "s3cr3t" || r.Header.Get("Authorization") != "Bearer tok3n" {
			http.Error(w, "denied", http.StatusForbidden)
			return
		}
		http.Redirect(w, r, target, http.StatusFound)
	}))
	defer origin.Close()
	hdr := http.Header{"Authorization": {"Bearer tok3n"}, "x-api-key": {"k3y"}} // a key as given, not canonical

	// Any host name reaches the two test servers: "models.example" the origin, every
	// other name the other server.
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, _, _ := net.SplitHostPort(addr)
		to := other.Listener.Addr().String()
		if host == "models.example" {
			to = origin.Listener.Addr().String()
		}
		return (&net.Dialer{}).DialContext(ctx, network, to)
	}
	custom := &http.Client{Transport: &http.Transport{DialContext: dial}}

	for _, tc := range []struct {
		name, base, target string
		client             *http.Client
	}{
		{"other host", origin.URL + "/m/?sv=1&sig=s3cr3t", "http://localhost:" + otherPort + "/cdn/obj", nil},
		{"same host name, other port", origin.URL + "/m/?sv=1&sig=s3cr3t", other.URL + "/cdn/obj", nil},
		{"subdomain", "http://models.example/m/?sv=1&sig=s3cr3t", "http://cdn.models.example/cdn/obj", custom},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mu.Lock()
			elsewhere, target = nil, tc.target
			mu.Unlock()
			rc, err := httpSource(t, tc.base, HTTPOptions{Header: hdr, Client: tc.client}).Open(context.Background(), "obj", 0)
			require.NoError(t, err)
			b, err := io.ReadAll(rc)
			require.NoError(t, err)
			rc.Close()
			require.Equal(t, "ciphertext", string(b))
			mu.Lock()
			defer mu.Unlock()
			require.NotEmpty(t, elsewhere)
			for _, h := range elsewhere {
				for _, secret := range []string{"s3cr3t", "tok3n", "k3y"} {
					require.NotContains(t, h, secret, "a credential left the origin")
				}
			}
		})
	}
}

// A caller's client keeps its own redirect policy.
func TestHTTPSourceRedirectCallerPolicy(t *testing.T) {
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/elsewhere", http.StatusFound)
	}))
	defer ts.Close()
	c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	_, err := httpSource(t, ts.URL, HTTPOptions{Client: c, Retries: -1}).Open(context.Background(), "obj", 0)
	require.ErrorIs(t, err, ErrSource)
	require.Contains(t, err.Error(), "302")
}
