package store

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/agent/ollama"
	"github.com/cai-agent/cai-agent/crypto/ccz"
	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
)

// shmDir returns a fresh directory on tmpfs (/dev/shm), or skips.
func shmDir(t *testing.T) string {
	t.Helper()
	if CheckTmpfs("/dev/shm") != nil {
		t.Skip("/dev/shm is not a tmpfs here")
	}
	d, err := os.MkdirTemp("/dev/shm", "cai-store-test-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// diskDir returns a fresh directory not on tmpfs, or skips.
func diskDir(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	if CheckTmpfs(d) == nil {
		t.Skip("the test temp dir is on tmpfs")
	}
	return d
}

func newKey(t *testing.T) []byte {
	k := make([]byte, modelcrypt.KeySize)
	_, err := rand.Read(k)
	require.NoError(t, err)
	return k
}

// plainTree writes files (name → content) under a new directory.
func plainTree(t *testing.T, files map[string][]byte) (string, []modelcrypt.InputFile) {
	t.Helper()
	dir := t.TempDir()
	var in []modelcrypt.InputFile
	for name, b := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, b, 0o644))
		in = append(in, modelcrypt.InputFile{Name: name, Path: p})
	}
	sort.Slice(in, func(i, j int) bool { return in[i].Name < in[j].Name })
	return dir, in
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

func encrypt(t *testing.T, key []byte, in []modelcrypt.InputFile, opts modelcrypt.EncryptOptions) string {
	t.Helper()
	if opts.ChunkSize == 0 {
		opts.ChunkSize, opts.ShardSize = 4096, 16384
	}
	dst := filepath.Join(t.TempDir(), "enc")
	_, err := modelcrypt.Encrypt(context.Background(), key, in, dst, opts)
	require.NoError(t, err)
	return dst
}

func openModel(t *testing.T, key []byte, enc string) *modelcrypt.Model {
	t.Helper()
	m, err := modelcrypt.Open(context.Background(), modelcrypt.DirSource(enc))
	require.NoError(t, err)
	require.NoError(t, m.Unlock(key))
	return m
}

// encryptedModel encrypts files (name → content) with a new key and opens and unlocks the
// result.
func encryptedModel(t *testing.T, files map[string][]byte, opts modelcrypt.EncryptOptions) (key []byte, enc string, m *modelcrypt.Model) {
	t.Helper()
	key = newKey(t)
	_, in := plainTree(t, files)
	enc = encrypt(t, key, in, opts)
	return key, enc, openModel(t, key, enc)
}

// visible lists OUT's files outside .cai-agent, relative, sorted.
func visible(t *testing.T, out string) []string {
	t.Helper()
	var got []string
	err := filepath.WalkDir(out, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(out, p)
		if d.IsDir() && rel == MetaDir {
			return filepath.SkipDir
		}
		if !d.IsDir() {
			got = append(got, filepath.ToSlash(rel))
		}
		return nil
	})
	require.NoError(t, err)
	sort.Strings(got)
	return got
}

func requireTree(t *testing.T, out string, files map[string][]byte) {
	t.Helper()
	var names []string
	for n, b := range files {
		names = append(names, n)
		got, err := os.ReadFile(filepath.Join(out, filepath.FromSlash(n)))
		require.NoError(t, err, n)
		require.True(t, bytes.Equal(b, got), "%s differs", n)
	}
	sort.Strings(names)
	require.Equal(t, names, visible(t, out))
}

var testFiles = map[string][]byte{
	"config.json":                 []byte(`{"a":1}`),
	"model-00001.safetensors":     randBytes(50000),
	"sub/dir/model-00002.bin":     randBytes(33000),
	"empty":                       {},
	"tokenizer/tokenizer.model.x": randBytes(4096),
}

func TestCheckTmpfs(t *testing.T) {
	require.NoError(t, CheckTmpfs(shmDir(t)))
	err := CheckTmpfs(diskDir(t))
	require.ErrorIs(t, err, ErrNotTmpfs)
	assert.Contains(t, err.Error(), "file system type 0x")
	require.Error(t, CheckTmpfs("/nonexistent/dir"))
}

