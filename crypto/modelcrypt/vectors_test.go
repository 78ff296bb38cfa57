package modelcrypt

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/rogpeppe/go-internal/txtar"
	"github.com/stretchr/testify/require"
)

var update = flag.Bool("update", false, "regenerate testdata/vectors")

const vectorDir = "../../testdata/vectors"

// A vector: input files, how they are encrypted, an optional mutation of the encrypted
// objects, and the outcome class a reader must report.
type vectorSpec struct {
	name, desc string
	files      [][2]string // (path, content) in order; content "@N:S" = N pattern bytes with seed S
	opts       EncryptOptions
	openKey    byte // key used to decrypt (the encryption key is always 0x01…)
	verify     bool
	mutate     func(t *testing.T, objs map[string][]byte, man *Manifest, other func(seed byte) map[string][]byte)
	expect     string // ok | wrong-key | corrupt | unsupported-version | not-model
}

func vecContent(s string) []byte {
	if rest, ok := strings.CutPrefix(s, "@"); ok {
		n, seed, _ := strings.Cut(rest, ":")
		ni, _ := strconv.Atoi(n)
		si, _ := strconv.Atoi(seed)
		return pattern(uint64(si), ni)
	}
	return []byte(s)
}

// blobName returns the Ollama blob path of content.
func blobName(content string) string {
	d := sha256.Sum256(vecContent(content))
	return "blobs/sha256-" + hex.EncodeToString(d[:])
}

