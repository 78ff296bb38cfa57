package ollama

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseName(t *testing.T) {
	good := map[string]string{
		"tiny":                          "registry.ollama.ai/library/tiny:latest",
		"tiny:v1":                       "registry.ollama.ai/library/tiny:v1",
		"deepseek-r1:1.5b":              "registry.ollama.ai/library/deepseek-r1:1.5b",
		"user/tiny":                     "registry.ollama.ai/user/tiny:latest",
		"cai.local/test/fake:v1":        "cai.local/test/fake:v1",
		"localhost:11434/ns/m":          "localhost:11434/ns/m:latest",
		"localhost:11434/ns/m:q4_K_M":   "localhost:11434/ns/m:q4_K_M",
		"https://example.com/ns/m:t":    "example.com/ns/m:t",
		"registry.ollama.ai/library/x":  "registry.ollama.ai/library/x:latest",
		"_x/y_.z-1:T.a-g_":              "registry.ollama.ai/_x/y_.z-1:T.a-g_",
		"TinyLlama":                     "registry.ollama.ai/library/TinyLlama:latest",
		strings.Repeat("m", 80) + ":t1": "registry.ollama.ai/library/" + strings.Repeat("m", 80) + ":t1",
	}
	for in, want := range good {
		n, err := ParseName(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, n.String(), in)
	}
	n, _ := ParseName("cai.local/test/fake:v1")
	assert.Equal(t, "manifests/cai.local/test/fake/v1", n.ManifestPath())

	bad := []string{
		"", ":", "tiny:", "-tiny", ".tiny", "ti ny", "tiny:v:1", "a.b/m", "h/a.b/m", "ns/m:t/x",
		"tiny@sha256:00", "m:" + strings.Repeat("t", 81), strings.Repeat("m", 81), "h//m", "/m", "m/",
		"ns/mo:del/x", "tïny", "a/b/c/d/e:f:g",
	}
	for _, in := range bad {
		_, err := ParseName(in)
		require.ErrorIs(t, err, ErrInvalidName, "%q", in)
	}
}

func TestDigests(t *testing.T) {
	h := strings.Repeat("ab", 32)
	p, err := BlobPath("sha256:" + h)
	require.NoError(t, err)
	assert.Equal(t, "blobs/sha256-"+h, p)
	for _, d := range []string{"sha256-" + h, "sha256:" + h[:63], "sha256:" + h + "0", "sha512:" + h, "sha256:" + strings.Repeat("zz", 32), "sha256:../../etc/passwd"} {
		_, err := BlobPath(d)
		require.ErrorIs(t, err, ErrInvalidManifest, d)
	}
}

func TestParseManifest(t *testing.T) {
	d := "sha256:" + strings.Repeat("01", 32)
	ok := `{"schemaVersion":2,"mediaType":"` + MediaTypeManifest + `","config":{"mediaType":"` + MediaTypeConfig + `","digest":"` + d + `","size":3},"layers":[{"mediaType":"` + MediaTypeModel + `","digest":"` + d + `","size":3}]}`
	m, err := ParseManifest([]byte(ok))
	require.NoError(t, err)
	assert.Equal(t, []string{d}, m.Blobs())
	for name, b := range map[string]string{
		"version":   strings.Replace(ok, `"schemaVersion":2`, `"schemaVersion":1`, 1),
		"no layers": `{"schemaVersion":2,"layers":[]}`,
		"digest":    strings.Replace(ok, `"layers":[{"mediaType":"`+MediaTypeModel+`","digest":"`+d, `"layers":[{"mediaType":"`+MediaTypeModel+`","digest":"sha256:x`, 1),
		"trailing":  ok + "{}",
		"json":      `{"schemaVersion":`,
		"negative":  strings.Replace(ok, `"size":3}]`, `"size":-1}]`, 1),
		"no type":   strings.Replace(ok, `"mediaType":"`+MediaTypeModel+`",`, ``, 1),
	} {
		_, err := ParseManifest([]byte(b))
		require.ErrorIs(t, err, ErrInvalidManifest, name)
	}
	// An empty config (Ollama loads such models) is accepted.
	_, err = ParseManifest([]byte(`{"schemaVersion":2,"config":{},"layers":[{"mediaType":"a","digest":"` + d + `","size":0}]}`))
	require.NoError(t, err)
}