func TestUnpackFilesRoundTripAndRerun(t *testing.T) {
	_, enc, m := encryptedModel(t, testFiles, modelcrypt.EncryptOptions{})
	out := filepath.Join(shmDir(t), "out") // created by Unpack
	var progress atomic.Int64
	res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{VerifyDigests: true, Progress: func(n int64) { progress.Add(n) }})
	require.NoError(t, err)
	requireTree(t, out, testFiles)
	sum := m.ManifestSHA256()
	assert.Equal(t, hex.EncodeToString(sum[:]), res.ManifestSHA256)
	assert.Equal(t, res.ManifestSHA256, res.ModelSHA256)
	assert.Equal(t, "files", res.Kind)
	assert.Equal(t, len(testFiles), res.Files)
	assert.Equal(t, 0, res.Skipped)
	assert.False(t, res.AlreadyPublished)
	assert.Equal(t, m.Manifest().TotalSize(), res.Bytes)
	assert.Equal(t, res.Bytes, progress.Load())
	r, err := ReadReady(out)
	require.NoError(t, err)
	assert.Equal(t, res.ManifestSHA256, r.ManifestSHA256)
	assert.Len(t, r.Files, len(testFiles))
	ents, err := os.ReadDir(filepath.Join(out, MetaDir, StagingDir))
	if err == nil {
		assert.Empty(t, ents)
	}

	// Rerun: a fast no-op.
	res, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	assert.True(t, res.AlreadyPublished)
	assert.Equal(t, 0, res.Files)
	assert.Equal(t, len(testFiles), res.Skipped)
	assert.Equal(t, int64(0), res.Bytes)
	requireTree(t, out, testFiles)

	// A file lost: only it is decrypted again, and progress still reaches the model's size
	// (identical files count as done when they are found).
	require.NoError(t, os.Remove(filepath.Join(out, "tokenizer", "tokenizer.model.x")))
	progress.Store(0)
	res, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{Progress: func(n int64) { progress.Add(n) }})
	require.NoError(t, err)
	assert.False(t, res.AlreadyPublished)
	assert.Equal(t, 1, res.Files)
	assert.Equal(t, int64(4096), res.Bytes)
	assert.Equal(t, m.Manifest().TotalSize(), progress.Load())
	requireTree(t, out, testFiles)
}

func TestUnpackRefusesNonTmpfs(t *testing.T) {
	_, enc, m := encryptedModel(t, testFiles, modelcrypt.EncryptOptions{})
	out := filepath.Join(diskDir(t), "out")
	_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.ErrorIs(t, err, ErrNotTmpfs)
	assert.Contains(t, err.Error(), out)
	assert.Empty(t, visible(t, out))
	_, err = os.Stat(filepath.Join(out, MetaDir))
	require.ErrorIs(t, err, fs.ErrNotExist, "nothing written into a refused OUT")

	// With AllowNonTmpfs it works, and a rerun re-hashes (the record is not trusted).
	res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{AllowNonTmpfs: true})
	require.NoError(t, err)
	assert.Equal(t, len(testFiles), res.Files)
	requireTree(t, out, testFiles)
	// Change a published file behind our back, keeping its size: only a re-hash notices.
	p := filepath.Join(out, "model-00001.safetensors")
	b, _ := os.ReadFile(p)
	b[0] ^= 1
	require.NoError(t, os.WriteFile(p, b, 0o644))
	res, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{AllowNonTmpfs: true})
	require.NoError(t, err)
	assert.Equal(t, 1, res.Files)
	assert.Equal(t, len(testFiles)-1, res.Skipped)
	requireTree(t, out, testFiles)
}

func TestLock(t *testing.T) {
	_, enc, m := encryptedModel(t, testFiles, modelcrypt.EncryptOptions{})
	out := shmDir(t)
	p, err := begin(out, Options{})
	require.NoError(t, err)
	_, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.ErrorIs(t, err, ErrLocked)
	assert.Contains(t, err.Error(), out)
	assert.Empty(t, visible(t, out))
	p.close()
	_, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
}

// A run refused by the lock must leave the running run's staging alone.
func TestLockedRunLeavesStaging(t *testing.T) {
	out := shmDir(t)
	p, err := begin(out, Options{})
	require.NoError(t, err)
	defer p.close()
	f, err := p.mkStaged("x/y.bin", 3)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	_, err = begin(out, Options{})
	require.ErrorIs(t, err, ErrLocked)
	_, err = os.Stat(filepath.Join(out, MetaDir, StagingDir, "x", "y.bin"))
	require.NoError(t, err, "the locked-out run removed the running run's staging")
}

