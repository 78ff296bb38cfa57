package modelcrypt

import (
	"bytes"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"path/filepath"
	"regexp"
	"strings"
	"unicode/utf8"

	"github.com/gowebpki/jcs"
)

// Header object layout (SPEC.md §3). All integers are big-endian.
const (
	magic         = "CAIMODEL"
	fixedSize     = 144 // magic..checksum
	offVersion    = 8
	offReserved   = 10
	offManLen     = 12
	offSalt       = 16
	offCommit     = 48
	offTag        = 80
	offChecksum   = 112
	saltSize      = 32
	tagSize       = 16 // GCM tag per chunk
	nonceSize     = 12
	maxHeaderSize = fixedSize + MaxManifestSize + 2 + MaxKeyHintSize
)

// HKDF info strings (SPEC.md §4).
const (
	infoCommit   = "cai-agent model v1 key commitment"
	infoManifest = "cai-agent model v1 manifest mac"
	infoShard    = "cai-agent model v1 shard key\x00"
)

// Manifest is the model's table of contents. Before Unlock it is unauthenticated; after a
// successful Unlock every field is authenticated under the model key.
type Manifest struct {
	Kind        string         // KindFiles or KindOllama
	OllamaModel string         // for KindOllama: e.g. registry.ollama.ai/library/tiny:latest
	ChunkSize   int            // plaintext bytes per chunk (the last chunk of a shard may be shorter)
	ShardSize   int64          // plaintext bytes per shard (the last shard of a file may be shorter)
	Files       []ManifestFile // sorted by Path (byte order); paths unique
}

// ManifestFile is one plaintext file of the model.
type ManifestFile struct {
	Path   string   // slash-separated, relative, validated (see ValidPath)
	Size   int64    // plaintext size in bytes
	SHA256 [32]byte // SHA-256 of the whole plaintext file
	Shards []Shard  // in order; contiguous; cover [0, Size)
}

// Shard is a contiguous plaintext range of a file stored, encrypted, in its own object.
type Shard struct {
	Object string // object name inside the encrypted model (opaque, e.g. "000001.shard")
	Offset int64  // plaintext offset of the shard in its file
	Size   int64  // plaintext bytes in the shard
	Chunks int64  // number of chunks (at least 1: an empty shard has one empty final chunk)
}

// EncryptedSize returns the size of the shard's object: its plaintext plus one GCM tag per chunk.
func (s Shard) EncryptedSize() int64 { return s.Size + s.Chunks*tagSize }

// ChunkPlainSize returns the plaintext size of chunk i of shard s for chunk size c.
func (s Shard) chunkPlainSize(i int64, c int) int {
	start := i * int64(c)
	return int(min(int64(c), s.Size-start))
}

// TotalSize returns the sum of the plaintext sizes of all files, at most math.MaxInt64 (a
// valid manifest may list more: up to ~10^5 files of up to 2^50 bytes).
func (m *Manifest) TotalSize() int64 {
	var n int64
	for _, f := range m.Files {
		if f.Size > math.MaxInt64-n {
			return math.MaxInt64
		}
		n += f.Size
	}
	return n
}

// JSON shape of the manifest (SPEC.md §5). The stored bytes are the RFC 8785 (JCS) form.
type jsonManifest struct {
	ChunkSize   int        `json:"chunk_size"`
	Files       []jsonFile `json:"files"`
	Kind        string     `json:"kind"`
	OllamaModel string     `json:"ollama_model,omitempty"`
	ShardSize   int64      `json:"shard_size"`
}

type jsonFile struct {
	Path   string      `json:"path"`
	SHA256 string      `json:"sha256"`
	Shards []jsonShard `json:"shards"`
	Size   int64       `json:"size"`
}

type jsonShard struct {
	Chunks int64  `json:"chunks"`
	Object string `json:"object"`
	Offset int64  `json:"offset"`
	Size   int64  `json:"size"`
}

// UnmarshalJSON decodes one file entry and rejects it at once unless it has a 64-character
// digest, so each accepted entry costs at least ~80 bytes of manifest: a hostile manifest of
// tiny entries ({} or null) cannot make the parser allocate many times its size (SPEC.md §8).
// Everything else is checked by parseManifest.
func (f *jsonFile) UnmarshalJSON(b []byte) error {
	type plain jsonFile
	var p plain
	if err := json.Unmarshal(b, &p); err != nil { // unknown fields fail the canonical check
		return err
	}
	if len(p.SHA256) != 64 {
		return fmt.Errorf("file entry without a 64-digit sha256")
	}
	*f = jsonFile(p)
	return nil
}

