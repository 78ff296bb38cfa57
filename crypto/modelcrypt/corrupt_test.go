package modelcrypt

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The fixture: chunk 64, shard 128. "a" and "b" are 330 bytes: 3 shards of 128/128/74
// bytes, 2 chunks each. "c" is empty: 1 shard, 1 empty chunk.
const (
	fxChunk = 64
	fxShard = 128
)

func fixtureFiles() map[string][]byte {
	return map[string][]byte{"a": pattern(1, 330), "b": pattern(2, 330), "c": nil}
}

func fixture(t *testing.T, seed byte) (map[string][]byte, *Manifest) {
	t.Helper()
	dir, man := encryptTo(t, testKey(1), fixtureFiles(), EncryptOptions{ChunkSize: fxChunk, ShardSize: fxShard,
		KeyHint: "kbs:///default/model/key", Rand: newSeededRand(seed)})
	return loadDir(t, dir), man
}

// objOf returns the object name of shard j of the file at path.
func objOf(man *Manifest, path string, j int) string {
	for _, f := range man.Files {
		if f.Path == path {
			return f.Shards[j].Object
		}
	}
	panic("no file " + path)
}

// run opens, unlocks with key 1 and decrypts objs; it returns the sink and the error.
func run(t *testing.T, objs map[string][]byte, opts DecryptOptions) (*memSink, error) {
	t.Helper()
	src := &memSource{objs: objs}
	m, err := Open(context.Background(), src)
	if err != nil {
		return nil, err
	}
	if err := m.Unlock(testKey(1)); err != nil {
		return nil, err
	}
	sink := newMemSink()
	_, err = m.Decrypt(context.Background(), src, sink, opts)
	return sink, err
}

// fixChecksum recomputes the header checksum, as an attacker can.
func fixChecksum(h []byte) []byte {
	h = bytes.Clone(h)
	ml := int(binary.BigEndian.Uint32(h[offManLen:]))
	s := sha256.New()
	s.Write(h[:offChecksum])
	s.Write(h[fixedSize : fixedSize+ml])
	copy(h[offChecksum:], s.Sum(nil))
	return h
}

// resign rewrites the header with a mutated manifest, authenticated under key (models a key
// holder who forges a manifest, or a buggy encryptor).
func resign(t *testing.T, hdr, key []byte, mutate func(*Manifest)) []byte {
	t.Helper()
	h, man, err := parseHeader(hdr)
	require.NoError(t, err)
	mutate(man)
	mb, err := marshalManifest(man)
	require.NoError(t, err)
	ks, err := newKeySchedule(key, h.salt[:])
	require.NoError(t, err)
	out, err := marshalHeader(ks, h.salt[:], mb, h.keyHint)
	require.NoError(t, err)
	return out
}

// rawManifestEdit replaces old with new in the manifest JSON, fixes the length and checksum
// (everything an attacker without the key can do).
func rawManifestEdit(t *testing.T, hdr []byte, old, new string) []byte {
	t.Helper()
	h, _, err := parseHeader(hdr)
	require.NoError(t, err)
	require.Contains(t, string(h.manifest), old)
	man := bytes.Replace(h.manifest, []byte(old), []byte(new), 1)
	out := append([]byte(nil), hdr[:fixedSize]...)
	binary.BigEndian.PutUint32(out[offManLen:], uint32(len(man)))
	out = append(out, man...)
	out = binary.BigEndian.AppendUint16(out, uint16(len(h.keyHint)))
	out = append(out, h.keyHint...)
	return fixChecksum(out)
}

func requireCorrupt(t *testing.T, err error, file, object string, chunk int64, reason string) {
	t.Helper()
	require.ErrorIs(t, err, ErrCorrupt)
	assert.False(t, errors.Is(err, ErrWrongKey))
	var ce *CorruptError
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, file, ce.File, "file")
	assert.Equal(t, object, ce.Object, "object")
	assert.Equal(t, chunk, ce.Chunk, "chunk")
	assert.Contains(t, ce.Reason, reason)
	if file != "" {
		assert.Contains(t, err.Error(), fmt.Sprintf("%q", file))
	}
}

