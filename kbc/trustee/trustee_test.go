package trustee

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"strings"
	"testing"

	"github.com/go-jose/go-jose/v4"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/kbc"
)

// generatorKey is the P-256 key whose public point is the generator (private scalar 1).
func generatorKey(t *testing.T) *teeKey {
	d := make([]byte, 32)
	d[31] = 1
	priv, err := ecdsa.ParseRawPrivateKey(elliptic.P256(), d)
	require.NoError(t, err)
	k, err := ecKey(priv)
	require.NoError(t, err)
	return k
}

// The vector of ../shared/notes/kbs.md §6: nonce = 32 zero bytes, key = the P-256 generator.
func TestReportDataVector(t *testing.T) {
	k := generatorKey(t)
	require.Equal(t, map[string]string{"alg": "ECDH-ES+A256KW", "crv": "P-256", "kty": "EC",
		"x": "axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY", "y": "T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU"}, k.jwk)
	nonce := "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
	pre, err := evidence.CanonicalJSON(map[string]any{"additional-evidence": "", "nonce": nonce, "tee-pubkey": k.jwk})
	require.NoError(t, err)
	require.Equal(t, `{"additional-evidence":"","nonce":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"axfR8uEsQkf4vOblY6RA8ncDfYEt6zOg9KE5RdiYwpY","y":"T-NC4v4af5uO5-tKfA-eFivOM1drMV7Oy7ZAaDe_UfU"}}`, string(pre))
	rd, err := ReportData(SHA384, nonce, k.jwk, "")
	require.NoError(t, err)
	require.Equal(t, "bc18735746472713c97d2b881e0a178e1b09bb652fd2a3d5e7945e756c7f14496d7cc1a29bf74a6b3bfe248691e5f3b4"+strings.Repeat("00", 16), hex.EncodeToString(rd[:]))

	// sha512 fills all 64 bytes; sha256 leaves 32 zero bytes.
	rd512, err := ReportData("SHA512", nonce, k.jwk, "")
	require.NoError(t, err)
	require.NotEqual(t, make([]byte, 16), rd512[48:])
	rd256, err := ReportData(SHA256, nonce, k.jwk, "")
	require.NoError(t, err)
	require.Equal(t, make([]byte, 32), rd256[32:])
	_, err = ReportData("sm3", nonce, k.jwk, "")
	require.ErrorIs(t, err, kbc.ErrProtocol)
}

func TestRSAJWKMembers(t *testing.T) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048) // size irrelevant to the encoding
	require.NoError(t, err)
	k := rsaKey(priv)
	require.Len(t, k.jwk, 4)
	require.Equal(t, "AQAB", k.jwk["e"])
	require.Equal(t, "RSA", k.jwk["kty"])
	require.Equal(t, "RSA-OAEP-256", k.jwk["alg"])
	n, err := base64.RawURLEncoding.DecodeString(k.jwk["n"])
	require.NoError(t, err)
	require.Equal(t, priv.N.Bytes(), n)
	pre, err := evidence.CanonicalJSON(map[string]any{"tee-pubkey": k.jwk})
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(string(pre), `{"tee-pubkey":{"alg":"RSA-OAEP-256","e":"AQAB","kty":"RSA","n":"`))
}

func TestSelectedHash(t *testing.T) {
	for in, want := range map[string]string{
		`""`: SHA384, `null`: SHA384, `{}`: SHA384, `{"other":1}`: SHA384,
		`{"selected-hash-algorithm":"SHA512"}`: SHA512, `{"selected-hash-algorithm":"sha256"}`: SHA256,
	} {
		got, err := selectedHash(json.RawMessage(in))
		require.NoError(t, err, in)
		require.Equal(t, want, got, in)
	}
	_, err := selectedHash(json.RawMessage(`{"selected-hash-algorithm":"sm3"}`))
	require.ErrorIs(t, err, kbc.ErrProtocol)
	_, err = selectedHash(json.RawMessage(`{"selected-hash-algorithm":5}`))
	require.ErrorIs(t, err, kbc.ErrProtocol)
}

