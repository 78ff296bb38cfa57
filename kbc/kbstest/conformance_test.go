package kbstest_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/kbc"
	"github.com/cai-agent/cai-agent/kbc/ita"
	"github.com/cai-agent/cai-agent/kbc/kbstest"
	"github.com/cai-agent/cai-agent/kbc/trustee"
)

func fixture(t testing.TB, name string) []byte {
	b, err := os.ReadFile(filepath.Join("..", "..", "testdata", "tdx", name))
	require.NoError(t, err)
	return b
}

// broker adapts one protocol (server + client) to the conformance suite.
type broker struct {
	name string
	// handler returns the test server with one stored secret and its hooks.
	handler func(t *testing.T) (http.Handler, *kbstest.Hooks)
	// client returns a client for url.
	client func(t *testing.T, url string, o kbc.HTTPOptions, a evidence.Attester) kbc.Client
	// attester is the evidence the client uses.
	attester     evidence.Attester
	uri, unknown string
	// resourceStep is the hook step answering with the secret.
	resourceStep string
	// wrongVersion returns a client speaking another protocol version, or nil.
	wrongVersion func(t *testing.T, url string) kbc.Client
	// wrongNonce rewrites the nonce the server hands out: step and rewrite.
	nonceStep   string
	wrongNonce  func(t *testing.T, body []byte) []byte
	tamper      []func(t *testing.T, body []byte) []byte
	unknownErr  error
	nonceClient func(t *testing.T, url string) kbc.Client
}

var secret = []byte("0123456789abcdef0123456789abcdef")

const (
	trusteeURI = "kbs:///default/model/key"
	itaKeyID   = "6f9a5b3c-2e1d-4c8b-9a7f-0e1d2c3b4a59"
)

func trusteeBroker(a evidence.Attester) broker {
	return broker{
		name: "trustee-" + a.TEE(),
		handler: func(t *testing.T) (http.Handler, *kbstest.Hooks) {
			s := kbstest.NewTrustee()
			require.NoError(t, s.SetResource(trusteeURI, secret))
			return s, &s.Hooks
		},
		client: func(t *testing.T, url string, o kbc.HTTPOptions, a evidence.Attester) kbc.Client {
			c, err := trustee.New(trustee.Options{URL: url, Attester: a, HTTP: o})
			require.NoError(t, err)
			return c
		},
		attester: a, uri: trusteeURI, unknown: "kbs:///default/model/other", resourceStep: kbstest.StepResource,
		wrongVersion: func(t *testing.T, url string) kbc.Client {
			c, err := trustee.New(trustee.Options{URL: url, Attester: a, Version: "0.3.0", HTTP: kbc.HTTPOptions{InsecureHTTP: true}})
			require.NoError(t, err)
			return c
		},
		nonceStep: kbstest.StepAuth,
		wrongNonce: func(t *testing.T, body []byte) []byte {
			var ch map[string]any
			require.NoError(t, json.Unmarshal(body, &ch))
			ch["nonce"] = base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32))
			b, _ := json.Marshal(ch)
			return b
		},
		tamper: []func(t *testing.T, body []byte) []byte{
			func(t *testing.T, body []byte) []byte { return tamperMember(t, body, "ciphertext") },
			func(t *testing.T, body []byte) []byte { return tamperMember(t, body, "tag") },
			func(t *testing.T, body []byte) []byte { return tamperMember(t, body, "encrypted_key") },
			func(t *testing.T, body []byte) []byte { return tamperMember(t, body, "iv") },
			func(t *testing.T, body []byte) []byte { return tamperMember(t, body, "protected") },
		},
		unknownErr: kbc.ErrRefused, // Trustee answers 401 PluginInternalError
	}
}

