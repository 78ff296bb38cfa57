package modelcrypt

import (
	"context"
	"crypto/sha256"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRoundTrip(t *testing.T) {
	const chunk = 256
	cases := map[string]map[string][]byte{
		"empty file":        {"empty": nil},
		"one byte":          {"one": {0x42}},
		"chunk minus one":   {"f": pattern(1, chunk-1)},
		"exact chunk":       {"f": pattern(2, chunk)},
		"chunk plus one":    {"f": pattern(3, chunk+1)},
		"exact shard":       {"f": pattern(4, 4*chunk)},
		"shard plus one":    {"f": pattern(5, 4*chunk+1)},
		"several shards":    {"f": pattern(6, 11*chunk+17)},
		"exact multi-shard": {"f": pattern(7, 12*chunk)},
		"nested and many": {
			"a/b/c.bin": pattern(8, 3000), "a/d.txt": []byte("hello"), "z": nil,
			"blobs/sha256-00": pattern(9, 1), "manifests/x/y/z/latest": []byte("{}"),
			"a/b/e": pattern(10, 2*chunk), "unicodé/名前": pattern(11, 700),
		},
	}
	for name, files := range cases {
		t.Run(name, func(t *testing.T) {
			for _, verify := range []bool{false, true} {
				dir, man := encryptTo(t, testKey(1), files, EncryptOptions{ChunkSize: chunk, ShardSize: 4 * chunk, KeyHint: "kbs:///r/t/x"})
				require.Len(t, man.Files, len(files))
				sink, st, err := decryptDir(t, dir, testKey(1), DecryptOptions{VerifyDigests: verify, Workers: 3})
				require.NoError(t, err)
				assert.Equal(t, len(files), st.Files)
				var total int64
				for p, want := range files {
					f := sink.files[p]
					require.NotNil(t, f, p)
					assert.True(t, f.closed, p)
					assert.Equal(t, len(want), len(f.data))
					assert.Equal(t, sha256.Sum256(want), sha256.Sum256(f.data), p)
					total += int64(len(want))
				}
				assert.Equal(t, total, st.Bytes)
				for _, mf := range man.Files {
					assert.Equal(t, sha256.Sum256(files[mf.Path]), mf.SHA256)
				}
			}
		})
	}
}

func TestWrongKey(t *testing.T) {
	dir, _ := encryptTo(t, testKey(1), map[string][]byte{"f": pattern(1, 1000)}, EncryptOptions{ChunkSize: 64})
	m, err := Open(context.Background(), DirSource(dir))
	require.NoError(t, err)
	err = m.Unlock(testKey(2))
	require.ErrorIs(t, err, ErrWrongKey)
	require.False(t, errors.Is(err, ErrCorrupt))
	require.ErrorIs(t, m.Unlock(testKey(1)[:16]), ErrWrongKey)
	_, err = m.Decrypt(context.Background(), DirSource(dir), newMemSink(), DecryptOptions{})
	require.ErrorIs(t, err, ErrLocked)
	require.NoError(t, m.Unlock(testKey(1)))
}

// Unlocking twice keeps one copy of the key material: the first one is wiped, and Lock
// wipes the second.
func TestUnlockTwiceWipesFirst(t *testing.T) {
	dir, _ := encryptTo(t, testKey(1), map[string][]byte{"f": pattern(1, 1000)}, EncryptOptions{ChunkSize: 64})
	m, err := Open(context.Background(), DirSource(dir))
	require.NoError(t, err)
	require.NoError(t, m.Unlock(testKey(1)))
	first := m.ks.prk
	require.NoError(t, m.Unlock(testKey(1)))
	second := m.ks.prk
	require.Equal(t, make([]byte, len(first)), first, "the first key material is wiped")
	require.NotEqual(t, make([]byte, len(second)), second)
	m.Lock()
	require.Equal(t, make([]byte, len(second)), second, "Lock wipes the second")
}
