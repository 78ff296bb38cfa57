package ita_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/crypto/ccz"
	"github.com/cai-agent/cai-agent/kbc"
	"github.com/cai-agent/cai-agent/kbc/ita"
	"github.com/cai-agent/cai-agent/kbc/kbstest"
)

const keyID = "6f9a5b3c-2e1d-4c8b-9a7f-0e1d2c3b4a59"

var secret = []byte("ita-client-test-secret-0123456789")

func attester(t *testing.T) kbstest.TDXAttester {
	q, err := os.ReadFile(filepath.Join("..", "..", "testdata", "tdx", "trustee-tdx_quote_4.dat"))
	require.NoError(t, err)
	return kbstest.TDXAttester{Quote: q}
}

func client(t *testing.T, url string) *ita.Client {
	c, err := ita.New(ita.Options{URL: url, Attester: attester(t),
		HTTP: kbc.HTTPOptions{InsecureHTTP: true, Timeout: 5 * time.Second, Retries: 1, RetryBackoff: time.Millisecond}})
	require.NoError(t, err)
	return c
}

// When the appraisal fails, the real KBS answers 502 {"error":"502: Error retrieving token
// from Trust Authority service"} (intel/trustauthority-kbs service/key_transfer.go). After the
// retries the client reports a transport error, but keeps the KBS's explanation.
func TestBadGatewayKeepsDetail(t *testing.T) {
	s := kbstest.NewITA()
	require.NoError(t, s.SetKey(keyID, secret))
	s.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
		w.WriteHeader(http.StatusBadGateway)
		w.Write([]byte(`{"error":"502: Error retrieving token from Trust Authority service"}` + "\n"))
		return true
	}
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	_, err := client(t, srv.URL).GetResource(t.Context(), keyID)
	require.ErrorIs(t, err, kbc.ErrTransport)
	require.Contains(t, err.Error(), "HTTP 502")
	require.Contains(t, err.Error(), "Error retrieving token from Trust Authority service")
}

// evil is a KBS that answers a transfer request with a wrapped key built by wrap from the
// request's user_data key.
func evil(t *testing.T, wrap func(pub *rsa.PublicKey) (wk, ws []byte)) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			UserData []byte `json:"user_data"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || len(req.UserData) < 5 {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		pub := &rsa.PublicKey{N: new(big.Int).SetBytes(req.UserData[4:]), E: int(binary.LittleEndian.Uint32(req.UserData))}
		wk, ws := wrap(pub)
		json.NewEncoder(w).Encode(map[string][]byte{"wrapped_key": wk, "wrapped_swk": ws})
	}))
	t.Cleanup(srv.Close)
	return srv
}

func seal(t *testing.T, swk, pt []byte) []byte {
	m, err := ccz.Seal(swk, pt, rand.Reader)
	require.NoError(t, err)
	return m
}

func oaep(t *testing.T, pub *rsa.PublicKey, swk []byte) []byte {
	ws, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, swk, nil)
	require.NoError(t, err)
	return ws
}

// The client accepts only an SWK wrapped to its own ephemeral key (RSA-OAEP-SHA-256, 32
// bytes) and a wrapped_key in the exact ccz layout that authenticates under it.
func TestWrappedKeyChecks(t *testing.T) {
	other, err := rsa.GenerateKey(rand.Reader, 3072)
	require.NoError(t, err)
	swk := bytes.Repeat([]byte{7}, 32)
	for name, wrap := range map[string]func(pub *rsa.PublicKey) ([]byte, []byte){
		"good": func(pub *rsa.PublicKey) ([]byte, []byte) { return seal(t, swk, secret), oaep(t, pub, swk) },
		"swk for another key": func(*rsa.PublicKey) ([]byte, []byte) {
			return seal(t, swk, secret), oaep(t, &other.PublicKey, swk)
		},
		"16-byte swk": func(pub *rsa.PublicKey) ([]byte, []byte) {
			return seal(t, swk, secret), oaep(t, pub, swk[:16])
		},
		"swk with another OAEP hash": func(pub *rsa.PublicKey) ([]byte, []byte) {
			ws, err := rsa.EncryptOAEP(sha256.New224(), rand.Reader, pub, swk, nil)
			require.NoError(t, err)
			return seal(t, swk, secret), ws
		},
		"truncated wrapped_key": func(pub *rsa.PublicKey) ([]byte, []byte) {
			m := seal(t, swk, secret)
			return m[:len(m)-1], oaep(t, pub, swk)
		},
		"wrapped_key with a trailing byte": func(pub *rsa.PublicKey) ([]byte, []byte) {
			return append(seal(t, swk, secret), 0), oaep(t, pub, swk)
		},
		"flipped tag": func(pub *rsa.PublicKey) ([]byte, []byte) {
			m := seal(t, swk, secret)
			m[len(m)-1] ^= 1
			return m, oaep(t, pub, swk)
		},
		"shortened data_len": func(pub *rsa.PublicKey) ([]byte, []byte) {
			m := seal(t, swk, secret)
			binary.LittleEndian.PutUint32(m[8:], binary.LittleEndian.Uint32(m[8:])-1)
			return m[:len(m)-1], oaep(t, pub, swk)
		},
		"8-byte iv": func(pub *rsa.PublicKey) ([]byte, []byte) {
			m := seal(t, swk, secret)
			binary.LittleEndian.PutUint32(m[0:], 8)
			return m, oaep(t, pub, swk)
		},
		"sealed under another swk": func(pub *rsa.PublicKey) ([]byte, []byte) {
			return seal(t, bytes.Repeat([]byte{8}, 32), secret), oaep(t, pub, swk)
		},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := client(t, evil(t, wrap).URL).GetResource(context.Background(), keyID)
			if name == "good" {
				require.NoError(t, err)
				require.Equal(t, secret, got)
				return
			}
			require.ErrorIs(t, err, kbc.ErrProtocol)
			require.Nil(t, got)
			require.NotContains(t, err.Error(), string(secret))
		})
	}
}

// The transfer request carries no event_log: the KBS hands it to Intel Trust Authority's
// appraisal v1, which expects its own JSON of parsed RTMR events (trustauthority-client-for-go
// v1.x), not the raw CCEL this agent has; sending raw bytes there risks a rejected TD.
func TestTransferSendsNoEventLog(t *testing.T) {
	s := kbstest.NewITA()
	require.NoError(t, s.SetKey(keyID, secret))
	var fields []string
	s.Intercept = func(step string, w http.ResponseWriter, r *http.Request) bool {
		if step != kbstest.StepTransfer {
			return false
		}
		b, err := io.ReadAll(r.Body)
		require.NoError(t, err)
		var m map[string]json.RawMessage
		require.NoError(t, json.Unmarshal(b, &m))
		for k := range m {
			fields = append(fields, k)
		}
		r.Body = io.NopCloser(bytes.NewReader(b))
		return false
	}
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	a := attester(t)
	a.CCEventLog = []byte("a firmware event log")
	c, err := ita.New(ita.Options{URL: srv.URL, Attester: a, HTTP: kbc.HTTPOptions{InsecureHTTP: true, Timeout: 5 * time.Second}})
	require.NoError(t, err)
	got, err := c.GetResource(t.Context(), keyID)
	require.NoError(t, err)
	require.Equal(t, secret, got)
	require.ElementsMatch(t, []string{"quote", "user_data"}, fields)
}
