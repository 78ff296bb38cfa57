package modelcrypt

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestShardReaderAndDecryptChunk(t *testing.T) {
	objs, man := fixture(t, 1)
	src := &memSource{objs: objs}
	m, err := Open(context.Background(), src)
	require.NoError(t, err)
	_, err = m.ShardReader(context.Background(), src, 0, 0)
	require.ErrorIs(t, err, ErrLocked)
	require.NoError(t, m.Unlock(testKey(1)))
	want := fixtureFiles()["a"]
	var got []byte
	for j, s := range man.Files[0].Shards {
		r, err := m.ShardReader(context.Background(), src, 0, j)
		require.NoError(t, err)
		b, err := io.ReadAll(r)
		require.NoError(t, err)
		require.NoError(t, r.Close())
		assert.Equal(t, want[s.Offset:s.Offset+s.Size], b)
		got = append(got, b...)
		// Random access: every chunk on its own.
		obj := objs[s.Object]
		for i := range s.Chunks {
			off := m.ChunkOffset(i)
			end := min(off+fxChunk+tagSize, int64(len(obj)))
			pt, err := m.DecryptChunk(nil, 0, j, i, obj[off:end])
			require.NoError(t, err)
			assert.Equal(t, want[s.Offset+i*fxChunk:s.Offset+i*fxChunk+int64(len(pt))], pt)
			// A chunk presented at the wrong index fails.
			if s.Chunks > 1 {
				_, err := m.DecryptChunk(nil, 0, j, (i+1)%s.Chunks, obj[off:end])
				require.ErrorIs(t, err, ErrCorrupt)
			}
		}
	}
	assert.Equal(t, want, got)

	// Empty file: one empty chunk.
	r, err := m.ShardReader(context.Background(), src, 2, 0)
	require.NoError(t, err)
	b, err := io.ReadAll(r)
	require.NoError(t, err)
	assert.Empty(t, b)

	// A truncated shard: Read yields only verified chunks, then the error.
	a1 := man.Files[0].Shards[1].Object
	src.objs[a1] = objs[a1][:fxChunk+tagSize+3]
	r, err = m.ShardReader(context.Background(), src, 0, 1)
	require.NoError(t, err)
	b, err = io.ReadAll(r)
	require.ErrorIs(t, err, ErrCorrupt)
	assert.Equal(t, want[fxShard:fxShard+fxChunk], b)

	_, err = m.DecryptChunk(nil, 5, 0, 0, nil)
	require.Error(t, err)
	_, err = m.DecryptChunk(nil, 0, 0, 9, nil)
	require.Error(t, err)
}

func TestDeterministic(t *testing.T) {
	files := map[string][]byte{"x/1": pattern(1, 5000), "x/2": pattern(2, 7000), "y": pattern(3, 64*16)}
	opts := EncryptOptions{ChunkSize: 64, ShardSize: 512, KeyHint: "h"}
	opts.Rand = newSeededRand(7)
	d1, _ := encryptTo(t, testKey(3), files, opts)
	opts.Rand = newSeededRand(7)
	opts.Workers = 1
	d2, _ := encryptTo(t, testKey(3), files, opts)
	o1, o2 := loadDir(t, d1), loadDir(t, d2)
	require.Equal(t, o1, o2, "encryption with a fixed salt is deterministic, whatever the parallelism")

	var ref map[string][]byte
	for _, w := range []int{1, 2, 3, 8} {
		for range 3 {
			src := &memSource{objs: o1}
			m, err := Open(context.Background(), src)
			require.NoError(t, err)
			require.NoError(t, m.Unlock(testKey(3)))
			sink := newMemSink()
			_, err = m.Decrypt(context.Background(), src, sink, DecryptOptions{Workers: w, VerifyDigests: w%2 == 0})
			require.NoError(t, err)
			got := map[string][]byte{}
			for p, f := range sink.files {
				got[p] = f.data
			}
			if ref == nil {
				ref = got
				assert.Equal(t, files, got)
			}
			assert.Equal(t, ref, got)
		}
	}
}

