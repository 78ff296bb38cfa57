// Package tinyllama writes a tiny llama model in GGUF v3: random weights (gibberish output),
// 469,088 bytes, that real Ollama servers (llama.cpp runner) load and generate from in
// milliseconds. It exists for demos and end-to-end tests of the model pipeline.
//
// The model: vocabulary 320 (SentencePiece "llama" tokenizer with byte fallback),
// context 512, embedding 64, 2 blocks, feed-forward 128, 4 heads (2 KV heads), RoPE
// dimension 16; every tensor F32. Norm weights are 1; the other weights are N(0, 0.02) from
// math/rand/v2's PCG(1, 0x9e3779b97f4a7c15), in tensor order. The output rows of every
// token that is not a NORMAL piece are zero, so greedy decoding never emits EOS or a byte
// token and generation never stops by itself: always bound it (num_predict; Params does).
//
// The output is deterministic and byte-identical to the reference tiny-llama.gguf of the
// project notes (general.name "cai-tiny-llama", NORMAL piece scores -1, -2, …): its SHA-256
// is SHA256.
package tinyllama

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"math"
	"math/rand/v2"
)

// SHA256 is the hex SHA-256 of the GGUF file Write produces.
const SHA256 = "a0da49360c5de95118149e4f21df967d6e9cbe2375eefca955d339a6a363f930"

// Size is the length of the GGUF file in bytes.
const Size = 469088

// Template and Params are the Ollama template and params layers used with the model in
// demos and tests: the prompt verbatim, a small context, one thread, greedy, 16 tokens.
const (
	Template = "{{ .Prompt }}"
	Params   = `{"num_ctx":256,"num_predict":16,"num_thread":1,"temperature":0}`
)

// Model dimensions.
const (
	Vocab     = 320
	Context   = 512
	Embedding = 64
	Blocks    = 2
	FFN       = 128
	Heads     = 4
	KVHeads   = 2
	RopeDim   = 16
	alignment = 32
)

// GGUF metadata value types.
const (
	tUint32  = 4
	tInt32   = 5
	tFloat32 = 6
	tBool    = 7
	tString  = 8
	tArray   = 9
)

// token types (llama.cpp)
const (
	typeNormal  = 1
	typeUnknown = 2
	typeControl = 3
	typeByte    = 6
)

// Vocabulary returns the tokens, their scores and their types.
func Vocabulary() (tokens []string, scores []float32, types []int32) {
	add := func(t string, s float32, ty int32) {
		tokens, scores, types = append(tokens, t), append(scores, s), append(types, ty)
	}
	add("<unk>", 0, typeUnknown)
	add("<s>", 0, typeControl)
	add("</s>", 0, typeControl)
	for b := 0; b < 256; b++ {
		add(byteToken(b), 0, typeByte)
	}
	seen := map[string]bool{}
	normal := []string{"\u2581", "\u2581the", "\u2581a", "\u2581hello", "\u2581world", "\u2581is", "\u2581of", "\u2581and", "\u2581to", "\u2581in"}
	for c := 'a'; c <= 'z'; c++ {
		normal = append(normal, string(c), "\u2581"+string(c))
	}
	rank := 1
	for _, t := range normal {
		if seen[t] {
			continue
		}
		seen[t] = true
		add(t, -float32(rank), typeNormal) // rank is 1-based
		rank++
	}
	return tokens, scores, types
}

func byteToken(b int) string {
	const hexd = "0123456789ABCDEF"
	return "<0x" + string(hexd[b>>4]) + string(hexd[b&15]) + ">"
}

type tensor struct {
	name string
	ne   []uint64
	norm bool
}

func tensors() []tensor {
	ts := []tensor{
		{"token_embd.weight", []uint64{Embedding, Vocab}, false},
		{"output_norm.weight", []uint64{Embedding}, true},
		{"output.weight", []uint64{Embedding, Vocab}, false},
	}
	kv := uint64(Embedding / Heads * KVHeads)
	for i := 0; i < Blocks; i++ {
		p := "blk." + string(rune('0'+i)) + "."
		ts = append(ts,
			tensor{p + "attn_norm.weight", []uint64{Embedding}, true},
			tensor{p + "attn_q.weight", []uint64{Embedding, Embedding}, false},
			tensor{p + "attn_k.weight", []uint64{Embedding, kv}, false},
			tensor{p + "attn_v.weight", []uint64{Embedding, kv}, false},
			tensor{p + "attn_output.weight", []uint64{Embedding, Embedding}, false},
			tensor{p + "ffn_norm.weight", []uint64{Embedding}, true},
			tensor{p + "ffn_gate.weight", []uint64{Embedding, FFN}, false},
			tensor{p + "ffn_up.weight", []uint64{Embedding, FFN}, false},
			tensor{p + "ffn_down.weight", []uint64{FFN, Embedding}, false},
		)
	}
	return ts
}