func TestCorruptPublishesNothing(t *testing.T) {
	_, enc, m := encryptedModel(t, testFiles, modelcrypt.EncryptOptions{})
	man := m.Manifest()
	// Corrupt the last file's last shard: every other file decrypts fine first.
	last := man.Files[len(man.Files)-1]
	obj := filepath.Join(enc, last.Shards[len(last.Shards)-1].Object)
	b, err := os.ReadFile(obj)
	require.NoError(t, err)
	b[len(b)-1] ^= 1
	require.NoError(t, os.WriteFile(obj, b, 0o644))

	out := shmDir(t)
	_, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{Workers: 1})
	require.ErrorIs(t, err, modelcrypt.ErrCorrupt)
	var ce *modelcrypt.CorruptError
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, last.Path, ce.File)
	assert.Empty(t, visible(t, out), "nothing published")
	_, err = os.Stat(filepath.Join(out, MetaDir, StagingDir))
	require.ErrorIs(t, err, fs.ErrNotExist, "staging removed")
	_, err = ReadReady(out)
	require.ErrorIs(t, err, fs.ErrNotExist)
}

func TestBeforePublish(t *testing.T) {
	_, enc, m := encryptedModel(t, testFiles, modelcrypt.EncryptOptions{})
	out := shmDir(t)
	boom := errors.New("measurement failed")
	var seen *Result
	_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{BeforePublish: func(_ context.Context, r *Result) error {
		seen = r
		// Everything is staged at this point, nothing visible.
		assert.Empty(t, visible(t, out))
		return boom
	}})
	require.ErrorIs(t, err, boom)
	require.NotNil(t, seen)
	assert.Equal(t, len(testFiles), seen.Files)
	assert.Empty(t, visible(t, out))
}

// ollamaModel writes a small Ollama store and encrypts that model.
func ollamaModel(t *testing.T, key []byte, name string) (store string, enc string, files map[string][]byte) {
	t.Helper()
	store = t.TempDir()
	_, err := ollama.WriteModel(store, name, []ollama.Layer{
		{MediaType: ollama.MediaTypeModel, Data: append([]byte("GGUF"), randBytes(40000)...)},
		{MediaType: ollama.MediaTypeTemplate, Data: []byte("{{ .Prompt }}")},
		{MediaType: ollama.MediaTypeParams, Data: []byte(`{"use_mmap":true}`)},
	})
	require.NoError(t, err)
	in, err := ollama.ModelFiles(store, name)
	require.NoError(t, err)
	files = map[string][]byte{}
	for _, f := range in {
		b, err := os.ReadFile(f.Path)
		require.NoError(t, err)
		files[f.Name] = b
	}
	n, _ := ollama.ParseName(name)
	enc = encrypt(t, key, in, modelcrypt.EncryptOptions{Kind: modelcrypt.KindOllama, OllamaModel: n.String()})
	return store, enc, files
}

func readRecord(t *testing.T, out string) []FileInfo {
	f, err := os.Open(filepath.Join(out, MetaDir, RecordFile))
	require.NoError(t, err)
	defer f.Close()
	var fis []FileInfo
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var fi FileInfo
		require.NoError(t, json.Unmarshal(sc.Bytes(), &fi))
		fis = append(fis, fi)
	}
	return fis
}