func itaBroker(a evidence.Attester) broker {
	return broker{
		name: "ita",
		handler: func(t *testing.T) (http.Handler, *kbstest.Hooks) {
			s := kbstest.NewITA()
			require.NoError(t, s.SetKey(itaKeyID, secret))
			return s, &s.Hooks
		},
		client: func(t *testing.T, url string, o kbc.HTTPOptions, a evidence.Attester) kbc.Client {
			c, err := ita.New(ita.Options{URL: url, Attester: a, HTTP: o})
			require.NoError(t, err)
			return c
		},
		attester: a, uri: itaKeyID, unknown: "00000000-0000-4000-8000-000000000000", resourceStep: kbstest.StepTransfer,
		nonceStep: kbstest.StepNonce,
		wrongNonce: func(t *testing.T, body []byte) []byte {
			var n ita.Nonce
			require.NoError(t, json.Unmarshal(body, &n))
			n.Val[0] ^= 1
			b, _ := json.Marshal(n)
			return b
		},
		nonceClient: func(t *testing.T, url string) kbc.Client {
			c, err := ita.New(ita.Options{URL: url, Attester: a, Nonce: true, HTTP: kbc.HTTPOptions{InsecureHTTP: true}})
			require.NoError(t, err)
			return c
		},
		tamper: []func(t *testing.T, body []byte) []byte{
			func(t *testing.T, body []byte) []byte { return tamperBytes(t, body, "wrapped_key", 30) },
			func(t *testing.T, body []byte) []byte { return tamperBytes(t, body, "wrapped_key", 0) },
			func(t *testing.T, body []byte) []byte { return tamperBytes(t, body, "wrapped_swk", 5) },
		},
		unknownErr: kbc.ErrNotFound,
	}
}

// appraisalKey is the API key of the appraisal server of itaPassportBroker.
const appraisalKey = "conformance-ita-api-key-0123456789"

// itaPassportBroker is the ITA KBS in passport mode: the client gets its token from the
// appraisal test server (on the same listener) through an ita.Appraiser.
func itaPassportBroker(a evidence.Attester) broker {
	b := itaBroker(a)
	b.name = "ita-passport"
	b.handler = func(t *testing.T) (http.Handler, *kbstest.Hooks) {
		kbs := kbstest.NewITA()
		require.NoError(t, kbs.SetKey(itaKeyID, secret))
		app := kbstest.NewITAAppraisal(kbs, appraisalKey)
		// One set of hooks for both servers (their step names differ).
		hooks := &kbstest.Hooks{}
		fwd := kbstest.Hooks{
			Intercept: func(step string, w http.ResponseWriter, r *http.Request) bool {
				return hooks.Intercept != nil && hooks.Intercept(step, w, r)
			},
			Rewrite: func(step string, body []byte) []byte {
				if hooks.Rewrite != nil {
					return hooks.Rewrite(step, body)
				}
				return body
			},
		}
		kbs.Hooks, app.Hooks = fwd, fwd
		return app.Handler(kbs), hooks
	}
	b.client = func(t *testing.T, url string, o kbc.HTTPOptions, a evidence.Attester) kbc.Client {
		ap, err := ita.NewAppraiser(ita.AppraiserOptions{URL: url, APIKey: appraisalKey, Attester: a, HTTP: o})
		require.NoError(t, err)
		c, err := ita.New(ita.Options{URL: url, Passport: ap.Token, HTTP: o})
		require.NoError(t, err)
		return c
	}
	// The nonce is Trust Authority's: a tampered one is refused by the appraisal (400).
	b.nonceStep, b.nonceClient = kbstest.StepAppraisalNonce, nil
	return b
}

// tamperMember flips one bit of a base64url JWE member.
func tamperMember(t *testing.T, body []byte, member string) []byte {
	var m map[string]string
	require.NoError(t, json.Unmarshal(body, &m))
	b, err := base64.RawURLEncoding.DecodeString(m[member])
	require.NoError(t, err)
	b[len(b)/2] ^= 0x10
	m[member] = base64.RawURLEncoding.EncodeToString(b)
	out, _ := json.Marshal(m)
	return out
}

// tamperBytes flips one bit of a std base64 member at offset off.
func tamperBytes(t *testing.T, body []byte, member string, off int) []byte {
	var m map[string][]byte
	require.NoError(t, json.Unmarshal(body, &m))
	m[member][off] ^= 0x01
	out, _ := json.Marshal(m)
	return out
}