// goJoseJWE encrypts with go-jose itself, flattened JSON serialization.
func goJoseJWE(t *testing.T, alg jose.KeyAlgorithm, pub any, pt []byte) string {
	enc, err := jose.NewEncrypter(jose.A256GCM, jose.Recipient{Algorithm: alg, Key: pub}, nil)
	require.NoError(t, err)
	obj, err := enc.Encrypt(pt)
	require.NoError(t, err)
	return obj.FullSerialize()
}

func TestDecryptGoJoseJWEs(t *testing.T) {
	ec, err := newTEEKey(AlgECDHES)
	require.NoError(t, err)
	rk, err := rsa.GenerateKey(rand.Reader, RSABits)
	require.NoError(t, err)
	rsaK := rsaKey(rk)
	for _, tc := range []struct {
		k   *teeKey
		alg jose.KeyAlgorithm
		pub any
	}{
		{ec, jose.ECDH_ES_A256KW, &ec.priv.(*ecdsa.PrivateKey).PublicKey},
		{rsaK, jose.RSA_OAEP_256, &rk.PublicKey},
	} {
		t.Run(string(tc.alg), func(t *testing.T) {
			secret := []byte("model key: 0123456789abcdef0123456789abcdef")
			s := goJoseJWE(t, tc.alg, tc.pub, secret)
			got, err := tc.k.Decrypt([]byte(s))
			require.NoError(t, err)
			require.Equal(t, secret, got)

			// The AAD is the received protected string: an equivalent header with other
			// bytes (whitespace) no longer authenticates.
			var m map[string]any
			require.NoError(t, json.Unmarshal([]byte(s), &m))
			hdr, _ := base64.RawURLEncoding.DecodeString(m["protected"].(string))
			m["protected"] = base64.RawURLEncoding.EncodeToString(append([]byte(" "), hdr...))
			b, _ := json.Marshal(m)
			_, err = tc.k.Decrypt(b)
			require.ErrorIs(t, err, kbc.ErrProtocol)

			// Padded base64 is not the canonical protected string.
			require.NoError(t, json.Unmarshal([]byte(s), &m))
			m["tag"] = base64.URLEncoding.EncodeToString(mustB64(t, m["tag"].(string)))
			b, _ = json.Marshal(m)
			_, err = tc.k.Decrypt(b)
			require.ErrorIs(t, err, kbc.ErrProtocol)

			// Compact serialization, unknown members, and a key for another recipient.
			compactEnc, _ := jose.NewEncrypter(jose.A256GCM, jose.Recipient{Algorithm: tc.alg, Key: tc.pub}, nil)
			obj, _ := compactEnc.Encrypt(secret)
			cs, _ := obj.CompactSerialize()
			_, err = tc.k.Decrypt([]byte(cs))
			require.ErrorIs(t, err, kbc.ErrProtocol)
			require.NoError(t, json.Unmarshal([]byte(s), &m))
			m["aad"] = "eA"
			b, _ = json.Marshal(m)
			_, err = tc.k.Decrypt(b)
			require.ErrorIs(t, err, kbc.ErrProtocol)
			other, err := newTEEKey(AlgECDHES)
			require.NoError(t, err)
			_, err = other.Decrypt([]byte(s))
			require.ErrorIs(t, err, kbc.ErrProtocol)
		})
	}
}

func mustB64(t *testing.T, s string) []byte {
	b, err := base64.RawURLEncoding.DecodeString(s)
	require.NoError(t, err)
	return b
}

// Algorithms outside the allow-list are refused even when the key could decrypt them.
func TestDecryptAlgorithmAllowList(t *testing.T) {
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	k := rsaKey(rk)
	for _, alg := range []jose.KeyAlgorithm{jose.RSA1_5, jose.RSA_OAEP} {
		s := goJoseJWE(t, alg, &rk.PublicKey, []byte("x"))
		_, err := k.Decrypt([]byte(s))
		require.ErrorIs(t, err, kbc.ErrProtocol, alg)
	}
	enc, err := jose.NewEncrypter(jose.A128GCM, jose.Recipient{Algorithm: jose.RSA_OAEP_256, Key: &rk.PublicKey}, nil)
	require.NoError(t, err)
	obj, err := enc.Encrypt([]byte("x"))
	require.NoError(t, err)
	_, err = k.Decrypt([]byte(obj.FullSerialize()))
	require.ErrorIs(t, err, kbc.ErrProtocol)
}