func TestUnpackOllamaManifestLast(t *testing.T) {
	key := newKey(t)
	store, enc, files := ollamaModel(t, key, "cai.local/test/tiny:v1")
	m := openModel(t, key, enc)
	out := shmDir(t)
	var renamed []string
	testHookRenamed = func(rel string) {
		renamed = append(renamed, rel)
		if len(renamed) < len(files) {
			_, err := os.Stat(filepath.Join(out, "manifests"))
			assert.ErrorIs(t, err, fs.ErrNotExist, "manifest visible before all blobs")
		}
	}
	defer func() { testHookRenamed = nil }()
	res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	requireTree(t, out, files)
	want, err := ollama.ManifestDigest(store, "cai.local/test/tiny:v1")
	require.NoError(t, err)
	assert.Equal(t, want, res.ManifestSHA256)
	assert.Equal(t, "cai.local/test/tiny:v1", res.Name)
	assert.Equal(t, "ollama", res.Kind)
	assert.NotEqual(t, res.ManifestSHA256, res.ModelSHA256)
	got, err := ollama.ModelFiles(out, "cai.local/test/tiny:v1")
	require.NoError(t, err, "OUT is a valid Ollama store")
	assert.Len(t, got, len(files))
	// The renames happened blobs first, the manifest last.
	rec := readRecord(t, out)
	require.Len(t, rec, len(files))
	assert.Equal(t, []string{"manifests/cai.local/test/tiny/v1"}, renamed[len(renamed)-1:])
	require.Len(t, renamed, len(files))
	for _, r := range renamed[:len(renamed)-1] {
		assert.True(t, strings.HasPrefix(r, "blobs/sha256-"), r)
	}
	// Nothing but blobs in blobs/ (Ollama would delete anything else).
	ents, err := os.ReadDir(filepath.Join(out, "blobs"))
	require.NoError(t, err)
	for _, e := range ents {
		assert.Regexp(t, `^sha256-[0-9a-f]{64}$`, e.Name())
	}
	r, err := ReadReady(out)
	require.NoError(t, err)
	assert.Equal(t, "cai.local/test/tiny:v1", r.Name)
}

func TestUnpackOllamaManifestReferencesMissingBlob(t *testing.T) {
	blob := []byte("weights")
	bs := sha256.Sum256(blob)
	missing := "sha256:" + strings.Repeat("ab", 32)
	mj := `{"schemaVersion":2,"config":{},"layers":[{"mediaType":"` + ollama.MediaTypeModel + `","digest":"sha256:` + hex.EncodeToString(bs[:]) + `","size":7},{"mediaType":"` + ollama.MediaTypeTemplate + `","digest":"` + missing + `","size":3}]}`
	files := map[string][]byte{"manifests/h/n/m/t": []byte(mj), "blobs/sha256-" + hex.EncodeToString(bs[:]): blob}
	_, enc, m := encryptedModel(t, files, modelcrypt.EncryptOptions{Kind: modelcrypt.KindOllama, OllamaModel: "h/n/m:t"})
	out := shmDir(t)
	_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.ErrorContains(t, err, "references "+missing+", which the encrypted model does not contain")
	assert.Empty(t, visible(t, out))
}

func TestUnpackOllamaRejectsMisnamedBlob(t *testing.T) {
	files := map[string][]byte{"manifests/h/n/m/t": []byte(`{}`), "blobs/sha256-" + strings.Repeat("0", 64): []byte("not that digest")}
	_, enc, m := encryptedModel(t, files, modelcrypt.EncryptOptions{Kind: modelcrypt.KindOllama, OllamaModel: "h/n/m:t"})
	out := shmDir(t)
	_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.ErrorContains(t, err, "blob named after its content")
	assert.Empty(t, visible(t, out))
}

// TestCrashRecoverySimulated leaves what a crash leaves (stale staging, a partial publish
// without ready marker, a record line for a file being replaced) and reruns.
func TestCrashRecoverySimulated(t *testing.T) {
	key := newKey(t)
	_, enc, files := ollamaModel(t, key, "tiny")
	m := openModel(t, key, enc)
	out := shmDir(t)
	_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)

	// Crash state: ready marker gone, manifest not yet published, one blob missing, one blob
	// mid-replacement (invalidated in the record, garbage on disk), stale staging with junk.
	meta := filepath.Join(out, MetaDir)
	require.NoError(t, os.Remove(filepath.Join(meta, ReadyFile)))
	manifest := "manifests/registry.ollama.ai/library/tiny/latest"
	require.NoError(t, os.Remove(filepath.Join(out, manifest)))
	var blobs []string
	for n := range files {
		if strings.HasPrefix(n, "blobs/") {
			blobs = append(blobs, n)
		}
	}
	sort.Strings(blobs)
	require.NoError(t, os.Remove(filepath.Join(out, blobs[0])))
	p, err := begin(out, Options{})
	require.NoError(t, err)
	require.NoError(t, p.appendRecord(FileInfo{Path: blobs[1]}))
	p.close()
	size := int64(len(files[blobs[1]]))
	require.NoError(t, os.WriteFile(filepath.Join(out, blobs[1]), make([]byte, size), 0o644))
	require.NoError(t, os.MkdirAll(filepath.Join(meta, StagingDir, "blobs"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(meta, StagingDir, "blobs", "junk"), []byte("stale"), 0o644))

	res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	assert.False(t, res.AlreadyPublished)
	assert.Equal(t, 3, res.Files, "manifest, missing blob, invalidated blob")
	assert.Equal(t, len(files)-3, res.Skipped)
	requireTree(t, out, files)
	ents, _ := os.ReadDir(filepath.Join(meta, StagingDir))
	assert.Empty(t, ents, "stale staging removed")
	_, err = ReadReady(out)
	require.NoError(t, err)
}