func TestFixtureDecrypts(t *testing.T) {
	objs, man := fixture(t, 1)
	require.Len(t, man.Files[0].Shards, 3)
	require.Equal(t, int64(2), man.Files[0].Shards[2].Chunks)
	sink, err := run(t, objs, DecryptOptions{VerifyDigests: true})
	require.NoError(t, err)
	assert.Equal(t, []string{"a", "b", "c"}, sink.closedFiles())
	for p, want := range fixtureFiles() {
		assert.Equal(t, len(want), len(sink.files[p].data))
		assert.True(t, bytes.Equal(want, sink.files[p].data) || len(want) == 0, p)
	}
}

func TestChunkCorruption(t *testing.T) {
	objs, man := fixture(t, 1)
	a1 := objOf(man, "a", 1) // middle shard of "a": 2 chunks of 64 bytes
	a2 := objOf(man, "a", 2) // last shard of "a": chunks of 64 and 10 bytes
	c0 := objOf(man, "c", 0)
	const ec = fxChunk + tagSize // encrypted chunk size
	cases := []struct {
		name   string
		mutate func(o map[string][]byte)
		file   string
		object string
		chunk  int64
		reason string
	}{
		{"truncate mid-chunk", func(o map[string][]byte) { o[a1] = o[a1][:ec+10] }, "a", a1, 1, "truncated inside"},
		{"truncate at chunk boundary", func(o map[string][]byte) { o[a1] = o[a1][:ec] }, "a", a1, 1, "ends before"},
		{"drop last chunk of file", func(o map[string][]byte) { o[a2] = o[a2][:ec] }, "a", a2, 1, "ends before"},
		{"truncate to zero", func(o map[string][]byte) { o[a1] = nil }, "a", a1, 0, "ends before"},
		{"empty file's chunk dropped", func(o map[string][]byte) { o[c0] = nil }, "c", c0, 0, "ends before"},
		{"trailing data", func(o map[string][]byte) { o[a1] = append(bytes.Clone(o[a1]), 0) }, "a", a1, -1, "trailing"},
		{"trailing chunk (duplicate last)", func(o map[string][]byte) {
			o[a1] = append(bytes.Clone(o[a1]), o[a1][ec:]...)
		}, "a", a1, -1, "trailing"},
		{"reorder chunks", func(o map[string][]byte) {
			b := o[a1]
			o[a1] = append(bytes.Clone(b[ec:]), b[:ec]...)
		}, "a", a1, 0, "authentication"},
		{"duplicate chunk", func(o map[string][]byte) {
			b := o[a1]
			o[a1] = append(bytes.Clone(b[:ec]), b[:ec]...)
		}, "a", a1, 1, "authentication"},
		{"flip ciphertext bit", func(o map[string][]byte) {
			o[a1] = bytes.Clone(o[a1])
			o[a1][ec+3] ^= 1
		}, "a", a1, 1, "authentication"},
		{"flip tag bit", func(o map[string][]byte) {
			o[a1] = bytes.Clone(o[a1])
			o[a1][len(o[a1])-1] ^= 0x80
		}, "a", a1, 1, "authentication"},
		{"swap shards within a file", func(o map[string][]byte) {
			o[a1], o[objOf(man, "a", 0)] = o[objOf(man, "a", 0)], o[a1]
		}, "a", objOf(man, "a", 0), 0, "authentication"},
		{"swap shards between files", func(o map[string][]byte) {
			b1 := objOf(man, "b", 1)
			o[a1], o[b1] = o[b1], o[a1]
		}, "a", a1, 0, "authentication"},
		{"last chunk made non-final (chunk from a full shard)", func(o map[string][]byte) {
			// Replace the shard's final chunk by the first chunk of another shard position.
			b := bytes.Clone(o[a1])
			o[a1] = append(b[:ec], b[:ec]...)
		}, "a", a1, 1, "authentication"},
		{"object missing", func(o map[string][]byte) { delete(o, a2) }, "a", a2, -1, "missing"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o := maps.Clone(objs)
			tc.mutate(o)
			for _, verify := range []bool{false, true} {
				w := 2
				if tc.name == "swap shards within a file" || tc.name == "swap shards between files" {
					// two objects are damaged: one worker makes the first error deterministic
					w = 1
				}
				sink, err := run(t, o, DecryptOptions{VerifyDigests: verify, Workers: w})
				requireCorrupt(t, err, tc.file, tc.object, tc.chunk, tc.reason)
				assert.NotContains(t, sink.closedFiles(), tc.file, "an unverified file was closed")
			}
		})
	}
}