func TestNewRefusesBadConfig(t *testing.T) {
	_, err := New(Options{URL: "https://kbs"})
	require.ErrorIs(t, err, kbc.ErrConfig)
	a := fakeAttester{}
	_, err = New(Options{URL: "http://kbs", Attester: a})
	require.ErrorIs(t, err, kbc.ErrConfig)
	_, err = New(Options{URL: "ftp://kbs", Attester: a})
	require.ErrorIs(t, err, kbc.ErrConfig)
	_, err = New(Options{URL: "https://kbs", Attester: a, KeyAlgorithm: "RSA1_5"})
	require.ErrorIs(t, err, kbc.ErrConfig)
	_, err = New(Options{URL: "http://kbs", Attester: a, HTTP: kbc.HTTPOptions{InsecureHTTP: true}})
	require.NoError(t, err)
	c, err := New(Options{URL: "https://kbs", Attester: a})
	require.NoError(t, err)
	for _, bad := range []string{"kbs:///a/b", "kbs:///a/b/c/d", "kbs:///a/../c", "kbs+plugin:///a/b/c", "https://x/a/b/c", "kbs:///a/b/c?x=1", "kbs:///a/b%2Fc/d"} {
		_, err := c.GetResource(t.Context(), bad)
		require.ErrorIs(t, err, kbc.ErrInvalidURI, bad)
	}
}

type fakeAttester struct{ evidence.Attester }

func (fakeAttester) TEE() string { return "sample" }

// encoding/json matches member names case-insensitively, go-jose's parser does not: a member
// "Protected" beside "protected" would make the checks here look at one header while go-jose
// decrypts under the other. Such a body (and any member name that is not exactly one of the
// five) is refused.
func TestDecryptMemberNamesExact(t *testing.T) {
	k, err := newTEEKey(AlgECDHES)
	require.NoError(t, err)
	pub := &k.priv.(*ecdsa.PrivateKey).PublicKey
	zipped, err := jose.NewEncrypter(jose.A256GCM, jose.Recipient{Algorithm: jose.ECDH_ES_A256KW, Key: pub},
		(&jose.EncrypterOptions{Compression: jose.DEFLATE}))
	require.NoError(t, err)
	obj, err := zipped.Encrypt([]byte("secret"))
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal([]byte(obj.FullSerialize()), &m))
	_, err = k.Decrypt([]byte(obj.FullSerialize()))
	require.ErrorIs(t, err, kbc.ErrProtocol, "zip is refused")

	var clean map[string]any
	require.NoError(t, json.Unmarshal([]byte(goJoseJWE(t, jose.ECDH_ES_A256KW, pub, []byte("x"))), &clean))
	b, err := json.Marshal(m)
	require.NoError(t, err)
	// Append "Protected" (capital P) after the real member.
	body := strings.TrimSuffix(string(b), "}") + `,"Protected":"` + clean["protected"].(string) + `"}`
	_, err = k.Decrypt([]byte(body))
	require.ErrorIs(t, err, kbc.ErrProtocol, "a case variant of a member is refused")

	body = strings.Replace(string(b), `"tag"`, `"TAG"`, 1)
	_, err = k.Decrypt([]byte(body))
	require.ErrorIs(t, err, kbc.ErrProtocol)
}

// A broker URL's user info, query and fragment may be secret: errors never repeat them.
func TestBrokerURLSecretsNotInErrors(t *testing.T) {
	for _, u := range []string{
		"https://admin:Pa55w0rd@kbs.example:8080",
		"https://kbs.example/?sig=s3cr3t",
		"https://kbs.example/#s3cr3t",
		"ftp://admin:Pa55w0rd@kbs.example",
		"http://admin:Pa55w0rd@kbs.example",
		"https://admin:Pa55w0rd@[::1", // does not parse
	} {
		_, err := New(Options{URL: u, Attester: fakeAttester{}})
		require.ErrorIs(t, err, kbc.ErrConfig, u)
		require.NotContains(t, err.Error(), "Pa55w0rd", u)
		require.NotContains(t, err.Error(), "s3cr3t", u)
	}
}