// TestKillAndRerun runs Unpack in a child process, kills it with SIGKILL in the middle of
// decryption, and reruns in this process.
func TestKillAndRerun(t *testing.T) {
	if os.Getenv("CAI_STORE_CHILD") != "" {
		t.Skip("child")
	}
	key := newKey(t)
	files := map[string][]byte{}
	for i := range 6 {
		files[fmt.Sprintf("part-%d.bin", i)] = randBytes(1 << 20)
	}
	_, in := plainTree(t, files)
	enc := encrypt(t, key, in, modelcrypt.EncryptOptions{ChunkSize: 64 << 10, ShardSize: 256 << 10})
	out := shmDir(t)

	cmd := exec.Command(os.Args[0], "-test.run=^TestKillChild$", "-test.v")
	cmd.Env = append(os.Environ(), "CAI_STORE_CHILD=1", "CAI_STORE_KEY="+hex.EncodeToString(key), "CAI_STORE_ENC="+enc, "CAI_STORE_OUT="+out)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	sc := bufio.NewScanner(stdout)
	started := false
	for sc.Scan() {
		if strings.Contains(sc.Text(), "DECRYPTING") {
			started = true
			break
		}
	}
	require.True(t, started, "child never started decrypting")
	require.NoError(t, cmd.Process.Kill())
	_ = cmd.Wait()

	// The child died mid-run: staging exists, nothing is visible, no ready marker.
	assert.Empty(t, visible(t, out))
	_, err = os.Stat(filepath.Join(out, MetaDir, StagingDir))
	require.NoError(t, err, "the killed run left its staging")
	_, err = ReadReady(out)
	require.ErrorIs(t, err, fs.ErrNotExist)

	m := openModel(t, key, enc)
	res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err, "the lock died with the child")
	assert.Equal(t, len(files), res.Files)
	requireTree(t, out, files)
}

// TestKillChild is the child half of TestKillAndRerun: a slow Unpack.
func TestKillChild(t *testing.T) {
	if os.Getenv("CAI_STORE_CHILD") == "" {
		t.Skip("only run as TestKillAndRerun's child")
	}
	key, _ := hex.DecodeString(os.Getenv("CAI_STORE_KEY"))
	enc := os.Getenv("CAI_STORE_ENC")
	m := openModel(t, key, enc)
	once := false
	_, _ = Unpack(context.Background(), m, modelcrypt.DirSource(enc), os.Getenv("CAI_STORE_OUT"), Options{Workers: 1, Progress: func(int64) {
		if !once {
			once = true
			fmt.Println("DECRYPTING")
		}
		time.Sleep(50 * time.Millisecond)
	}})
	t.Fatal("the parent should have killed this process")
}

// cczFixture loads the CCZoo test input (testdata/ccz/dir), its key and the plaintext files it
// decrypts to.
func cczFixture(t *testing.T) (key []byte, in *ccz.Input, want map[string][]byte) {
	t.Helper()
	kb, err := os.ReadFile("../../testdata/ccz/key.b64")
	require.NoError(t, err)
	key = make([]byte, 32)
	_, err = hexOrB64(strings.TrimSpace(string(kb)), key)
	require.NoError(t, err)
	want = map[string][]byte{}
	for _, n := range []string{"config.json", "empty.txt", "model.safetensors", "tokenizer.json"} {
		b, err := os.ReadFile("../../testdata/ccz/plain/" + n)
		require.NoError(t, err)
		want[n] = b
	}
	in, err = ccz.Load("../../testdata/ccz/dir", ccz.Options{})
	require.NoError(t, err)
	return key, in, want
}