func TestSwapShardsBetweenModels(t *testing.T) {
	// Two models of the same files under the same key differ only in their salt.
	o1, man := fixture(t, 1)
	o2, _ := fixture(t, 2)
	require.NotEqual(t, o1[HeaderObject][offSalt:offSalt+32], o2[HeaderObject][offSalt:offSalt+32])
	a0 := objOf(man, "a", 0)
	o := maps.Clone(o1)
	o[a0] = o2[a0]
	_, err := run(t, o, DecryptOptions{})
	requireCorrupt(t, err, "a", a0, 0, "authentication")

	// The header of model 2 with the shards of model 1: every shard fails.
	o = maps.Clone(o1)
	o[HeaderObject] = o2[HeaderObject]
	_, err = run(t, o, DecryptOptions{Workers: 1})
	requireCorrupt(t, err, "a", a0, 0, "authentication")
}

func TestHeaderTampering(t *testing.T) {
	objs, _ := fixture(t, 1)
	hdr := objs[HeaderObject]
	flip := func(off int) []byte { b := bytes.Clone(hdr); b[off] ^= 1; return b }
	ml := int(binary.BigEndian.Uint32(hdr[offManLen:]))
	sum := sha256.Sum256(fixtureFiles()["a"])
	shaA := hex.EncodeToString(sum[:])
	require.NotEqual(t, "00", shaA[10:12])

	cases := []struct {
		name      string
		hdr       []byte
		openErr   error // from Open
		unlockErr error // from Unlock (if Open succeeded)
	}{
		{"magic", flip(0), ErrNotModel, nil},
		{"version", flip(offVersion + 1), ErrUnsupportedVersion, nil},
		{"version, checksum fixed", fixChecksum(flip(offVersion + 1)), ErrUnsupportedVersion, nil},
		{"reserved", fixChecksum(flip(offReserved)), ErrCorrupt, nil},
		{"manifest length", flip(offManLen + 3), ErrCorrupt, nil},
		{"salt", flip(offSalt), ErrCorrupt, nil},
		{"commitment", flip(offCommit), ErrCorrupt, nil},
		{"tag", flip(offTag), ErrCorrupt, nil},
		{"checksum", flip(offChecksum), ErrCorrupt, nil},
		{"manifest byte", flip(fixedSize + 5), ErrCorrupt, nil},
		{"tag, checksum fixed", fixChecksum(flip(offTag + 7)), nil, ErrCorrupt},
		{"manifest size edited, checksum fixed", rawManifestEdit(t, hdr, `"size":330`, `"size":331`), ErrCorrupt, nil},
		{"file renamed, checksum fixed", rawManifestEdit(t, hdr, `"path":"a"`, `"path":"a2"`), nil, ErrCorrupt},
		{"sha256 edited, checksum fixed", rawManifestEdit(t, hdr, shaA, shaA[:10]+"00"+shaA[12:]), nil, ErrCorrupt},
		{"kind edited, checksum fixed", rawManifestEdit(t, hdr, `"kind":"files"`, `"kind":"ollama","ollama_model":"x"`), nil, ErrCorrupt},
		// The salt and the commitment feed the key check: with the checksum fixed, a forged
		// value is indistinguishable from a model under another key (SPEC.md §6).
		{"salt, checksum fixed", fixChecksum(flip(offSalt + 9)), nil, ErrWrongKey},
		{"commitment, checksum fixed", fixChecksum(flip(offCommit + 9)), nil, ErrWrongKey},
		{"truncated header", hdr[:fixedSize+ml/2], ErrCorrupt, nil},
		{"truncated fixed part", hdr[:100], ErrCorrupt, nil},
		{"empty header object", nil, ErrNotModel, nil},
		{"trailing byte", append(bytes.Clone(hdr), 0), ErrCorrupt, nil},
		{"hint length too large", append(bytes.Clone(hdr[:fixedSize+ml]), 0xff, 0xff), ErrCorrupt, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o := maps.Clone(objs)
			o[HeaderObject] = tc.hdr
			src := &memSource{objs: o}
			m, err := Open(context.Background(), src)
			if tc.openErr != nil {
				require.ErrorIs(t, err, tc.openErr)
				if errors.Is(tc.openErr, ErrCorrupt) {
					var ce *CorruptError
					require.ErrorAs(t, err, &ce)
					assert.Equal(t, HeaderObject, ce.Object)
				}
				return
			}
			require.NoError(t, err)
			err = m.Unlock(testKey(1))
			require.ErrorIs(t, err, tc.unlockErr)
			if errors.Is(tc.unlockErr, ErrCorrupt) {
				assert.False(t, errors.Is(err, ErrWrongKey))
			}
		})
	}
}

