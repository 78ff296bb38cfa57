package trustee

import (
	"crypto/ecdsa"
	"testing"

	"github.com/go-jose/go-jose/v4"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/kbc"
)

// FuzzDecrypt: arbitrary resource bodies never panic and never decrypt unless they are a
// valid JWE for the key; every failure is ErrProtocol.
func FuzzDecrypt(f *testing.F) {
	k, err := newTEEKey(AlgECDHES)
	require.NoError(f, err)
	enc, err := jose.NewEncrypter(jose.A256GCM, jose.Recipient{Algorithm: jose.ECDH_ES_A256KW, Key: &k.priv.(*ecdsa.PrivateKey).PublicKey}, nil)
	require.NoError(f, err)
	obj, err := enc.Encrypt([]byte("secret"))
	require.NoError(f, err)
	f.Add([]byte(obj.FullSerialize()))
	f.Add([]byte(`{"protected":"e30","encrypted_key":"AA","iv":"AA","ciphertext":"","tag":"AA"}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		pt, err := k.Decrypt(b)
		if err != nil {
			require.ErrorIs(t, err, kbc.ErrProtocol)
			require.Nil(t, pt)
		}
	})
}

// FuzzParseResourceURI: accepted URIs round-trip to their canonical form.
func FuzzParseResourceURI(f *testing.F) {
	for _, s := range []string{"kbs:///a/b/c", "kbs://h:1/a/b/c", "kbs:///a/../c", "kbs:///a/b%2F/c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		rp, err := kbc.ParseResourceURI(s)
		if err != nil {
			require.ErrorIs(t, err, kbc.ErrInvalidURI)
			return
		}
		again, err := kbc.ParseResourceURI(rp.String())
		require.NoError(t, err)
		require.Equal(t, rp, again)
	})
}