func brokers(t *testing.T) []broker {
	tdx4 := kbstest.TDXAttester{Quote: fixture(t, "trustee-tdx_quote_4.dat"), CCEventLog: []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	tdx5 := kbstest.TDXAttester{Quote: fixture(t, "trustee-tdx_quote_5.dat")}
	b := []broker{trusteeBroker(kbstest.SampleAttester{}), trusteeBroker(tdx4), itaBroker(tdx4), itaPassportBroker(tdx5)}
	v5 := trusteeBroker(tdx5)
	v5.name = "trustee-tdx-v5"
	return append(b, v5)
}

func fast() kbc.HTTPOptions {
	return kbc.HTTPOptions{InsecureHTTP: true, Timeout: 5 * time.Second, Retries: 2, RetryBackoff: 5 * time.Millisecond}
}

// TestConformance runs every client against its faithful test server.
func TestConformance(t *testing.T) {
	for _, b := range brokers(t) {
		t.Run(b.name, func(t *testing.T) { runConformance(t, b) })
	}
}

func runConformance(t *testing.T, b broker) {
	start := func(t *testing.T) (*httptest.Server, *kbstest.Hooks) {
		h, hooks := b.handler(t)
		srv := httptest.NewServer(h)
		t.Cleanup(srv.Close)
		return srv, hooks
	}

	t.Run("happy", func(t *testing.T) {
		srv, _ := start(t)
		c := b.client(t, srv.URL, fast(), b.attester)
		got, err := c.GetResource(t.Context(), b.uri)
		require.NoError(t, err)
		require.Equal(t, secret, got)
		// Again, on the same client (session or fresh transfer).
		got, err = c.GetResource(t.Context(), b.uri)
		require.NoError(t, err)
		require.Equal(t, secret, got)
	})

	t.Run("wrong-version", func(t *testing.T) {
		if b.wrongVersion == nil {
			t.Skip("the ITA KBS has no protocol version handshake (the API version is the /kbs/v1 path)")
		}
		srv, _ := start(t)
		_, err := b.wrongVersion(t, srv.URL).GetResource(t.Context(), b.uri)
		require.ErrorIs(t, err, kbc.ErrRefused)
		require.Contains(t, err.Error(), "Version Mismatch: expect =0.4.0 while the request is 0.3.0")
	})

	t.Run("wrong-nonce", func(t *testing.T) {
		srv, hooks := start(t)
		hooks.Rewrite = func(step string, body []byte) []byte {
			if step == b.nonceStep {
				return b.wrongNonce(t, body)
			}
			return body
		}
		c := b.client(t, srv.URL, fast(), b.attester)
		if b.nonceClient != nil {
			c = b.nonceClient(t, srv.URL)
		}
		_, err := c.GetResource(t.Context(), b.uri)
		require.ErrorIs(t, err, kbc.ErrRefused)
		require.NotContains(t, err.Error(), string(secret))
	})

	t.Run("evidence-not-bound", func(t *testing.T) {
		srv, _ := start(t)
		c := b.client(t, srv.URL, fast(), wrongRD{b.attester})
		_, err := c.GetResource(t.Context(), b.uri)
		require.ErrorIs(t, err, kbc.ErrRefused)
	})

	t.Run("tampered", func(t *testing.T) {
		for i, tamper := range b.tamper {
			srv, hooks := start(t)
			hooks.Rewrite = func(step string, body []byte) []byte {
				if step == b.resourceStep {
					return tamper(t, body)
				}
				return body
			}
			c := b.client(t, srv.URL, fast(), b.attester)
			got, err := c.GetResource(t.Context(), b.uri)
			require.ErrorIs(t, err, kbc.ErrProtocol, "tamper %d", i)
			require.Nil(t, got)
		}
	})

	t.Run("unknown-resource", func(t *testing.T) {
		srv, _ := start(t)
		_, err := b.client(t, srv.URL, fast(), b.attester).GetResource(t.Context(), b.unknown)
		require.ErrorIs(t, err, b.unknownErr)
	})

	t.Run("500", func(t *testing.T) {
		srv, hooks := start(t)
		var n atomic.Int32
		hooks.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
			if step != b.resourceStep {
				return false
			}
			n.Add(1)
			http.Error(w, "internal", http.StatusInternalServerError)
			return true
		}
		_, err := b.client(t, srv.URL, fast(), b.attester).GetResource(t.Context(), b.uri)
		require.ErrorIs(t, err, kbc.ErrTransport)
		require.Contains(t, err.Error(), "HTTP 500")
		require.EqualValues(t, 3, n.Load(), "1 attempt + 2 retries")
	})

	t.Run("slow", func(t *testing.T) {
		srv, hooks := start(t)
		hooks.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
			if step != b.resourceStep {
				return false
			}
			io.Copy(io.Discard, r.Body) // so the server notices the client going away
			select {
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
			return true
		}
		o := fast()
		o.Timeout, o.Retries = 200*time.Millisecond, -1
		_, err := b.client(t, srv.URL, o, b.attester).GetResource(t.Context(), b.uri)
		require.ErrorIs(t, err, kbc.ErrTransport)
		require.Contains(t, err.Error(), "timed out")
	})

	t.Run("garbage", func(t *testing.T) {
		for _, body := range []string{"", "not json", "{}", `{"protected":1}`, "[]", "null", `{"wrapped_key":"AA=="}`} {
			srv, hooks := start(t)
			hooks.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
				if step != b.resourceStep {
					return false
				}
				w.Write([]byte(body))
				return true
			}
			_, err := b.client(t, srv.URL, fast(), b.attester).GetResource(t.Context(), b.uri)
			require.ErrorIs(t, err, kbc.ErrProtocol, "body %q", body)
		}
	})

	t.Run("oversized", func(t *testing.T) {
		srv, hooks := start(t)
		hooks.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
			if step != b.resourceStep {
				return false
			}
			w.Write(bytes.Repeat([]byte("A"), 64<<10))
			return true
		}
		o := fast()
		o.MaxResponseBytes = 16 << 10
		_, err := b.client(t, srv.URL, o, b.attester).GetResource(t.Context(), b.uri)
		require.ErrorIs(t, err, kbc.ErrProtocol)
		require.Contains(t, err.Error(), "exceeds 16384 bytes")
	})

	t.Run("redirect-not-followed", func(t *testing.T) {
		var hits atomic.Int32
		other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hits.Add(1) }))
		t.Cleanup(other.Close)
		srv, hooks := start(t)
		hooks.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
			if step != b.resourceStep {
				return false
			}
			http.Redirect(w, r, other.URL+r.URL.Path, http.StatusTemporaryRedirect)
			return true
		}
		_, err := b.client(t, srv.URL, fast(), b.attester).GetResource(t.Context(), b.uri)
		require.ErrorIs(t, err, kbc.ErrProtocol)
		require.Contains(t, err.Error(), "HTTP 307")
		require.Zero(t, hits.Load())
	})

	t.Run("tls", func(t *testing.T) {
		h, _ := b.handler(t)
		srv := httptest.NewTLSServer(h)
		t.Cleanup(srv.Close)
		// Unknown CA: refused.
		_, err := b.client(t, srv.URL, kbc.HTTPOptions{Retries: -1}, b.attester).GetResource(t.Context(), b.uri)
		require.ErrorIs(t, err, kbc.ErrTransport)
		require.Contains(t, err.Error(), "certificate")
		// With the CA file: works.
		ca := filepath.Join(t.TempDir(), "ca.pem")
		require.NoError(t, os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644))
		got, err := b.client(t, srv.URL, kbc.HTTPOptions{CAFile: ca}, b.attester).GetResource(t.Context(), b.uri)
		require.NoError(t, err)
		require.Equal(t, secret, got)
	})

	t.Run("plain-http-refused", func(t *testing.T) {
		var err error
		switch {
		case strings.HasPrefix(b.name, "trustee"):
			_, err = trustee.New(trustee.Options{URL: "http://127.0.0.1:1", Attester: b.attester})
		default:
			_, err = ita.New(ita.Options{URL: "http://127.0.0.1:1", Attester: b.attester})
		}
		require.ErrorIs(t, err, kbc.ErrConfig)
	})

	t.Run("cancelled", func(t *testing.T) {
		srv, hooks := start(t)
		ctx, cancel := context.WithCancel(t.Context())
		hooks.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
			if step == b.resourceStep {
				io.Copy(io.Discard, r.Body)
				cancel()
				select {
				case <-r.Context().Done():
				case <-time.After(5 * time.Second):
				}
				return true
			}
			return false
		}
		_, err := b.client(t, srv.URL, fast(), b.attester).GetResource(ctx, b.uri)
		require.ErrorIs(t, err, context.Canceled)
	})

	t.Run("attester-error", func(t *testing.T) {
		srv, _ := start(t)
		boom := errors.New("no quote today")
		_, err := b.client(t, srv.URL, fast(), failing{b.attester, boom}).GetResource(t.Context(), b.uri)
		require.ErrorIs(t, err, boom)
	})
}

// wrongRD attests to a REPORTDATA other than the one asked for.
type wrongRD struct{ evidence.Attester }

func (w wrongRD) Attest(ctx context.Context, rd [64]byte) (*evidence.Evidence, error) {
	rd[0] ^= 1
	return w.Attester.Attest(ctx, rd)
}

type failing struct {
	evidence.Attester
	err error
}

func (f failing) Attest(context.Context, [64]byte) (*evidence.Evidence, error) { return nil, f.err }
