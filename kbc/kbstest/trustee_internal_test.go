package kbstest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"math/big"
	"regexp"
	"testing"

	"github.com/go-jose/go-jose/v4"
	"github.com/stretchr/testify/require"
)

// RFC 3394 §4.6: 256-bit KEK wrapping 256 bits of key data.
func TestAESKeyWrapRFC3394(t *testing.T) {
	kek, _ := hex.DecodeString("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
	key, _ := hex.DecodeString("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
	got, err := aesKeyWrap(kek, key)
	require.NoError(t, err)
	require.Equal(t, "28c9f404c4b810f4cbccb35cfb87f8263f5786e2d80ed326cbc7f0e71a99f43bfb988b9b7a02dd21", hex.EncodeToString(got))
}

func ecJWK(k *ecdsa.PrivateKey) []byte {
	b, _ := k.PublicKey.Bytes()
	j, _ := json.Marshal(map[string]string{"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": b64u(b[1:33]), "y": b64u(b[33:])})
	return j
}

// The server's JWEs have Trustee's byte-exact protected headers and decrypt with go-jose
// directly (an implementation independent of both the server and cai-agent's client).
func TestSealJWEWireFormat(t *testing.T) {
	ek, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	rk, err := rsa.GenerateKey(rand.Reader, 3072)
	require.NoError(t, err)
	rj, _ := json.Marshal(map[string]string{"kty": "RSA", "alg": "RSA-OAEP-256", "n": b64u(rk.N.Bytes()), "e": b64u(big.NewInt(int64(rk.E)).Bytes())})
	for _, tc := range []struct {
		jwk    []byte
		priv   any
		alg    jose.KeyAlgorithm
		header *regexp.Regexp
	}{
		{ecJWK(ek), ek, jose.ECDH_ES_A256KW, regexp.MustCompile(`^\{"alg":"ECDH-ES\+A256KW","enc":"A256GCM","epk":\{"crv":"P-256","kty":"EC","x":"[A-Za-z0-9_-]{43}","y":"[A-Za-z0-9_-]{43}"\}\}$`)},
		{rj, rk, jose.RSA_OAEP_256, regexp.MustCompile(`^\{"alg":"RSA-OAEP-256","enc":"A256GCM"\}$`)},
	} {
		pt := []byte("the model key")
		body, err := SealJWEToJWK(tc.jwk, pt)
		require.NoError(t, err)
		require.Regexp(t, `^\{"protected":"[A-Za-z0-9_-]+","encrypted_key":"[A-Za-z0-9_-]+","iv":"[A-Za-z0-9_-]{16}","ciphertext":"[A-Za-z0-9_-]+","tag":"[A-Za-z0-9_-]{22}"\}$`, string(body))
		var m map[string]string
		require.NoError(t, json.Unmarshal(body, &m))
		hdr, err := base64.RawURLEncoding.DecodeString(m["protected"])
		require.NoError(t, err)
		require.Regexp(t, tc.header, string(hdr))
		if tc.alg == jose.ECDH_ES_A256KW {
			ekBytes, _ := base64.RawURLEncoding.DecodeString(m["encrypted_key"])
			require.Len(t, ekBytes, 40)
		}
		obj, err := jose.ParseEncryptedJSON(string(body), []jose.KeyAlgorithm{tc.alg}, []jose.ContentEncryption{jose.A256GCM})
		require.NoError(t, err)
		got, err := obj.Decrypt(tc.priv)
		require.NoError(t, err)
		require.Equal(t, pt, got)
	}
	_, err = SealJWEToJWK([]byte(`{"kty":"RSA","alg":"RSA1_5","n":"AQAB","e":"AQAB"}`), []byte("x"))
	require.Error(t, err)
	_, err = SealJWEToJWK([]byte(`{"kty":"oct","k":"AA"}`), []byte("x"))
	require.Error(t, err)
}

// The server re-serializes its typed view of the key: extra JWK members are dropped, missing
// ones refused.
func TestTypedPubKey(t *testing.T) {
	pk, err := parsePubKey(json.RawMessage(`{"y":"Y","x":"X","kid":"extra","use":"enc","kty":"EC","crv":"P-256","alg":"ECDH-ES+A256KW"}`))
	require.NoError(t, err)
	b, err := json.Marshal(pk.value())
	require.NoError(t, err)
	require.Equal(t, `{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"X","y":"Y"}`, string(b))
	pk, err = parsePubKey(json.RawMessage(`{"n":"N","e":"AQAB","kty":"RSA","alg":"RSA-OAEP-256","d":"secret"}`))
	require.NoError(t, err)
	b, _ = json.Marshal(pk.value())
	require.Equal(t, `{"alg":"RSA-OAEP-256","e":"AQAB","kty":"RSA","n":"N"}`, string(b))
	for _, bad := range []string{`{"kty":"EC","crv":"P-256","x":"X","y":"Y"}`, `{"kty":"RSA","n":"N","alg":"RSA-OAEP-256"}`, `{"kty":"OKP"}`, `[]`} {
		_, err := parsePubKey(json.RawMessage(bad))
		require.Error(t, err, bad)
	}
}

func TestParseUserData(t *testing.T) {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	ud := append([]byte{1, 0, 1, 0}, k.N.Bytes()...)
	_, err = parseUserData(ud)
	require.ErrorContains(t, err, "greater than 2048 bits")
	_, err = parseUserData([]byte{1, 0, 1, 0})
	require.Error(t, err)
	big := append([]byte{1, 0, 1, 0}, make([]byte, 384)...)
	big[4] = 0x80
	pub, err := parseUserData(big)
	require.NoError(t, err)
	require.Equal(t, 65537, pub.E)
	require.Equal(t, 3072, pub.N.BitLen())
}