// UnmarshalJSON decodes one shard entry and rejects it at once unless it names an object and
// has at least one chunk (see jsonFile.UnmarshalJSON).
func (s *jsonShard) UnmarshalJSON(b []byte) error {
	type plain jsonShard
	var p plain
	if err := json.Unmarshal(b, &p); err != nil { // unknown fields fail the canonical check
		return err
	}
	if p.Object == "" || p.Chunks < 1 {
		return fmt.Errorf("shard entry without object or chunks")
	}
	*s = jsonShard(p)
	return nil
}

// marshalManifest returns the canonical (JCS) manifest bytes.
func marshalManifest(m *Manifest) ([]byte, error) {
	jm := jsonManifest{ChunkSize: m.ChunkSize, Kind: m.Kind, OllamaModel: m.OllamaModel, ShardSize: m.ShardSize,
		Files: make([]jsonFile, len(m.Files))}
	for i, f := range m.Files {
		jf := jsonFile{Path: f.Path, SHA256: hex.EncodeToString(f.SHA256[:]), Size: f.Size,
			Shards: make([]jsonShard, len(f.Shards))}
		for j, s := range f.Shards {
			jf.Shards[j] = jsonShard{Chunks: s.Chunks, Object: s.Object, Offset: s.Offset, Size: s.Size}
		}
		jm.Files[i] = jf
	}
	raw, err := json.Marshal(jm)
	if err != nil {
		return nil, err
	}
	return jcs.Transform(raw)
}

