package tinyllama

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"math"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestDeterministicAndStructure(t *testing.T) {
	b, err := Bytes()
	require.NoError(t, err)
	require.Len(t, b, Size)
	sum := sha256.Sum256(b)
	require.Equal(t, SHA256, hex.EncodeToString(sum[:]))
	b2, err := Bytes()
	require.NoError(t, err)
	require.Equal(t, b, b2)

	require.Equal(t, "GGUF", string(b[:4]))
	require.EqualValues(t, 3, binary.LittleEndian.Uint32(b[4:]))
	require.EqualValues(t, 21, binary.LittleEndian.Uint64(b[8:]))
	require.EqualValues(t, 23, binary.LittleEndian.Uint64(b[16:]))
	// The data section is the last 460,032 bytes; the first tensor (token_embd) starts it,
	// the second (output_norm, all 1.0) follows 64*320*4 bytes later.
	data := b[len(b)-460032:]
	norm := data[64*320*4 : 64*320*4+256]
	for i := 0; i < 64; i++ {
		require.Equal(t, float32(1), math.Float32frombits(binary.LittleEndian.Uint32(norm[4*i:])))
	}
	// output.weight: rows of non-NORMAL tokens (0..258) are zero, NORMAL rows are not.
	out := data[64*320*4+256:]
	for _, v := range out[:259*64*4] {
		require.Zero(t, v)
	}
	require.NotEqual(t, make([]byte, 256), out[259*64*4:260*64*4])
}

func TestVocabulary(t *testing.T) {
	tokens, scores, types := Vocabulary()
	require.Len(t, tokens, Vocab)
	require.Len(t, scores, Vocab)
	require.Len(t, types, Vocab)
	seen := map[string]bool{}
	for _, tok := range tokens {
		require.False(t, seen[tok], "duplicate token %q (llama.cpp aborts on duplicates)", tok)
		seen[tok] = true
	}
	require.Equal(t, "<0x00>", tokens[3])
	require.Equal(t, "<0xFF>", tokens[258])
	require.EqualValues(t, typeByte, types[258])
	require.Equal(t, "\u2581", tokens[259])
	require.EqualValues(t, typeNormal, types[319])
	require.Equal(t, float32(-1), scores[259])
	require.Equal(t, float32(-61), scores[319])
	require.Zero(t, scores[0])
}