func TestUnknownVersion(t *testing.T) {
	objs, _ := fixture(t, 1)
	for _, v := range []uint16{0, 2, 0xffff} {
		h := bytes.Clone(objs[HeaderObject])
		binary.BigEndian.PutUint16(h[offVersion:], v)
		_, err := ParseHeader(fixChecksum(h))
		require.ErrorIs(t, err, ErrUnsupportedVersion)
		assert.Contains(t, err.Error(), fmt.Sprint(v))
		// The version is checked before anything else after the magic.
		_, err = ParseHeader(h[:12])
		require.ErrorIs(t, err, ErrUnsupportedVersion)
	}
}

// SPEC.md §9: another version is rejected with ErrUnsupportedVersion before anything else is
// looked at, also when its header object is larger than a version-1 header may be (a future
// version may allow bigger manifests).
func TestUnknownVersionOversizedHeader(t *testing.T) {
	h := make([]byte, maxHeaderSize+4096)
	copy(h, magic)
	binary.BigEndian.PutUint16(h[offVersion:], 2)
	_, err := Open(context.Background(), &memSource{objs: map[string][]byte{HeaderObject: h}})
	require.ErrorIs(t, err, ErrUnsupportedVersion)
	assert.False(t, errors.Is(err, ErrCorrupt))
	// Version 1 of that size is corrupt.
	binary.BigEndian.PutUint16(h[offVersion:], Version)
	_, err = Open(context.Background(), &memSource{objs: map[string][]byte{HeaderObject: h}})
	require.ErrorIs(t, err, ErrCorrupt)
}

func TestNotModel(t *testing.T) {
	_, err := Open(context.Background(), &memSource{objs: map[string][]byte{}})
	require.ErrorIs(t, err, ErrNotModel)
	_, err = Open(context.Background(), DirSource(t.TempDir()))
	require.ErrorIs(t, err, ErrNotModel)
	_, err = Open(context.Background(), &memSource{objs: map[string][]byte{HeaderObject: []byte(`{"kbs":""}`)}})
	require.ErrorIs(t, err, ErrNotModel)
}