func TestUnpackCCZ(t *testing.T) {
	key, in, want := cczFixture(t)
	out := shmDir(t)
	res, err := UnpackCCZ(context.Background(), key, in, out, Options{}, ccz.Options{})
	require.NoError(t, err)
	requireTree(t, out, want)
	assert.Equal(t, "ccz", res.Kind)
	assert.Equal(t, 4, res.Files)
	res2, err := UnpackCCZ(context.Background(), key, in, out, Options{}, ccz.Options{})
	require.NoError(t, err)
	assert.True(t, res2.AlreadyPublished)
	assert.Equal(t, res.ManifestSHA256, res2.ManifestSHA256)

	// Wrong key: nothing published.
	out2 := shmDir(t)
	bad := append([]byte(nil), key...)
	bad[0] ^= 1
	_, err = UnpackCCZ(context.Background(), bad, in, out2, Options{}, ccz.Options{})
	require.ErrorIs(t, err, ccz.ErrAuth)
	assert.Empty(t, visible(t, out2))
	// Not tmpfs.
	_, err = UnpackCCZ(context.Background(), key, in, diskDir(t), Options{}, ccz.Options{})
	require.ErrorIs(t, err, ErrNotTmpfs)
}

func hexOrB64(s string, dst []byte) (int, error) {
	b, err := decodeB64(s)
	if err != nil {
		return 0, err
	}
	return copy(dst, b), nil
}

func decodeB64(s string) ([]byte, error) { return base64.StdEncoding.DecodeString(s) }

