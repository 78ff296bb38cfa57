// Package ccz reads (and, for tests and key wrapping, writes) the encrypted file format of
// Intel's confidential-ai-loader (cc-api/confidential-huggingface-runner, crypto.py), which the
// CCZoo confidential AI reference deployments use, and the same 12-byte-header AES-GCM
// message that Intel Trust Authority KBS uses for its wrapped_key.
//
// A message is one AES-256-GCM encryption of a whole file, without associated data:
//
//	offset  size      field
//	0       4         iv_len   u32 little-endian, must be 12
//	4       4         tag_len  u32 little-endian, must be 16
//	8       4         data_len u32 little-endian = len(ciphertext) + 16 (it counts the tag)
//	12      12        iv (GCM nonce)
//	24      data_len  ciphertext, then the 16-byte GCM tag
//
// Nothing follows the tag. Open is strict where the peer's decoder is lax: it rejects any
// iv_len other than 12, tag_len other than 16, a data_len that does not equal the bytes
// remaining after the IV (so truncation and trailing bytes are errors), and short input.
//
// The format binds neither the file name nor the file set to the key (no AAD): a host can
// rename or drop files without detection, and a wrong key cannot be told apart from tampering
// (both are ErrAuth). Whole-file GCM cannot be streamed or verified before the whole message
// was read, so every message is held in memory; data_len is bounded (DefaultMaxDataLen, or
// the caller's maxDataLen), which bounds that memory.
package ccz

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Sizes of the format.
const (
	KeySize    = 32 // AES-256
	IVSize     = 12
	TagSize    = 16
	HeaderSize = 12                            // iv_len, tag_len, data_len
	Overhead   = HeaderSize + IVSize + TagSize // 40 bytes per message
)

// DefaultMaxDataLen is the default bound on data_len (ciphertext plus tag): 2³¹−1 bytes, the
// largest message the peer (Python cryptography's AESGCM, one call) can produce or decrypt.
const DefaultMaxDataLen = 1<<31 - 1

var (
	// ErrFormat means the input is not a well-formed message (bad lengths, short input,
	// trailing bytes) or, for directories, a malformed encryption-config.json or file set.
	ErrFormat = errors.New("ccz: malformed input")
	// ErrAuth means GCM authentication failed: the key is wrong or the data was tampered
	// with. The format cannot tell these apart.
	ErrAuth = errors.New("ccz: authentication failed (wrong key or tampered data)")
	// ErrTooLarge means a message exceeds the configured memory bound.
	ErrTooLarge = errors.New("ccz: message too large")
)

// Header is the parsed 12-byte length header plus the IV.
type Header struct {
	DataLen uint32 // ciphertext + tag
	IV      [IVSize]byte
}

// MessageSize is the total size of the message this header describes.
func (h Header) MessageSize() int64 { return int64(HeaderSize+IVSize) + int64(h.DataLen) }

// PlaintextSize is the size of the plaintext the message decrypts to.
func (h Header) PlaintextSize() int64 { return int64(h.DataLen) - TagSize }

// ParseHeader parses the first HeaderSize+IVSize bytes of a message. It checks the fixed
// lengths and that data_len covers at least the tag; maxDataLen (0 = DefaultMaxDataLen)
// bounds data_len (ErrTooLarge).
func ParseHeader(b []byte, maxDataLen int64) (Header, error) {
	var h Header
	if len(b) < HeaderSize+IVSize {
		return h, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header and IV", ErrFormat, len(b), HeaderSize+IVSize)
	}
	if maxDataLen <= 0 {
		maxDataLen = DefaultMaxDataLen
	}
	ivLen := binary.LittleEndian.Uint32(b[0:])
	tagLen := binary.LittleEndian.Uint32(b[4:])
	h.DataLen = binary.LittleEndian.Uint32(b[8:])
	if ivLen != IVSize {
		return h, fmt.Errorf("%w: iv_len %d, want %d", ErrFormat, ivLen, IVSize)
	}
	if tagLen != TagSize {
		return h, fmt.Errorf("%w: tag_len %d, want %d", ErrFormat, tagLen, TagSize)
	}
	if h.DataLen < TagSize {
		return h, fmt.Errorf("%w: data_len %d is shorter than the %d-byte tag", ErrFormat, h.DataLen, TagSize)
	}
	if int64(h.DataLen) > maxDataLen {
		return h, fmt.Errorf("%w: data_len %d exceeds the limit of %d bytes (whole-file GCM is decrypted in memory)",
			ErrTooLarge, h.DataLen, maxDataLen)
	}
	copy(h.IV[:], b[HeaderSize:])
	return h, nil
}

func newGCM(key []byte) (cipher.AEAD, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("ccz: key is %d bytes, want %d", len(key), KeySize)
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("ccz: %w", err)
	}
	return cipher.NewGCM(b)
}

// Open authenticates and decrypts one complete message and returns the plaintext in a new
// slice. It rejects malformed messages (ErrFormat) and messages whose data_len exceeds
// DefaultMaxDataLen (ErrTooLarge); authentication failure is ErrAuth.
func Open(key, msg []byte) ([]byte, error) {
	return OpenTo(nil, key, msg, 0)
}

// OpenTo is Open with a caller-supplied destination: the plaintext is appended to dst[:0]
// (dst may be msg[HeaderSize+IVSize:] exactly, to decrypt in place), and maxDataLen
// (0 = DefaultMaxDataLen) bounds data_len. On error nothing of the plaintext is returned and
// any plaintext written into dst's storage is wiped.
func OpenTo(dst, key, msg []byte, maxDataLen int64) ([]byte, error) {
	h, err := ParseHeader(msg, maxDataLen)
	if err != nil {
		return nil, err
	}
	if got := int64(len(msg)); got != h.MessageSize() {
		if got < h.MessageSize() {
			return nil, fmt.Errorf("%w: truncated: data_len %d needs %d bytes, have %d", ErrFormat, h.DataLen, h.MessageSize(), got)
		}
		return nil, fmt.Errorf("%w: %d trailing bytes after data_len %d", ErrFormat, got-h.MessageSize(), h.DataLen)
	}
	aead, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	pt, err := aead.Open(dst[:0], h.IV[:], msg[HeaderSize+IVSize:], nil)
	if err != nil {
		clear(dst[:cap(dst)])
		return nil, ErrAuth
	}
	if pt == nil {
		pt = []byte{}
	}
	return pt, nil
}

// Seal encrypts plaintext under key with a fresh 12-byte IV read from rand (crypto/rand in
// practice) and returns the message. data_len must fit the format's u32 and
// DefaultMaxDataLen.
func Seal(key, plaintext []byte, rand io.Reader) ([]byte, error) {
	if int64(len(plaintext))+TagSize > DefaultMaxDataLen {
		return nil, fmt.Errorf("%w: %d bytes of plaintext", ErrTooLarge, len(plaintext))
	}
	if rand == nil {
		return nil, errors.New("ccz: Seal needs a random source")
	}
	aead, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	out := make([]byte, HeaderSize+IVSize, Overhead+len(plaintext))
	binary.LittleEndian.PutUint32(out[0:], IVSize)
	binary.LittleEndian.PutUint32(out[4:], TagSize)
	binary.LittleEndian.PutUint32(out[8:], uint32(len(plaintext)+TagSize))
	if _, err := io.ReadFull(rand, out[HeaderSize:HeaderSize+IVSize]); err != nil {
		return nil, fmt.Errorf("ccz: iv: %w", err)
	}
	return aead.Seal(out, out[HeaderSize:HeaderSize+IVSize], plaintext, nil), nil
}