func TestValidPath(t *testing.T) {
	good := []string{"a", "a/b", "blobs/sha256-abc", "manifests/registry.ollama.ai/library/tiny/latest", "a.b/c..d", "ünï/名前", ".hidden"}
	bad := []string{"", "/a", "a/", "a//b", "./a", "a/./b", "../a", "a/..", "..", ".", "a\\b", "a\x00b", "a\nb", "\xff",
		strings.Repeat("a", 256), strings.Repeat("a/", MaxPathSize/2+1) + "a"}
	for _, p := range good {
		assert.NoError(t, ValidPath(p), p)
	}
	for _, p := range bad {
		assert.Error(t, ValidPath(p), p)
	}
}

func TestEncryptRejects(t *testing.T) {
	dir := t.TempDir()
	in := writeInputs(t, dir, map[string][]byte{"a": []byte("x"), "b": []byte("y")})
	ctx := context.Background()
	enc := func(key []byte, files []InputFile, o EncryptOptions) error {
		_, err := Encrypt(ctx, key, files, filepath.Join(t.TempDir(), "out"), o)
		return err
	}
	require.Error(t, enc(testKey(1)[:31], in, EncryptOptions{}))
	require.ErrorContains(t, enc(testKey(1), []InputFile{{Name: "a", Path: in[0].Path}, {Name: "a", Path: in[1].Path}}, EncryptOptions{}), "duplicate")
	require.ErrorContains(t, enc(testKey(1), []InputFile{{Name: "a", Path: in[0].Path}, {Name: "a/b", Path: in[1].Path}}, EncryptOptions{}), "directory")
	require.Error(t, enc(testKey(1), []InputFile{{Name: "../a", Path: in[0].Path}}, EncryptOptions{}))
	require.Error(t, enc(testKey(1), []InputFile{{Name: "d", Path: dir}}, EncryptOptions{}), "not regular")
	require.ErrorContains(t, enc(testKey(1), nil, EncryptOptions{}), "no files")
	require.ErrorContains(t, enc(testKey(1), in, EncryptOptions{ChunkSize: 10}), "chunk size")
	require.ErrorContains(t, enc(testKey(1), in, EncryptOptions{ChunkSize: 64, ShardSize: 100}), "multiple")
	require.ErrorContains(t, enc(testKey(1), in, EncryptOptions{Kind: "ollama"}), "ollama_model")
	require.ErrorContains(t, enc(testKey(1), in, EncryptOptions{Kind: "zip"}), "kind")
	require.ErrorContains(t, enc(testKey(1), in, EncryptOptions{KeyHint: "a\nb"}), "key hint")

	// Output directory: must not be a non-empty directory; failure leaves nothing behind.
	out := filepath.Join(t.TempDir(), "out")
	require.NoError(t, os.MkdirAll(out, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(out, "junk"), nil, 0o644))
	_, err := Encrypt(ctx, testKey(1), in, out, EncryptOptions{})
	require.ErrorContains(t, err, "not empty")

	empty := filepath.Join(t.TempDir(), "empty")
	require.NoError(t, os.Mkdir(empty, 0o755))
	_, err = Encrypt(ctx, testKey(1), append(in, InputFile{Name: "c", Path: filepath.Join(dir, "missing")}), empty, EncryptOptions{})
	require.Error(t, err)
	ents, _ := os.ReadDir(empty)
	assert.Empty(t, ents)

	// Ollama kind with a model name round-trips.
	d := filepath.Join(t.TempDir(), "o")
	man, err := Encrypt(ctx, testKey(1), in, d, EncryptOptions{Kind: KindOllama, OllamaModel: "registry.ollama.ai/library/tiny:latest"})
	require.NoError(t, err)
	m, err := Open(ctx, DirSource(d))
	require.NoError(t, err)
	assert.Equal(t, man, m.Manifest())
	assert.Equal(t, KindOllama, m.Manifest().Kind)
	assert.Equal(t, "registry.ollama.ai/library/tiny:latest", m.Manifest().OllamaModel)
	assert.Equal(t, int64(DefaultShardSize), m.Manifest().ShardSize)
	assert.Equal(t, sha256.Sum256(m.ManifestBytes()), m.ManifestSHA256())
	assert.True(t, bytes.HasPrefix(m.ManifestBytes(), []byte(`{"chunk_size":1048576,"files":[`)))
}