// The key hint is public and unauthenticated: changing it changes nothing else.
func TestKeyHintIsUnauthenticated(t *testing.T) {
	objs, _ := fixture(t, 1)
	m, err := ParseHeader(objs[HeaderObject])
	require.NoError(t, err)
	assert.Equal(t, "kbs:///default/model/key", m.KeyHint())
	for _, hint := range []string{"", "ita:key-id-1234", string(bytes.Repeat([]byte("x"), MaxKeyHintSize))} {
		h, err := SetKeyHint(objs[HeaderObject], hint)
		require.NoError(t, err)
		o := maps.Clone(objs)
		o[HeaderObject] = h
		m, err := Open(context.Background(), &memSource{objs: o})
		require.NoError(t, err)
		assert.Equal(t, hint, m.KeyHint())
		assert.Equal(t, mustModel(t, objs).ManifestSHA256(), m.ManifestSHA256())
		sink, err := run(t, o, DecryptOptions{VerifyDigests: true})
		require.NoError(t, err)
		assert.Len(t, sink.closedFiles(), 3)
	}
	_, err = SetKeyHint(objs[HeaderObject], "bad\nhint")
	require.Error(t, err)
	_, err = SetKeyHint(objs[HeaderObject], string(bytes.Repeat([]byte("x"), MaxKeyHintSize+1)))
	require.Error(t, err)
}

func mustModel(t *testing.T, objs map[string][]byte) *Model {
	m, err := ParseHeader(objs[HeaderObject])
	require.NoError(t, err)
	return m
}

// A manifest forged by a key holder (or a buggy encryptor) with a wrong plaintext SHA-256:
// AEAD passes, VerifyDigests catches it before Close.
func TestVerifyDigestsCatchesWrongDigest(t *testing.T) {
	objs, _ := fixture(t, 1)
	o := maps.Clone(objs)
	o[HeaderObject] = resign(t, objs[HeaderObject], testKey(1), func(m *Manifest) { m.Files[0].SHA256[0] ^= 1 })
	sink, err := run(t, o, DecryptOptions{})
	require.NoError(t, err)
	assert.Len(t, sink.closedFiles(), 3)

	sink, err = run(t, o, DecryptOptions{VerifyDigests: true})
	requireCorrupt(t, err, "a", "", -1, "SHA-256")
	assert.NotContains(t, sink.closedFiles(), "a")
}

// A file renamed by a key holder is still bound to its position: its shards do not decrypt.
func TestRenameWithKeyStillDetected(t *testing.T) {
	objs, man := fixture(t, 1)
	o := maps.Clone(objs)
	o[HeaderObject] = resign(t, objs[HeaderObject], testKey(1), func(m *Manifest) { m.Files[0].Path = "a.renamed" })
	_, err := run(t, o, DecryptOptions{Workers: 1}) // every shard fails: one worker makes the first deterministic
	requireCorrupt(t, err, "a.renamed", objOf(man, "a", 0), 0, "authentication")
}

// recordingSink fails the test if a file is closed before every byte was written, and lets
// us check that nothing unverified was closed.
func TestNoCloseOfUnverifiedFile(t *testing.T) {
	// Big multi-shard file whose last chunk is corrupt, plus small good files.
	files := map[string][]byte{"big": pattern(1, 64*40+3), "small1": pattern(2, 10), "small2": pattern(3, 100)}
	dir, man := encryptTo(t, testKey(1), files, EncryptOptions{ChunkSize: 64, ShardSize: 256})
	objs := loadDir(t, dir)
	last := man.Files[0].Shards[len(man.Files[0].Shards)-1]
	objs[last.Object] = bytes.Clone(objs[last.Object])
	objs[last.Object][len(objs[last.Object])-1] ^= 1
	for _, w := range []int{1, 2, 8} {
		for _, verify := range []bool{false, true} {
			sink, err := run(t, objs, DecryptOptions{Workers: w, VerifyDigests: verify})
			requireCorrupt(t, err, "big", last.Object, last.Chunks-1, "authentication")
			assert.NotContains(t, sink.closedFiles(), "big")
		}
	}
}