func vectorSpecs() []vectorSpec {
	std := [][2]string{{"a.bin", "@330:1"}, {"b.bin", "@330:2"}, {"empty", ""}}
	o := EncryptOptions{ChunkSize: 64, ShardSize: 128, KeyHint: "kbs:///default/model/key"}
	ec := 64 + tagSize
	shardObj := func(man *Manifest, p string, j int) string { return objOf(man, p, j) }
	return []vectorSpec{
		{name: "ok-one-byte", desc: "a one-byte file", files: [][2]string{{"x", "A"}}, opts: o, expect: "ok"},
		{name: "ok-empty-file", desc: "an empty file: one shard holding one empty final chunk (16-byte tag)",
			files: [][2]string{{"empty", ""}}, opts: o, expect: "ok"},
		{name: "ok-exact-chunk", desc: "a file of exactly one chunk (64 bytes)", files: [][2]string{{"f", "@64:3"}}, opts: o, expect: "ok"},
		{name: "ok-exact-shard", desc: "a file of exactly one shard (128 bytes = 2 chunks)", files: [][2]string{{"f", "@128:4"}}, opts: o, expect: "ok"},
		{name: "ok-multi-shard", desc: "330-byte files: 3 shards (128/128/74 bytes), 2 chunks each, plus an empty file",
			files: std, opts: o, expect: "ok", verify: true},
		{name: "ok-nested-ollama", desc: "kind ollama: an Ollama store subset with nested paths",
			files: [][2]string{
				{blobName("@200:5"), "@200:5"},
				{blobName("{{ .Prompt }}"), "{{ .Prompt }}"},
				{"manifests/registry.ollama.ai/library/tiny/latest", `{"schemaVersion":2}`},
			},
			opts: EncryptOptions{ChunkSize: 64, ShardSize: 128, Kind: KindOllama, OllamaModel: "registry.ollama.ai/library/tiny:latest",
				KeyHint: "kbs:///default/ollama/tiny"}, expect: "ok", verify: true},
		{name: "ok-no-key-hint", desc: "no key hint (empty)", files: [][2]string{{"f", "hello, model\n"}},
			opts: EncryptOptions{ChunkSize: 64, ShardSize: 128}, expect: "ok"},
		{name: "ok-key-hint-changed", desc: "the key hint was replaced (it is public and unauthenticated): still decrypts",
			files: std, opts: o, expect: "ok",
			mutate: func(t *testing.T, objs map[string][]byte, _ *Manifest, _ func(byte) map[string][]byte) {
				h, err := SetKeyHint(objs[HeaderObject], "ita:8d7e5f0c-key-id")
				require.NoError(t, err)
				objs[HeaderObject] = h
			}},
		{name: "wrong-key", desc: "decrypting with another key: key commitment mismatch", files: std, opts: o, openKey: 2, expect: "wrong-key"},
		{name: "corrupt-truncated-mid-chunk", desc: "shard 1 of a.bin cut inside its second chunk", files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, man *Manifest, _ func(byte) map[string][]byte) {
				n := shardObj(man, "a.bin", 1)
				objs[n] = objs[n][:ec+10]
			}},
		{name: "corrupt-truncated-chunk-boundary", desc: "shard 1 of a.bin cut at the chunk boundary (final chunk dropped)", files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, man *Manifest, _ func(byte) map[string][]byte) {
				n := shardObj(man, "a.bin", 1)
				objs[n] = objs[n][:ec]
			}},
		{name: "corrupt-last-chunk-dropped", desc: "the last chunk of the last shard of a.bin dropped", files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, man *Manifest, _ func(byte) map[string][]byte) {
				n := shardObj(man, "a.bin", 2)
				objs[n] = objs[n][:ec]
			}},
		{name: "corrupt-empty-file-truncated", desc: "the empty file's only (empty, final) chunk removed", files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, man *Manifest, _ func(byte) map[string][]byte) {
				objs[shardObj(man, "empty", 0)] = nil
			}},
		{name: "corrupt-trailing-data", desc: "a byte appended after the final chunk of a shard", files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, man *Manifest, _ func(byte) map[string][]byte) {
				n := shardObj(man, "a.bin", 0)
				objs[n] = append(objs[n], 0)
			}},
		{name: "corrupt-reordered-chunks", desc: "the two chunks of shard 0 of a.bin swapped", files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, man *Manifest, _ func(byte) map[string][]byte) {
				n := shardObj(man, "a.bin", 0)
				b := objs[n]
				objs[n] = append(slices.Clone(b[ec:]), b[:ec]...)
			}},
		{name: "corrupt-duplicated-chunk", desc: "chunk 0 of shard 0 of a.bin stored twice (replacing chunk 1)", files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, man *Manifest, _ func(byte) map[string][]byte) {
				n := shardObj(man, "a.bin", 0)
				objs[n] = append(slices.Clone(objs[n][:ec]), objs[n][:ec]...)
			}},
		{name: "corrupt-flipped-bit", desc: "one ciphertext bit flipped in shard 2 of b.bin", files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, man *Manifest, _ func(byte) map[string][]byte) {
				objs[shardObj(man, "b.bin", 2)][3] ^= 0x10
			}},
		{name: "corrupt-shards-swapped-between-files", desc: "shard 0 of a.bin and shard 0 of b.bin swapped (same sizes)", files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, man *Manifest, _ func(byte) map[string][]byte) {
				x, y := shardObj(man, "a.bin", 0), shardObj(man, "b.bin", 0)
				objs[x], objs[y] = objs[y], objs[x]
			}},
		{name: "corrupt-shard-from-other-model", desc: "shard 1 of a.bin taken from another encryption of the same files under the same key (other salt)",
			files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, man *Manifest, other func(byte) map[string][]byte) {
				n := shardObj(man, "a.bin", 1)
				objs[n] = other(2)[n]
			}},
		{name: "corrupt-missing-object", desc: "shard 2 of b.bin missing", files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, man *Manifest, _ func(byte) map[string][]byte) {
				delete(objs, shardObj(man, "b.bin", 2))
			}},
		{name: "corrupt-file-renamed", desc: "a.bin renamed to a.bak in the manifest (length and checksum fixed up): manifest tag fails",
			files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, _ *Manifest, _ func(byte) map[string][]byte) {
				objs[HeaderObject] = rawManifestEdit(t, objs[HeaderObject], `"path":"a.bin"`, `"path":"a.bak"`)
			}},
		{name: "corrupt-header-checksum", desc: "one manifest bit flipped, checksum not fixed: caught by Open without the key",
			files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, _ *Manifest, _ func(byte) map[string][]byte) {
				objs[HeaderObject][fixedSize+20] ^= 1
			}},
		{name: "corrupt-manifest-tag", desc: "one bit of the manifest tag flipped, checksum fixed: Unlock reports tampering",
			files: std, opts: o, expect: "corrupt",
			mutate: func(t *testing.T, objs map[string][]byte, _ *Manifest, _ func(byte) map[string][]byte) {
				objs[HeaderObject][offTag] ^= 1
				objs[HeaderObject] = fixChecksum(objs[HeaderObject])
			}},
		{name: "corrupt-digest-mismatch", desc: "manifest SHA-256 of a.bin wrong but re-authenticated with the key (forged by a key holder or a buggy encryptor): only VerifyDigests detects it",
			files: std, opts: o, expect: "corrupt", verify: true,
			mutate: func(t *testing.T, objs map[string][]byte, _ *Manifest, _ func(byte) map[string][]byte) {
				objs[HeaderObject] = resign(t, objs[HeaderObject], testKey(1), func(m *Manifest) { m.Files[0].SHA256[31] ^= 1 })
			}},
		{name: "unsupported-version", desc: "header version 2 (checksum fixed)", files: std, opts: o, expect: "unsupported-version",
			mutate: func(t *testing.T, objs map[string][]byte, _ *Manifest, _ func(byte) map[string][]byte) {
				objs[HeaderObject][offVersion+1] = 2
				objs[HeaderObject] = fixChecksum(objs[HeaderObject])
			}},
		{name: "not-model", desc: "a CCZoo crypto.py style file in place of the header: wrong magic", files: std, opts: o, expect: "not-model",
			mutate: func(t *testing.T, objs map[string][]byte, _ *Manifest, _ func(byte) map[string][]byte) {
				objs[HeaderObject] = append([]byte{12, 0, 0, 0, 16, 0, 0, 0, 17, 0, 0, 0}, make([]byte, 29)...)
			}},
	}
}