func TestManifestRejects(t *testing.T) {
	good := func() *Manifest {
		return &Manifest{Kind: KindFiles, ChunkSize: 64, ShardSize: 128, Files: []ManifestFile{
			{Path: "a", Size: 200, Shards: []Shard{{Object: "0", Offset: 0, Size: 128, Chunks: 2}, {Object: "1", Offset: 128, Size: 72, Chunks: 2}}},
			{Path: "e", Size: 0, Shards: []Shard{{Object: "2", Offset: 0, Size: 0, Chunks: 1}}},
		}}
	}
	require.NoError(t, good().validate())
	b, err := marshalManifest(good())
	require.NoError(t, err)
	_, err = parseManifest(b)
	require.NoError(t, err)
	muts := map[string]func(m *Manifest){
		"shard offset":       func(m *Manifest) { m.Files[0].Shards[1].Offset = 127 },
		"shard size":         func(m *Manifest) { m.Files[0].Shards[1].Size = 71 },
		"chunks":             func(m *Manifest) { m.Files[0].Shards[1].Chunks = 1 },
		"missing shard":      func(m *Manifest) { m.Files[0].Shards = m.Files[0].Shards[:1] },
		"extra shard":        func(m *Manifest) { m.Files[1].Shards = append(m.Files[1].Shards, Shard{Object: "3", Chunks: 1}) },
		"empty file 0 chunk": func(m *Manifest) { m.Files[1].Shards[0].Chunks = 0 },
		"duplicate object":   func(m *Manifest) { m.Files[1].Shards[0].Object = "0" },
		"header object":      func(m *Manifest) { m.Files[1].Shards[0].Object = HeaderObject },
		"object traversal":   func(m *Manifest) { m.Files[1].Shards[0].Object = "../x" },
		"object upper":       func(m *Manifest) { m.Files[1].Shards[0].Object = "X" },
		"duplicate path":     func(m *Manifest) { m.Files[1].Path = "a" },
		"path is dir":        func(m *Manifest) { m.Files[1].Path = "a/e" },
		"bad path":           func(m *Manifest) { m.Files[1].Path = "/e" },
		"negative size":      func(m *Manifest) { m.Files[1].Size = -1 },
		"huge size":          func(m *Manifest) { m.Files[1].Size = MaxFileSize + 1 },
		"chunk too small":    func(m *Manifest) { m.ChunkSize = 32; m.ShardSize = 64 },
		"chunk too big":      func(m *Manifest) { m.ChunkSize = MaxChunkSize * 2; m.ShardSize = MaxChunkSize * 2 },
		"shard not multiple": func(m *Manifest) { m.ShardSize = 100 },
		"no files":           func(m *Manifest) { m.Files = nil },
		"kind":               func(m *Manifest) { m.Kind = "x" },
		"ollama no name":     func(m *Manifest) { m.Kind = KindOllama },
		"files with name":    func(m *Manifest) { m.OllamaModel = "x" },
		"unsorted":           func(m *Manifest) { m.Files[0].Path, m.Files[1].Path = "e", "a" },
	}
	for name, mut := range muts {
		m := good()
		mut(m)
		assert.Error(t, m.validate(), name)
	}
	for name, raw := range map[string]string{
		"not canonical (space)":  strings.Replace(string(b), `"kind":`, `"kind": `, 1),
		"not canonical (order)":  strings.Replace(string(b), `{"chunk_size":64,`, `{"shard_size":128,"chunk_size":64,`, 1),
		"unknown field":          strings.Replace(string(b), `{"chunk_size"`, `{"x":1,"chunk_size"`, 1),
		"unknown field in file":  strings.Replace(string(b), `{"path"`, `{"x":1,"path"`, 1),
		"unknown field in shard": strings.Replace(string(b), `{"chunks"`, `{"a":1,"chunks"`, 1),
		"trailing":               string(b) + " {}",
		"upper hex":              strings.Replace(string(b), `"sha256":"00`, `"sha256":"0A`, 1),
		"short hex":              strings.Replace(string(b), `"sha256":"00`, `"sha256":"`, 1),
		"null":                   "null",
		"float":                  strings.Replace(string(b), `"chunk_size":64`, `"chunk_size":64.5`, 1),
	} {
		_, err := parseManifest([]byte(raw))
		require.ErrorIs(t, err, ErrCorrupt, name)
	}
}