func TestCreateFailureStops(t *testing.T) {
	objs, _ := fixture(t, 1)
	src := &memSource{objs: objs}
	m, err := Open(context.Background(), src)
	require.NoError(t, err)
	require.NoError(t, m.Unlock(testKey(1)))
	sink := newMemSink()
	sink.failOn = "b"
	_, err = m.Decrypt(context.Background(), src, sink, DecryptOptions{})
	require.ErrorContains(t, err, "create refused")
	assert.NotContains(t, sink.created, "c")
	assert.NotContains(t, sink.closedFiles(), "b")
}

func TestSkipAndProgress(t *testing.T) {
	objs, _ := fixture(t, 1)
	src := &memSource{objs: objs}
	m, err := Open(context.Background(), src)
	require.NoError(t, err)
	require.NoError(t, m.Unlock(testKey(1)))
	sink := newMemSink()
	var progress int64
	var mu = make(chan struct{}, 1)
	st, err := m.Decrypt(context.Background(), src, sink, DecryptOptions{
		Skip:     func(f ManifestFile) bool { return f.Path == "b" },
		Progress: func(n int64) { mu <- struct{}{}; progress += n; <-mu },
	})
	require.NoError(t, err)
	assert.Equal(t, Stats{Files: 2, SkippedFiles: 1, Bytes: 330}, *st)
	assert.Equal(t, int64(330), progress)
	assert.Equal(t, []string{"a", "c"}, sink.closedFiles())
	assert.NotContains(t, src.opens, objOf(m.Manifest(), "b", 0))
}

// Each shard object is opened exactly once (sequential read) when nothing fails.
func TestOneOpenPerShard(t *testing.T) {
	objs, _ := fixture(t, 1)
	src := &memSource{objs: objs}
	m, err := Open(context.Background(), src)
	require.NoError(t, err)
	require.NoError(t, m.Unlock(testKey(1)))
	_, err = m.Decrypt(context.Background(), src, newMemSink(), DecryptOptions{})
	require.NoError(t, err)
	for name, n := range src.opens {
		assert.Equal(t, 1, n, name)
	}
	assert.Len(t, src.opens, len(objs))
}

// flakySource fails the first read of one object after some bytes.
type flakySource struct {
	memSource
	object string
	after  int
	failed bool
	offs   []int64
}

type failingReader struct {
	r    io.Reader
	left int
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.left <= 0 {
		return 0, errors.New("connection reset")
	}
	if len(p) > f.left {
		p = p[:f.left]
	}
	n, err := f.r.Read(p)
	f.left -= n
	return n, err
}

func (s *flakySource) Open(ctx context.Context, name string, off int64) (io.ReadCloser, error) {
	rc, err := s.memSource.Open(ctx, name, off)
	if err != nil || name != s.object {
		return rc, err
	}
	s.offs = append(s.offs, off)
	if !s.failed {
		s.failed = true
		return io.NopCloser(&failingReader{r: rc, left: s.after}), nil
	}
	return rc, nil
}

func TestReadRetry(t *testing.T) {
	objs, man := fixture(t, 1)
	a1 := objOf(man, "a", 1)
	for _, retries := range []int{0, 1} {
		src := &flakySource{memSource: memSource{objs: objs}, object: a1, after: fxChunk + tagSize + 5}
		m, err := Open(context.Background(), src)
		require.NoError(t, err)
		require.NoError(t, m.Unlock(testKey(1)))
		sink := newMemSink()
		_, err = m.Decrypt(context.Background(), src, sink, DecryptOptions{Retries: retries, Workers: 1})
		if retries == 0 {
			require.ErrorContains(t, err, "connection reset")
			require.False(t, errors.Is(err, ErrCorrupt))
			continue
		}
		require.NoError(t, err)
		assert.Equal(t, []int64{0, fxChunk + tagSize}, src.offs, "reopened at chunk 1")
		assert.Equal(t, fixtureFiles()["a"], sink.files["a"].data)
	}
}