func (t tensor) elems() uint64 {
	n := uint64(1)
	for _, d := range t.ne {
		n *= d
	}
	return n
}

type enc struct {
	w   *bufio.Writer
	n   int64
	err error
}

func (e *enc) write(b []byte) {
	if e.err == nil {
		_, e.err = e.w.Write(b)
		e.n += int64(len(b))
	}
}
func (e *enc) u32(v uint32)  { e.write(binary.LittleEndian.AppendUint32(nil, v)) }
func (e *enc) u64(v uint64)  { e.write(binary.LittleEndian.AppendUint64(nil, v)) }
func (e *enc) f32(v float32) { e.u32(math.Float32bits(v)) }
func (e *enc) str(s string)  { e.u64(uint64(len(s))); e.write([]byte(s)) }
func (e *enc) pad() {
	if r := e.n % alignment; r != 0 {
		e.write(make([]byte, alignment-r))
	}
}

func (e *enc) key(k string, typ uint32) { e.str(k); e.u32(typ) }

// Write writes the GGUF file to w.
func Write(w io.Writer) error {
	e := &enc{w: bufio.NewWriterSize(w, 1<<16)}
	ts := tensors()
	tokens, scores, types := Vocabulary()

	e.write([]byte("GGUF"))
	e.u32(3)
	e.u64(uint64(len(ts)))
	e.u64(23)
	kstr := func(k, v string) { e.key(k, tString); e.str(v) }
	ku32 := func(k string, v uint32) { e.key(k, tUint32); e.u32(v) }
	kf32 := func(k string, v float32) { e.key(k, tFloat32); e.f32(v) }
	kbool := func(k string, v bool) {
		e.key(k, tBool)
		if v {
			e.write([]byte{1})
		} else {
			e.write([]byte{0})
		}
	}
	kstr("general.architecture", "llama")
	kstr("general.name", modelName)
	ku32("general.file_type", 0)
	ku32("general.alignment", alignment)
	ku32("llama.vocab_size", Vocab)
	ku32("llama.context_length", Context)
	ku32("llama.embedding_length", Embedding)
	ku32("llama.block_count", Blocks)
	ku32("llama.feed_forward_length", FFN)
	ku32("llama.attention.head_count", Heads)
	ku32("llama.attention.head_count_kv", KVHeads)
	kf32("llama.attention.layer_norm_rms_epsilon", 1e-5)
	ku32("llama.rope.dimension_count", RopeDim)
	kf32("llama.rope.freq_base", 10000)
	kstr("tokenizer.ggml.model", "llama")
	e.key("tokenizer.ggml.tokens", tArray)
	e.u32(tString)
	e.u64(uint64(len(tokens)))
	for _, t := range tokens {
		e.str(t)
	}
	e.key("tokenizer.ggml.scores", tArray)
	e.u32(tFloat32)
	e.u64(uint64(len(scores)))
	for _, s := range scores {
		e.f32(s)
	}
	e.key("tokenizer.ggml.token_type", tArray)
	e.u32(tInt32)
	e.u64(uint64(len(types)))
	for _, t := range types {
		e.u32(uint32(t))
	}
	ku32("tokenizer.ggml.unknown_token_id", 0)
	ku32("tokenizer.ggml.bos_token_id", 1)
	ku32("tokenizer.ggml.eos_token_id", 2)
	kbool("tokenizer.ggml.add_bos_token", true)
	kbool("tokenizer.ggml.add_eos_token", false)

	var off uint64
	for _, t := range ts {
		e.str(t.name)
		e.u32(uint32(len(t.ne)))
		for _, d := range t.ne {
			e.u64(d)
		}
		e.u32(0) // F32
		e.u64(off)
		off += t.elems() * 4
		off = (off + alignment - 1) / alignment * alignment
	}
	e.pad()

	rng := rand.New(rand.NewPCG(1, 0x9e3779b97f4a7c15))
	for _, t := range ts {
		n := t.elems()
		for i := uint64(0); i < n; i++ {
			var v float32
			if t.norm {
				v = 1
			} else {
				v = float32(rng.NormFloat64() * 0.02)
				if t.name == "output.weight" && types[i/Embedding] != typeNormal {
					v = 0
				}
			}
			e.f32(v)
		}
		e.pad()
	}
	if e.err != nil {
		return e.err
	}
	return e.w.Flush()
}

const modelName = "cai-tiny-llama"

// Bytes returns the GGUF file.
func Bytes() ([]byte, error) {
	var b bytes.Buffer
	b.Grow(Size)
	if err := Write(&b); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}
