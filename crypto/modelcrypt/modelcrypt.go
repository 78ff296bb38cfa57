// Package modelcrypt implements the cai-agent encrypted model format (SPEC.md, version 1) and
// its streaming, parallel encryptor and decryptor.
//
// An encrypted model is a directory (or any Source) of objects: the header object HeaderObject,
// which holds a public key hint and a plaintext JSON manifest authenticated under the model key,
// and one object per shard. Every file of the model is cut into shards (ShardSize bytes each,
// the last one shorter) and every shard into chunks (ChunkSize bytes each, the last one
// shorter); every chunk is sealed on its own with AES-256-GCM under a per-shard subkey derived
// with HKDF-SHA-256 from the 256-bit model key, a random per-model salt and the shard's exact
// position, with a counter nonce that carries a STREAM final-chunk flag. So decryption streams
// in constant memory, runs shards in parallel, and detects truncation, reordering, duplication,
// swapping and renaming. A key commitment in the header tells a wrong key apart from tampering.
//
// Typical use (decryption):
//
//	m, err := modelcrypt.Open(ctx, src)   // public header and manifest; no key yet
//	err = m.Unlock(key)                   // ErrWrongKey, or ErrCorrupt when tampered
//	stats, err := m.Decrypt(ctx, src, sink, modelcrypt.DecryptOptions{})
//
// Errors: ErrWrongKey, ErrCorrupt (always a *CorruptError naming the file, object and chunk),
// ErrUnsupportedVersion and ErrNotModel. Key material never appears in an error.
package modelcrypt

import (
	"errors"
	"fmt"
	"strconv"
)

// KeySize is the size of a model key: AES-256.
const KeySize = 32

// Version is the format version this package writes and the only one it reads.
const Version = 1

// HeaderObject is the name of the header+manifest object inside an encrypted model.
const HeaderObject = "model.cai"

// Kinds of model recorded in the manifest.
const (
	KindFiles  = "files"  // a plain directory tree (e.g. Hugging Face safetensors)
	KindOllama = "ollama" // an Ollama store subset: manifests/... and blobs/sha256-...
)

// Defaults and limits. All lengths read from untrusted input are bounded by these.
const (
	DefaultChunkSize  = 1 << 20 // 1 MiB: see SPEC.md §7 and the benchmarks
	DefaultShardSize  = 2 << 30 // 2 GiB
	MinChunkSize      = 64
	MaxChunkSize      = 16 << 20
	MaxManifestSize   = 16 << 20 // bytes of manifest JSON
	MaxKeyHintSize    = 2048
	MaxFileSize       = 1 << 50 // 1 PiB; keeps every size exact in JSON (< 2^53)
	MaxChunksPerShard = 1<<32 - 1
	MaxPathSize       = 4096
	MaxObjectNameSize = 64
)

var (
	// ErrWrongKey means the key does not open this model (key commitment mismatch).
	ErrWrongKey = errors.New("modelcrypt: wrong key")
	// ErrCorrupt means the model was tampered with, truncated, reordered, duplicated,
	// swapped or damaged. Errors wrapping it are *CorruptError values.
	ErrCorrupt = errors.New("modelcrypt: corrupt encrypted model")
	// ErrUnsupportedVersion means the header names a format version this reader does not know.
	ErrUnsupportedVersion = errors.New("modelcrypt: unsupported format version")
	// ErrNotModel means the input is not a cai-agent encrypted model at all (no header object
	// or wrong magic), so a caller may try another format.
	ErrNotModel = errors.New("modelcrypt: not a cai-agent encrypted model")
	// ErrLocked is returned by operations that need the key before Unlock succeeded.
	ErrLocked = errors.New("modelcrypt: model is locked (call Unlock first)")
	// ErrInvalidOptions means encryption options are outside the format's limits (chunk and
	// shard sizes, key hint): the caller's mistake, nothing was written.
	ErrInvalidOptions = errors.New("modelcrypt: invalid options")
)

// CorruptError describes where corruption was detected. errors.Is(err, ErrCorrupt) holds.
// File is the path inside the model ("" for the header), Object the encrypted object name,
// Chunk the chunk index inside the object (-1 when not about one chunk).
type CorruptError struct {
	File   string
	Object string
	Chunk  int64
	Reason string
}

func (e *CorruptError) Error() string {
	msg := "modelcrypt: corrupt encrypted model"
	if e.File != "" {
		msg += ": file " + strconv.Quote(e.File)
	}
	if e.Object != "" {
		msg += ": object " + strconv.Quote(e.Object)
	}
	if e.Chunk >= 0 {
		msg += ": chunk " + strconv.FormatInt(e.Chunk, 10)
	}
	return msg + ": " + e.Reason
}

// Is reports target == ErrCorrupt.
func (e *CorruptError) Is(target error) bool { return target == ErrCorrupt }

func headerCorrupt(format string, args ...any) error {
	return &CorruptError{Object: HeaderObject, Chunk: -1, Reason: fmt.Sprintf(format, args...)}
}