func TestWriteModelAndModelFiles(t *testing.T) {
	store := t.TempDir()
	gguf := filepath.Join(t.TempDir(), "model.gguf")
	require.NoError(t, os.WriteFile(gguf, []byte("GGUF fake weights"), 0o644))
	tmpl := []byte("{{ .Prompt }}")
	digest, err := WriteModel(store, "cai.local/test/tiny:v1", []Layer{
		{MediaType: MediaTypeModel, Path: gguf},
		{MediaType: MediaTypeTemplate, Data: tmpl},
		{MediaType: MediaTypeParams, Data: []byte(`{"use_mmap":true}`)},
	})
	require.NoError(t, err)
	mb, err := os.ReadFile(filepath.Join(store, "manifests/cai.local/test/tiny/v1"))
	require.NoError(t, err)
	sum := sha256.Sum256(mb)
	assert.Equal(t, hex.EncodeToString(sum[:]), digest)
	got, err := ManifestDigest(store, "cai.local/test/tiny:v1")
	require.NoError(t, err)
	assert.Equal(t, digest, got)

	m, err := ParseManifest(mb)
	require.NoError(t, err)
	require.Len(t, m.Layers, 3)
	ts := sha256.Sum256(tmpl)
	assert.Equal(t, "sha256:"+hex.EncodeToString(ts[:]), m.Layers[1].Digest)
	assert.Equal(t, int64(len(tmpl)), m.Layers[1].Size)
	assert.Equal(t, MediaTypeConfig, m.Config.MediaType)

	files, err := ModelFiles(store, "cai.local/test/tiny:v1")
	require.NoError(t, err)
	require.Len(t, files, 5) // manifest + 3 layers + config
	assert.Equal(t, "manifests/cai.local/test/tiny/v1", files[0].Name)
	for _, f := range files[1:] {
		b, err := os.ReadFile(f.Path)
		require.NoError(t, err)
		s := sha256.Sum256(b)
		assert.Equal(t, "blobs/sha256-"+hex.EncodeToString(s[:]), f.Name, "blob content matches its name")
	}
	// No temporary files left behind; nothing but blobs in blobs/.
	ents, err := os.ReadDir(store)
	require.NoError(t, err)
	for _, e := range ents {
		assert.Contains(t, []string{"blobs", "manifests"}, e.Name())
	}
	blobs, err := os.ReadDir(filepath.Join(store, "blobs"))
	require.NoError(t, err)
	assert.Len(t, blobs, 4)

	// Another model in the same store is not included.
	_, err = WriteModel(store, "other", []Layer{{MediaType: MediaTypeModel, Data: []byte("other weights")}})
	require.NoError(t, err)
	files2, err := ModelFiles(store, "cai.local/test/tiny:v1")
	require.NoError(t, err)
	assert.Equal(t, files, files2)

	// Missing model, missing blob, wrong size, symlinked blob.
	_, err = ModelFiles(store, "nope")
	require.ErrorIs(t, err, ErrNotFound)
	blob := filepath.Join(store, filepath.FromSlash(files[1].Name))
	require.NoError(t, os.Rename(blob, blob+".x"))
	_, err = ModelFiles(store, "cai.local/test/tiny:v1")
	require.ErrorIs(t, err, ErrNotFound)
	require.NoError(t, os.Symlink(blob+".x", blob))
	_, err = ModelFiles(store, "cai.local/test/tiny:v1")
	require.ErrorContains(t, err, "not a regular file")
	require.NoError(t, os.Remove(blob))
	require.NoError(t, os.WriteFile(blob, []byte("short"), 0o644))
	_, err = ModelFiles(store, "cai.local/test/tiny:v1")
	require.ErrorIs(t, err, ErrInvalidManifest)

	_, err = WriteModel(store, "bad name!", []Layer{{MediaType: MediaTypeModel, Data: []byte("x")}})
	require.ErrorIs(t, err, ErrInvalidName)
	_, err = WriteModel(store, "x", []Layer{{MediaType: MediaTypeModel}})
	require.Error(t, err)
}

func FuzzParseName(f *testing.F) {
	for _, s := range []string{"tiny", "a/b/c:d", "localhost:1/ns/m:t", "https://h/n/m"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseName(s)
		if err != nil {
			return
		}
		// A valid name round-trips and its manifest path is local and 5 elements deep.
		n2, err := ParseName(n.String())
		if err != nil || n2 != n {
			t.Fatalf("%q -> %q does not round-trip: %v", s, n.String(), err)
		}
		p := n.ManifestPath()
		if !filepath.IsLocal(p) || strings.Count(p, "/") != 4 {
			t.Fatalf("bad manifest path %q", p)
		}
	})
}

func FuzzParseManifest(f *testing.F) {
	f.Add([]byte(`{"schemaVersion":2,"config":{},"layers":[{"mediaType":"a","digest":"sha256:` + strings.Repeat("0", 64) + `","size":0}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseManifest(b)
		if err != nil {
			return
		}
		for _, d := range m.Blobs() {
			p, err := BlobPath(d)
			if err != nil || !filepath.IsLocal(p) {
				t.Fatalf("accepted digest %q", d)
			}
		}
	})
}