// TestRecordTrust covers the publish record for large files on tmpfs: trusted when its last
// line for the path matches; an invalidating line (written before a replacing rename, so a
// crash between rename and record leaves it) makes the rerun decrypt the file again.
func TestRecordTrust(t *testing.T) {
	files := map[string][]byte{"big.bin": randBytes(rehashBelow + 4096), "small.json": []byte(`{}`)}
	_, enc, m := encryptedModel(t, files, modelcrypt.EncryptOptions{ChunkSize: 64 << 10, ShardSize: 1 << 20})
	out := shmDir(t)
	_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	require.NoError(t, os.Remove(filepath.Join(out, MetaDir, ReadyFile)))

	// Untouched: both skipped (the big one from the record: size, inode and ctime match).
	res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	assert.Equal(t, 2, res.Skipped)
	assert.Equal(t, 0, res.Files)
	require.NoError(t, os.Remove(filepath.Join(out, MetaDir, ReadyFile)))

	// Overwritten in place with the same size after publishing: its ctime moved, so the record
	// is not trusted, the file is re-hashed and replaced. (Rewritten until the file system's
	// coarse ctime clock ticks, so that the change is visible in ctime at all.)
	big := filepath.Join(out, "big.bin")
	before, err := os.Stat(big)
	require.NoError(t, err)
	_, ctime0 := inodeStamp(before)
	for {
		require.NoError(t, os.WriteFile(big, make([]byte, len(files["big.bin"])), 0o644))
		st, err := os.Stat(big)
		require.NoError(t, err)
		if _, c := inodeStamp(st); c != ctime0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	require.NoError(t, os.WriteFile(filepath.Join(out, "small.json"), []byte(`[]`), 0o644))
	res, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	assert.Equal(t, 0, res.Skipped)
	assert.Equal(t, 2, res.Files, "both re-hashed and replaced")
	requireTree(t, out, files)

	// Replaced by another inode of the same size: re-hashed and replaced too.
	require.NoError(t, os.Remove(filepath.Join(out, MetaDir, ReadyFile)))
	require.NoError(t, os.WriteFile(big+".new", make([]byte, len(files["big.bin"])), 0o644))
	require.NoError(t, os.Rename(big+".new", big))
	res, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	assert.Equal(t, 1, res.Files)
	requireTree(t, out, files)

	// Invalidated in the record (crash between the invalidating line and the rename): never
	// trusted, so re-hashed — a genuine file is kept, a changed one (even within one tick of
	// the ctime clock) is replaced.
	invalidate := func() {
		require.NoError(t, os.Remove(filepath.Join(out, MetaDir, ReadyFile)))
		p, err := begin(out, Options{})
		require.NoError(t, err)
		require.NoError(t, p.appendRecord(FileInfo{Path: "big.bin"}))
		p.close()
	}
	invalidate()
	res, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	assert.Equal(t, 0, res.Files)
	assert.Equal(t, 2, res.Skipped)
	invalidate()
	require.NoError(t, os.WriteFile(big, make([]byte, len(files["big.bin"])), 0o644))
	res, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	assert.Equal(t, 1, res.Files)
	assert.Equal(t, 1, res.Skipped)
	requireTree(t, out, files)
}

// A symlink planted in OUT by someone else must not make the publisher write outside OUT:
// neither OUT/.cai-agent (lock, staging, record, ready marker) nor a model file's parent.
func TestSymlinkInOutDoesNotEscape(t *testing.T) {
	key, enc, m := encryptedModel(t, testFiles, modelcrypt.EncryptOptions{})
	outside := shmDir(t)

	// OUT/.cai-agent -> a directory outside OUT.
	out := shmDir(t)
	require.NoError(t, os.Symlink(outside, filepath.Join(out, MetaDir)))
	_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.ErrorContains(t, err, "is not a directory")
	ents, _ := os.ReadDir(outside)
	assert.Empty(t, ents, "nothing written through the planted %s symlink", MetaDir)
	assert.Equal(t, []string{MetaDir}, visible(t, out), "only the planted symlink")

	// OUT/sub -> a directory outside OUT (the model has sub/dir/model-00002.bin): a plain
	// model's OUT may hold nothing else, so the symlink is refused before anything is written.
	out = shmDir(t)
	require.NoError(t, os.Symlink(outside, filepath.Join(out, "sub")))
	_, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.ErrorIs(t, err, ErrForeignFiles)
	ents, _ = os.ReadDir(outside)
	assert.Empty(t, ents, "nothing written through the planted sub symlink")
	_, err = ReadReady(out)
	require.ErrorIs(t, err, fs.ErrNotExist)

	// An Ollama store is shared with other models, so it is not checked for foreign files:
	// there, os.Root alone keeps a planted OUT/blobs symlink from redirecting the blobs.
	_, oenc, _ := ollamaModel(t, key, "h/n/m:t")
	om := openModel(t, key, oenc)
	out = shmDir(t)
	require.NoError(t, os.Symlink(outside, filepath.Join(out, "blobs")))
	_, err = Unpack(context.Background(), om, modelcrypt.DirSource(oenc), out, Options{})
	require.ErrorContains(t, err, "escapes")
	ents, _ = os.ReadDir(outside)
	assert.Empty(t, ents, "nothing written through the planted blobs symlink")
	_, err = ReadReady(out)
	require.ErrorIs(t, err, fs.ErrNotExist)
}

// A plain-directory OUT must hold exactly the model: leftovers of another model (which a
// runtime loading the directory could pick up, unmeasured) are refused before decrypting,
// naming them; the model's own files and directories (a rerun) are fine; the Ollama store
// is shared and not checked.
func TestForeignFilesRefused(t *testing.T) {
	_, enc, m := encryptedModel(t, testFiles, modelcrypt.EncryptOptions{})
	out := shmDir(t)
	require.NoError(t, os.WriteFile(filepath.Join(out, "stale-00003.safetensors"), []byte("old"), 0o644))
	require.NoError(t, os.MkdirAll(filepath.Join(out, "sub", "olddir"), 0o755))
	_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.ErrorIs(t, err, ErrForeignFiles)
	assert.ErrorContains(t, err, "stale-00003.safetensors")
	assert.ErrorContains(t, err, "sub/olddir")
	_, err = ReadReady(out)
	require.ErrorIs(t, err, fs.ErrNotExist)

	require.NoError(t, os.Remove(filepath.Join(out, "stale-00003.safetensors")))
	require.NoError(t, os.Remove(filepath.Join(out, "sub", "olddir")))
	_, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err, "a rerun on its own files")
	assert.True(t, res.AlreadyPublished)
}