// buildVector encrypts and mutates a spec and returns its archive.
func buildVector(t *testing.T, v vectorSpec) []byte {
	t.Helper()
	files := map[string][]byte{}
	for _, f := range v.files {
		files[f[0]] = vecContent(f[1])
	}
	enc := func(seed byte) (map[string][]byte, *Manifest) {
		o := v.opts
		o.Rand = newSeededRand(seed)
		o.Workers = 1
		dir, man := encryptTo(t, testKey(1), files, o)
		return loadDir(t, dir), man
	}
	objs, man := enc(1)
	if v.mutate != nil {
		v.mutate(t, objs, man, func(seed byte) map[string][]byte { o, _ := enc(seed); return o })
	}
	key := testKey(1)
	if v.openKey != 0 {
		key = testKey(v.openKey)
	}
	var c strings.Builder
	fmt.Fprintf(&c, "cai-agent encrypted model test vector (SPEC.md §9). Generated by\n")
	fmt.Fprintf(&c, "`go test ./crypto/modelcrypt -run TestVectors -update`; do not edit.\n")
	fmt.Fprintf(&c, "Each section is one object of the encrypted model, standard base64.\n\n")
	fmt.Fprintf(&c, "description: %s\n", v.desc)
	fmt.Fprintf(&c, "key: %s\n", hex.EncodeToString(key))
	fmt.Fprintf(&c, "verify-digests: %v\n", v.verify)
	outcome := runVector(t, objs, key, v.verify)
	require.True(t, strings.HasPrefix(outcome, "expect: "+v.expect), "vector %s: got %q", v.name, outcome)
	c.WriteString(outcome)
	a := &txtar.Archive{Comment: []byte(c.String())}
	names := slices.Sorted(maps.Keys(objs))
	// The header object first.
	sort.SliceStable(names, func(i, j int) bool { return names[i] == HeaderObject && names[j] != HeaderObject })
	for _, n := range names {
		a.Files = append(a.Files, txtar.File{Name: n, Data: wrap64(base64.StdEncoding.EncodeToString(objs[n]))})
	}
	return txtar.Format(a)
}

func wrap64(s string) []byte {
	var b bytes.Buffer
	for len(s) > 76 {
		b.WriteString(s[:76] + "\n")
		s = s[76:]
	}
	if s != "" {
		b.WriteString(s + "\n")
	}
	return b.Bytes()
}