// parseManifest parses and fully validates manifest bytes. It accepts only the canonical
// encoding, so one manifest has exactly one byte representation.
func parseManifest(b []byte) (*Manifest, error) {
	if len(b) > MaxManifestSize {
		return nil, headerCorrupt("manifest larger than %d bytes", MaxManifestSize)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var jm jsonManifest
	if err := dec.Decode(&jm); err != nil {
		return nil, headerCorrupt("manifest JSON: %v", err)
	}
	if dec.More() {
		return nil, headerCorrupt("manifest JSON: trailing data")
	}
	if jm.Files == nil {
		return nil, headerCorrupt("manifest: no files")
	}
	m := &Manifest{Kind: jm.Kind, OllamaModel: jm.OllamaModel, ChunkSize: jm.ChunkSize, ShardSize: jm.ShardSize,
		Files: make([]ManifestFile, len(jm.Files))}
	for i, jf := range jm.Files {
		f := ManifestFile{Path: jf.Path, Size: jf.Size, Shards: make([]Shard, len(jf.Shards))}
		if len(jf.SHA256) != 64 || strings.ToLower(jf.SHA256) != jf.SHA256 {
			return nil, headerCorrupt("manifest: file %d: sha256 must be 64 lower-case hex digits", i)
		}
		if _, err := hex.Decode(f.SHA256[:], []byte(jf.SHA256)); err != nil {
			return nil, headerCorrupt("manifest: file %d: sha256: %v", i, err)
		}
		for j, js := range jf.Shards {
			f.Shards[j] = Shard{Object: js.Object, Offset: js.Offset, Size: js.Size, Chunks: js.Chunks}
		}
		m.Files[i] = f
	}
	if err := m.validate(); err != nil {
		return nil, headerCorrupt("manifest: %v", err)
	}
	canon, err := marshalManifest(m)
	if err != nil {
		return nil, headerCorrupt("manifest: %v", err)
	}
	if !bytes.Equal(canon, b) {
		return nil, headerCorrupt("manifest is not in canonical (RFC 8785) form")
	}
	return m, nil
}

var objectNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*$`)

// validate checks every structural rule of SPEC.md §5.2. The shard table is fully determined
// by (Size, ChunkSize, ShardSize); only object names are free.
func (m *Manifest) validate() error {
	switch m.Kind {
	case KindFiles:
		if m.OllamaModel != "" {
			return fmt.Errorf("ollama_model set for kind %q", m.Kind)
		}
	case KindOllama:
		if m.OllamaModel == "" || len(m.OllamaModel) > 1024 || !utf8.ValidString(m.OllamaModel) {
			return fmt.Errorf("kind %q needs a valid ollama_model", m.Kind)
		}
	default:
		return fmt.Errorf("unknown kind %q", m.Kind)
	}
	if err := checkSizes(m.ChunkSize, m.ShardSize); err != nil {
		return err
	}
	if len(m.Files) == 0 {
		return fmt.Errorf("no files")
	}
	paths := make(map[string]bool, len(m.Files))
	objects := make(map[string]bool)
	for i, f := range m.Files {
		if err := ValidPath(f.Path); err != nil {
			return fmt.Errorf("file %d: %w", i, err)
		}
		if paths[f.Path] {
			return fmt.Errorf("file %d: duplicate path %q", i, f.Path)
		}
		if i > 0 && f.Path < m.Files[i-1].Path {
			return fmt.Errorf("file %d: paths not sorted (%q after %q)", i, f.Path, m.Files[i-1].Path)
		}
		paths[f.Path] = true
		if f.Size < 0 || f.Size > MaxFileSize {
			return fmt.Errorf("file %q: size %d out of range", f.Path, f.Size)
		}
		// Count first: a hostile size must not make us allocate a huge shard table.
		if n := shardCount(f.Size, m.ShardSize); int64(len(f.Shards)) != n {
			return fmt.Errorf("file %q: %d shards, want %d", f.Path, len(f.Shards), n)
		}
		for j, s := range f.Shards {
			w := shardAt(f.Size, m.ChunkSize, m.ShardSize, int64(j))
			if s.Offset != w.Offset || s.Size != w.Size || s.Chunks != w.Chunks {
				return fmt.Errorf("file %q: shard %d: offset/size/chunks %d/%d/%d, want %d/%d/%d",
					f.Path, j, s.Offset, s.Size, s.Chunks, w.Offset, w.Size, w.Chunks)
			}
			if err := validObjectName(s.Object); err != nil {
				return fmt.Errorf("file %q: shard %d: %w", f.Path, j, err)
			}
			if objects[s.Object] {
				return fmt.Errorf("file %q: shard %d: duplicate object %q", f.Path, j, s.Object)
			}
			objects[s.Object] = true
		}
	}
	// A path may not also be a directory of another path (the sink could not create both).
	for p := range paths {
		for i := len(p) - 1; i > 0; i-- {
			if p[i] == '/' && paths[p[:i]] {
				return fmt.Errorf("path %q is also a directory of %q", p[:i], p)
			}
		}
	}
	return nil
}

func checkSizes(chunk int, shard int64) error {
	if chunk < MinChunkSize || chunk > MaxChunkSize {
		return fmt.Errorf("chunk size %d outside [%d, %d]", chunk, MinChunkSize, MaxChunkSize)
	}
	if shard < int64(chunk) || shard%int64(chunk) != 0 || shard/int64(chunk) > MaxChunksPerShard {
		return fmt.Errorf("shard size %d must be a multiple of the chunk size %d, at most %d chunks",
			shard, chunk, int64(MaxChunksPerShard))
	}
	return nil
}

// shardCount returns the number of shards of a file: ceil(size/shardSize), at least 1.
func shardCount(size, shardSize int64) int64 { return max(1, (size+shardSize-1)/shardSize) }

// shardAt returns shard i of a file of the given size, without object name.
func shardAt(size int64, chunk int, shardSize int64, i int64) Shard {
	off := i * shardSize
	sz := min(shardSize, size-off)
	return Shard{Offset: off, Size: sz, Chunks: max(1, (sz+int64(chunk)-1)/int64(chunk))}
}

// planShards returns the shard table of a file of the given size, without object names.
func planShards(size int64, chunk int, shardSize int64) []Shard {
	n := shardCount(size, shardSize)
	out := make([]Shard, n)
	for i := range n {
		out[i] = shardAt(size, chunk, shardSize, i)
	}
	return out
}

func validObjectName(s string) error {
	if len(s) == 0 || len(s) > MaxObjectNameSize || !objectNameRE.MatchString(s) || s == HeaderObject {
		return fmt.Errorf("invalid object name %q", s)
	}
	return nil
}

// ValidPath reports whether p is acceptable as a file path inside a model: non-empty,
// slash-separated, relative, at most MaxPathSize bytes of valid UTF-8 without control
// characters or backslashes, no empty, "." or ".." element, and filepath.IsLocal.
func ValidPath(p string) error {
	if p == "" {
		return fmt.Errorf("empty path")
	}
	if len(p) > MaxPathSize {
		return fmt.Errorf("path longer than %d bytes", MaxPathSize)
	}
	if !utf8.ValidString(p) {
		return fmt.Errorf("path %q is not valid UTF-8", p)
	}
	for _, r := range p {
		if r < 0x20 || r == 0x7f || r == '\\' {
			return fmt.Errorf("path %q contains a control character or backslash", p)
		}
	}
	for _, el := range strings.Split(p, "/") {
		if el == "" || el == "." || el == ".." || len(el) > 255 {
			return fmt.Errorf("path %q: invalid element %q", p, el)
		}
	}
	if !filepath.IsLocal(filepath.FromSlash(p)) {
		return fmt.Errorf("path %q is not local", p)
	}
	return nil
}

// header is the parsed header object.
type header struct {
	raw      []byte // bytes [0, fixedSize+len(manifest)): the checksummed region
	manifest []byte
	salt     [saltSize]byte
	commit   [32]byte
	tag      [32]byte
	keyHint  string
}

// parseHeader parses a complete header object (SPEC.md §3) and the manifest inside it. It
// checks the magic, version, lengths, reserved bytes, checksum, key hint and manifest
// structure. Nothing here is authenticated: that needs the key (see Model.Unlock).
func parseHeader(b []byte) (*header, *Manifest, error) {
	if len(b) < len(magic) || string(b[:len(magic)]) != magic {
		return nil, nil, ErrNotModel
	}
	if len(b) >= offVersion+2 {
		if v := binary.BigEndian.Uint16(b[offVersion:]); v != Version {
			return nil, nil, fmt.Errorf("%w: version %d (this reader supports %d)", ErrUnsupportedVersion, v, Version)
		}
	}
	if len(b) < fixedSize {
		return nil, nil, headerCorrupt("header truncated: %d bytes", len(b))
	}
	if r := binary.BigEndian.Uint16(b[offReserved:]); r != 0 {
		return nil, nil, headerCorrupt("reserved field is %#x, want 0", r)
	}
	ml := binary.BigEndian.Uint32(b[offManLen:])
	if ml == 0 || ml > MaxManifestSize {
		return nil, nil, headerCorrupt("manifest length %d outside [1, %d]", ml, MaxManifestSize)
	}
	end := fixedSize + int(ml)
	if len(b) < end+2 {
		return nil, nil, headerCorrupt("header truncated: manifest length %d, object %d bytes", ml, len(b))
	}
	h := &header{raw: b[:end], manifest: b[fixedSize:end]}
	sum := sha256.New()
	sum.Write(b[:offChecksum])
	sum.Write(h.manifest)
	if subtle.ConstantTimeCompare(sum.Sum(nil), b[offChecksum:fixedSize]) != 1 {
		return nil, nil, headerCorrupt("header checksum mismatch")
	}
	hl := int(binary.BigEndian.Uint16(b[end:]))
	if hl > MaxKeyHintSize {
		return nil, nil, headerCorrupt("key hint length %d exceeds %d", hl, MaxKeyHintSize)
	}
	if len(b) != end+2+hl {
		return nil, nil, headerCorrupt("header object is %d bytes, want %d", len(b), end+2+hl)
	}
	hint := string(b[end+2:])
	if !validHint(hint) {
		return nil, nil, headerCorrupt("key hint is not printable UTF-8")
	}
	h.keyHint = hint
	copy(h.salt[:], b[offSalt:])
	copy(h.commit[:], b[offCommit:])
	copy(h.tag[:], b[offTag:])
	m, err := parseManifest(h.manifest)
	if err != nil {
		return nil, nil, err
	}
	return h, m, nil
}

func validHint(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return false
		}
	}
	return true
}

// keySchedule holds the HKDF pseudorandom key of one model. zero() wipes it.
type keySchedule struct{ prk []byte }

func newKeySchedule(key []byte, salt []byte) (*keySchedule, error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("%w: key is %d bytes, want %d", ErrWrongKey, len(key), KeySize)
	}
	prk, err := hkdf.Extract(sha256.New, key, salt)
	if err != nil {
		return nil, err
	}
	return &keySchedule{prk: prk}, nil
}

func (k *keySchedule) expand(info string) []byte {
	out, err := hkdf.Expand(sha256.New, k.prk, info, 32)
	if err != nil {
		panic("modelcrypt: hkdf: " + err.Error()) // only on a length > 255*32
	}
	return out
}

func (k *keySchedule) commitment() []byte { return k.expand(infoCommit) }

// manifestTag returns HMAC-SHA-256(K_manifest, header[0:80] ‖ manifest).
func (k *keySchedule) manifestTag(prefix, manifest []byte) []byte {
	mk := k.expand(infoManifest)
	defer clear(mk)
	mac := hmac.New(sha256.New, mk)
	mac.Write(prefix[:offTag])
	mac.Write(manifest)
	return mac.Sum(nil)
}

// shardKey returns the AES-256 key of shard j of file f (SPEC.md §4).
func (k *keySchedule) shardKey(chunkSize int, f *ManifestFile, j int) []byte {
	return k.expand(infoShard + string(shardDescriptor(chunkSize, f, j)))
}

// shardDescriptor binds a shard's exact position in the model (SPEC.md §4):
// u32 len(path) ‖ path ‖ u64 file size ‖ u32 chunk size ‖ u32 shard index ‖ u32 shard count ‖
// u64 shard offset ‖ u64 shard size.
func shardDescriptor(chunkSize int, f *ManifestFile, j int) []byte {
	s := f.Shards[j]
	b := make([]byte, 0, 4+len(f.Path)+8+4+4+4+8+8)
	b = binary.BigEndian.AppendUint32(b, uint32(len(f.Path)))
	b = append(b, f.Path...)
	b = binary.BigEndian.AppendUint64(b, uint64(f.Size))
	b = binary.BigEndian.AppendUint32(b, uint32(chunkSize))
	b = binary.BigEndian.AppendUint32(b, uint32(j))
	b = binary.BigEndian.AppendUint32(b, uint32(len(f.Shards)))
	b = binary.BigEndian.AppendUint64(b, uint64(s.Offset))
	b = binary.BigEndian.AppendUint64(b, uint64(s.Size))
	return b
}

// chunkNonce writes the nonce of chunk i: u64 index ‖ 0x000000 ‖ final flag.
func chunkNonce(n *[nonceSize]byte, i int64, final bool) {
	binary.BigEndian.PutUint64(n[:8], uint64(i))
	n[8], n[9], n[10] = 0, 0, 0
	n[11] = 0
	if final {
		n[11] = 1
	}
}

// marshalHeader builds a header object (the inverse of parseHeader) with the tag computed
// from ks.
func marshalHeader(ks *keySchedule, salt []byte, manifest []byte, keyHint string) ([]byte, error) {
	if len(manifest) > MaxManifestSize {
		return nil, fmt.Errorf("modelcrypt: manifest is %d bytes, limit %d", len(manifest), MaxManifestSize)
	}
	if len(keyHint) > MaxKeyHintSize || !validHint(keyHint) {
		return nil, fmt.Errorf("modelcrypt: key hint must be printable UTF-8 of at most %d bytes", MaxKeyHintSize)
	}
	b := make([]byte, fixedSize, fixedSize+len(manifest)+2+len(keyHint))
	copy(b, magic)
	binary.BigEndian.PutUint16(b[offVersion:], Version)
	binary.BigEndian.PutUint32(b[offManLen:], uint32(len(manifest)))
	copy(b[offSalt:], salt)
	commit := ks.commitment()
	copy(b[offCommit:], commit)
	copy(b[offTag:], ks.manifestTag(b, manifest))
	b = append(b, manifest...)
	sum := sha256.New()
	sum.Write(b[:offChecksum])
	sum.Write(manifest)
	copy(b[offChecksum:fixedSize], sum.Sum(nil))
	b = binary.BigEndian.AppendUint16(b, uint16(len(keyHint)))
	b = append(b, keyHint...)
	return b, nil
}

// SetKeyHint returns a copy of the header object hdr with its key hint replaced. The hint is
// public and unauthenticated, so this needs no key and does not affect decryption.
func SetKeyHint(hdr []byte, keyHint string) ([]byte, error) {
	h, _, err := parseHeader(hdr)
	if err != nil {
		return nil, err
	}
	if len(keyHint) > MaxKeyHintSize || !validHint(keyHint) {
		return nil, fmt.Errorf("%w: key hint must be printable UTF-8 of at most %d bytes", ErrInvalidOptions, MaxKeyHintSize)
	}
	out := append([]byte(nil), h.raw...)
	out = binary.BigEndian.AppendUint16(out, uint16(len(keyHint)))
	return append(out, keyHint...), nil
}