// OUT/.cai-agent created beforehand by someone else (another owner, or writable by others)
// holds the publish record that decides which files are trusted without re-hashing: a forged
// record must not make a tampered file pass as published. Such a directory is refused.
func TestForeignMetaDirRefused(t *testing.T) {
	files := map[string][]byte{"big.bin": randBytes(rehashBelow + 4096)}
	_, enc, m := encryptedModel(t, files, modelcrypt.EncryptOptions{ChunkSize: 64 << 10, ShardSize: 1 << 20})
	sum := sha256.Sum256(files["big.bin"])

	plant := func(t *testing.T, out string) {
		meta := filepath.Join(out, MetaDir)
		require.NoError(t, os.Mkdir(meta, 0o777))
		require.NoError(t, os.Chmod(meta, 0o777))
		rec, _ := json.Marshal(FileInfo{Path: "big.bin", Size: int64(len(files["big.bin"])), SHA256: hex.EncodeToString(sum[:])})
		require.NoError(t, os.WriteFile(filepath.Join(meta, RecordFile), append(rec, '\n'), 0o666))
		// A same-size file with other content.
		require.NoError(t, os.WriteFile(filepath.Join(out, "big.bin"), make([]byte, len(files["big.bin"])), 0o644))
	}
	t.Run("world-writable", func(t *testing.T) {
		out := shmDir(t)
		plant(t, out)
		res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
		require.ErrorContains(t, err, "not writable by group or others", "a world-writable %s is refused", MetaDir)
		assert.Nil(t, res)
		_, err = ReadReady(out)
		require.ErrorIs(t, err, fs.ErrNotExist)
	})
	t.Run("other owner", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root to chown")
		}
		out := shmDir(t)
		plant(t, out)
		meta := filepath.Join(out, MetaDir)
		require.NoError(t, os.Chmod(meta, 0o700))
		require.NoError(t, os.Chown(meta, 65534, 65534))
		_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
		require.ErrorContains(t, err, "owner uid 65534", "a %s owned by another user is refused", MetaDir)
		_, err = ReadReady(out)
		require.ErrorIs(t, err, fs.ErrNotExist)
	})
}

// SPEC.md §5.4: the Ollama manifest is accepted only if every blob it references is a file of
// this model, also when the manifest file is already published (skipped) by an earlier run of
// another model that did hold all its blobs.
func TestUnpackOllamaSkippedManifestStillChecked(t *testing.T) {
	key := newKey(t)
	blob := []byte("weights")
	bs := sha256.Sum256(blob)
	tmpl := []byte("tpl")
	ts := sha256.Sum256(tmpl)
	mj := []byte(`{"schemaVersion":2,"config":{},"layers":[{"mediaType":"` + ollama.MediaTypeModel + `","digest":"sha256:` + hex.EncodeToString(bs[:]) + `","size":7},{"mediaType":"` + ollama.MediaTypeTemplate + `","digest":"sha256:` + hex.EncodeToString(ts[:]) + `","size":3}]}`)
	full := map[string][]byte{"manifests/h/n/m/t": mj, "blobs/sha256-" + hex.EncodeToString(bs[:]): blob, "blobs/sha256-" + hex.EncodeToString(ts[:]): tmpl}
	_, in := plainTree(t, full)
	encA := encrypt(t, key, in, modelcrypt.EncryptOptions{Kind: modelcrypt.KindOllama, OllamaModel: "h/n/m:t"})
	out := shmDir(t)
	_, err := Unpack(context.Background(), openModel(t, key, encA), modelcrypt.DirSource(encA), out, Options{})
	require.NoError(t, err)

	// Model B: the same Ollama manifest, without the template blob it references.
	partial := map[string][]byte{"manifests/h/n/m/t": mj, "blobs/sha256-" + hex.EncodeToString(bs[:]): blob}
	_, in = plainTree(t, partial)
	encB := encrypt(t, key, in, modelcrypt.EncryptOptions{Kind: modelcrypt.KindOllama, OllamaModel: "h/n/m:t"})
	_, err = Unpack(context.Background(), openModel(t, key, encB), modelcrypt.DirSource(encB), out, Options{})
	require.ErrorContains(t, err, "which the encrypted model does not contain")
	r, err := ReadReady(out)
	require.NoError(t, err)
	assert.Len(t, r.Files, 3, "the ready marker still describes model A")
}