// runVector decrypts objs and describes the outcome as comment lines.
func runVector(t *testing.T, objs map[string][]byte, key []byte, verify bool) string {
	t.Helper()
	src := &memSource{objs: objs}
	var sink *memSink
	err := func() error {
		m, err := Open(context.Background(), src)
		if err != nil {
			return err
		}
		if err := m.Unlock(key); err != nil {
			return err
		}
		sink = newMemSink()
		_, err = m.Decrypt(context.Background(), src, sink, DecryptOptions{Workers: 1, VerifyDigests: verify})
		return err
	}()
	var ce *CorruptError
	switch {
	case err == nil:
		var b strings.Builder
		b.WriteString("expect: ok\n")
		for _, p := range sink.closedFilesInOrder() {
			d := sha256.Sum256(sink.files[p].data)
			fmt.Fprintf(&b, "file: %s %d %s\n", hex.EncodeToString(d[:]), len(sink.files[p].data), p)
		}
		return b.String()
	case errors.As(err, &ce):
		return fmt.Sprintf("expect: corrupt\nfile: %q\nobject: %q\nchunk: %d\n", ce.File, ce.Object, ce.Chunk)
	case errors.Is(err, ErrWrongKey):
		return "expect: wrong-key\n"
	case errors.Is(err, ErrUnsupportedVersion):
		return "expect: unsupported-version\n"
	case errors.Is(err, ErrNotModel):
		return "expect: not-model\n"
	}
	t.Fatalf("unexpected error class: %v", err)
	return ""
}

func (s *memSink) closedFilesInOrder() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, p := range s.created {
		if s.files[p].closed {
			out = append(out, p)
		}
	}
	return out
}

// TestVectors checks every testdata/vectors/*.txtar: decrypting its objects with its key
// must give exactly the recorded outcome (plaintext digests, or error class and location).
// It also regenerates each vector and requires byte equality, so the vectors track the code;
// -update rewrites them.
func TestVectors(t *testing.T) {
	specs := vectorSpecs()
	if *update {
		require.NoError(t, os.MkdirAll(vectorDir, 0o755))
		old, _ := filepath.Glob(filepath.Join(vectorDir, "*.txtar"))
		for _, p := range old {
			require.NoError(t, os.Remove(p))
		}
		for _, v := range specs {
			require.NoError(t, os.WriteFile(filepath.Join(vectorDir, v.name+".txtar"), buildVector(t, v), 0o644))
		}
	}
	paths, err := filepath.Glob(filepath.Join(vectorDir, "*.txtar"))
	require.NoError(t, err)
	require.Len(t, paths, len(specs), "vector files vs specs (run with -update)")
	byName := map[string]vectorSpec{}
	for _, v := range specs {
		byName[v.name] = v
	}
	for _, p := range paths {
		name := strings.TrimSuffix(filepath.Base(p), ".txtar")
		t.Run(name, func(t *testing.T) {
			raw, err := os.ReadFile(p)
			require.NoError(t, err)
			a := txtar.Parse(raw)
			fields := map[string]string{}
			var expect strings.Builder
			inExpect := false
			for _, line := range strings.Split(string(a.Comment), "\n") {
				k, val, ok := strings.Cut(line, ": ")
				if !ok {
					continue
				}
				if k == "expect" {
					inExpect = true
				}
				if inExpect {
					expect.WriteString(line + "\n")
				} else {
					fields[k] = val
				}
			}
			key, err := hex.DecodeString(fields["key"])
			require.NoError(t, err)
			objs := map[string][]byte{}
			for _, f := range a.Files {
				b, err := base64.StdEncoding.DecodeString(strings.ReplaceAll(string(f.Data), "\n", ""))
				require.NoError(t, err)
				objs[f.Name] = b
			}
			got := runVector(t, objs, key, fields["verify-digests"] == "true")
			require.Equal(t, expect.String(), got)

			v, ok := byName[name]
			require.True(t, ok, "no spec for vector %s", name)
			require.Equal(t, string(raw), string(buildVector(t, v)), "vector is stale: run with -update")
		})
	}
}

// TestVectorsIndependent decrypts every vector with testdata/specdec.py, a second
// implementation written from SPEC.md alone (Python, pyca/cryptography). Skipped when
// python3 or its cryptography package is missing.
func TestVectorsIndependent(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("no python3")
	}
	if exec.Command(py, "-c", "import cryptography.hazmat.primitives.ciphers.aead").Run() != nil {
		t.Skip("python3 has no cryptography package")
	}
	paths, err := filepath.Glob(filepath.Join(vectorDir, "*.txtar"))
	require.NoError(t, err)
	require.NotEmpty(t, paths)
	out, err := exec.Command(py, append([]string{"testdata/specdec.py"}, paths...)...).CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Equal(t, len(paths), strings.Count(string(out), "PASS "), "%s", out)
}