func TestCancel(t *testing.T) {
	objs, _ := fixture(t, 1)
	src := &memSource{objs: objs}
	m, err := Open(context.Background(), src)
	require.NoError(t, err)
	require.NoError(t, m.Unlock(testKey(1)))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	sink := newMemSink()
	_, err = m.Decrypt(ctx, src, sink, DecryptOptions{})
	require.ErrorIs(t, err, context.Canceled)
	assert.Empty(t, sink.closedFiles())
}

// The same checks through the real directory source, on files truncated and swapped on disk.
func TestDirSourceCorruption(t *testing.T) {
	files := map[string][]byte{"a": pattern(1, 1000), "b": pattern(2, 1000)}
	dir, man := encryptTo(t, testKey(1), files, EncryptOptions{ChunkSize: 64, ShardSize: 512})
	a1 := filepath.Join(dir, objOf(man, "a", 1))
	st, err := os.Stat(a1)
	require.NoError(t, err)
	require.NoError(t, os.Truncate(a1, st.Size()-16)) // drop the last chunk's tag
	_, _, err = decryptDir(t, dir, testKey(1), DecryptOptions{})
	requireCorrupt(t, err, "a", objOf(man, "a", 1), man.Files[0].Shards[1].Chunks-1, "truncated inside")

	require.NoError(t, os.Remove(a1))
	_, _, err = decryptDir(t, dir, testKey(1), DecryptOptions{})
	requireCorrupt(t, err, "a", objOf(man, "a", 1), -1, "missing")
}

// A lone single-shard file is decrypted with its chunks spread over all workers
// (decryptShardParallel): the same corruption classes must be caught, and nothing closed.
func TestParallelShardCorruption(t *testing.T) {
	data := pattern(5, 64*20+7) // 21 chunks in one shard
	dir, man := encryptTo(t, testKey(1), map[string][]byte{"one": data}, EncryptOptions{ChunkSize: 64})
	objs := loadDir(t, dir)
	obj := man.Files[0].Shards[0].Object
	require.True(t, pipelineFile(2, man.Files[0].Size, man.Files[0].Size), "the parallel path is taken")
	ec := 64 + tagSize
	for _, w := range []int{2, 4} {
		var progress atomic.Int64
		sink, err := run(t, objs, DecryptOptions{Workers: w, Progress: func(n int64) { progress.Add(n) }})
		require.NoError(t, err)
		assert.Equal(t, data, sink.files["one"].data)
		assert.Equal(t, []string{"one"}, sink.closedFiles())
		assert.Equal(t, int64(len(data)), progress.Load())
	}
	cases := map[string]struct {
		mutate func(b []byte) []byte
		chunks []int64 // acceptable reported chunk indexes
	}{
		"truncate mid-chunk":   {func(b []byte) []byte { return b[:5*ec+3] }, []int64{5}},
		"truncate at boundary": {func(b []byte) []byte { return b[:20*ec] }, []int64{20}},
		"trailing byte":        {func(b []byte) []byte { return append(b, 1) }, []int64{-1}},
		"flip bit":             {func(b []byte) []byte { b[7*ec+1] ^= 4; return b }, []int64{7}},
		"reorder":              {func(b []byte) []byte { return slices.Concat(b[:3*ec], b[4*ec:5*ec], b[3*ec:4*ec], b[5*ec:]) }, []int64{3, 4}},
		"duplicate":            {func(b []byte) []byte { return slices.Concat(b[:10*ec], b[9*ec:10*ec], b[11*ec:]) }, []int64{10}},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			for _, w := range []int{2, 4} {
				o := maps.Clone(objs)
				o[obj] = tc.mutate(bytes.Clone(objs[obj]))
				sink, err := run(t, o, DecryptOptions{Workers: w})
				require.ErrorIs(t, err, ErrCorrupt)
				var ce *CorruptError
				require.ErrorAs(t, err, &ce)
				assert.Equal(t, "one", ce.File)
				assert.Equal(t, obj, ce.Object)
				assert.Contains(t, tc.chunks, ce.Chunk)
				assert.Empty(t, sink.closedFiles())
			}
		})
	}
}