func TestModelAccessors(t *testing.T) {
	objs, man := fixture(t, 1)
	src := &memSource{objs: objs}
	m, err := Open(context.Background(), src)
	require.NoError(t, err)
	assert.Equal(t, 1, m.Version())
	assert.False(t, m.Unlocked())
	for _, f := range man.Files {
		for _, s := range f.Shards {
			assert.Equal(t, int64(len(objs[s.Object])), s.EncryptedSize(), s.Object)
		}
	}
	assert.Equal(t, int64(660), m.Manifest().TotalSize())
	// Manifest returns a copy.
	m.Manifest().Files[0].Shards[0].Object = "changed"
	assert.Equal(t, man.Files[0].Shards[0].Object, m.Manifest().Files[0].Shards[0].Object)
	require.NoError(t, m.Unlock(testKey(1)))
	assert.True(t, m.Unlocked())
	m.Lock()
	assert.False(t, m.Unlocked())
	_, err = m.Decrypt(context.Background(), src, newMemSink(), DecryptOptions{})
	require.ErrorIs(t, err, ErrLocked)
	_, err = m.DecryptChunk(nil, 0, 0, 0, nil)
	require.ErrorIs(t, err, ErrLocked)
}

// An input that changes while it is encrypted is refused, and the output is removed.
func TestEncryptInputChanges(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		change     func(path string)
	}{
		{"shrinks", "shrank", func(p string) { require.NoError(t, os.Truncate(p, 100)) }},
		{"grows", "grew", func(p string) {
			f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
			require.NoError(t, err)
			_, err = f.Write([]byte("more"))
			require.NoError(t, err)
			require.NoError(t, f.Close())
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := writeInputs(t, t.TempDir(), map[string][]byte{"f": pattern(1, 64*4)})
			out := filepath.Join(t.TempDir(), "enc")
			var done int64
			_, err := Encrypt(context.Background(), testKey(1), in, out, EncryptOptions{ChunkSize: 64, Workers: 1,
				Progress: func(n int64) {
					done += n
					if (tc.name == "shrinks" && done == 64) || (tc.name == "grows" && done == 256) {
						tc.change(in[0].Path)
					}
				}})
			require.ErrorContains(t, err, tc.want)
			_, err = os.Stat(out)
			require.ErrorIs(t, err, os.ErrNotExist, "output removed")
		})
	}
}

// A valid manifest can list more than 2^63 bytes in total (8193 files of the maximum size
// fit easily in 16 MiB, and Open accepts it without a key): TotalSize must not wrap.
func TestTotalSizeSaturates(t *testing.T) {
	m := &Manifest{Kind: KindFiles, ChunkSize: MaxChunkSize, ShardSize: MaxFileSize}
	for i := range 8193 {
		m.Files = append(m.Files, ManifestFile{Path: fmt.Sprintf("f%05d", i), Size: MaxFileSize,
			Shards: []Shard{{Object: fmt.Sprintf("%06d", i), Size: MaxFileSize, Chunks: MaxFileSize / MaxChunkSize}}})
	}
	require.NoError(t, m.validate())
	b, err := marshalManifest(m)
	require.NoError(t, err)
	require.Less(t, len(b), MaxManifestSize)
	assert.Equal(t, int64(math.MaxInt64), m.TotalSize())
}
