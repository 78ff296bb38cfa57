package store

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/agent/ollama"
	"github.com/cai-agent/cai-agent/crypto/ccz"
	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
)

// skippedChanges are what another process may do to a file a rerun found already published
// and identical (and so skipped) while the run publishes the rest: `ollama rm` of another
// model sharing a blob deletes every blob no published manifest references, and our manifest
// is not published yet.
var skippedChanges = []struct {
	name   string
	change func(t *testing.T, path string)
}{
	{"removed", func(t *testing.T, path string) {
		require.NoError(t, os.Remove(path))
	}},
	{"replaced", func(t *testing.T, path string) {
		st, err := os.Stat(path)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(path+".new", make([]byte, st.Size()), 0o644))
		require.NoError(t, os.Rename(path+".new", path))
	}},
	{"replaced by a symlink", func(t *testing.T, path string) {
		require.NoError(t, os.Rename(path, path+".moved"))
		require.NoError(t, os.Symlink(filepath.Base(path)+".moved", path))
	}},
	{"made writable by others", func(t *testing.T, path string) {
		require.NoError(t, os.Chmod(path, 0o666))
	}},
	{"written in place", func(t *testing.T, path string) {
		// Same inode and size, other content; rewritten until the file system's coarse ctime
		// clock ticks, so that the change is visible in ctime at all.
		st, err := os.Stat(path)
		require.NoError(t, err)
		_, ctime0 := inodeStamp(st)
		for {
			require.NoError(t, os.WriteFile(path, make([]byte, st.Size()), 0o644))
			now, err := os.Stat(path)
			require.NoError(t, err)
			require.True(t, os.SameFile(st, now))
			if _, c := inodeStamp(now); c != ctime0 {
				break
			}
			time.Sleep(time.Millisecond)
		}
	}},
}

// sortedBlobs returns the blobs/ paths of an Ollama model's files, sorted.
func sortedBlobs(files map[string][]byte) []string {
	var blobs []string
	for f := range files {
		if strings.HasPrefix(f, "blobs/") {
			blobs = append(blobs, f)
		}
	}
	sort.Strings(blobs)
	return blobs
}

// changeSkippedAfterRename arranges for change to be applied to OUT/victim right after trigger
// (a file this run stages) is renamed into place, i.e. after the run found victim identical
// and before it publishes anything that vouches for victim.
func changeSkippedAfterRename(t *testing.T, out, trigger, victim string, change func(*testing.T, string)) {
	t.Helper()
	done := false
	testHookRenamed = func(rel string) {
		if rel == trigger && !done {
			done = true
			change(t, filepath.Join(out, filepath.FromSlash(victim)))
		}
	}
	t.Cleanup(func() { testHookRenamed = nil })
}

// A rerun of an Ollama model skips the blobs already published. If one of them is removed or
// replaced before the manifest is renamed in, the manifest must not be published (it would
// point at a missing or foreign blob), nor the ready marker; a rerun decrypts the blob again
// and publishes a complete model.
func TestSkippedBlobChangedBeforeManifest(t *testing.T) {
	for _, tc := range skippedChanges {
		t.Run(tc.name, func(t *testing.T) {
			key := newKey(t)
			const name = "cai.local/test/tiny:v1"
			_, enc, files := ollamaModel(t, key, name)
			m := openModel(t, key, enc)
			out := shmDir(t)
			_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
			require.NoError(t, err)

			// Crash before the manifest rename: ready marker and manifest gone, one blob too
			// (so the rerun stages a blob and the manifest, and skips the other blobs).
			n, err := ollama.ParseName(name)
			require.NoError(t, err)
			manifest := n.ManifestPath()
			blobs := sortedBlobs(files)
			require.GreaterOrEqual(t, len(blobs), 2)
			require.NoError(t, os.Remove(filepath.Join(out, MetaDir, ReadyFile)))
			require.NoError(t, os.Remove(filepath.Join(out, filepath.FromSlash(manifest))))
			require.NoError(t, os.Remove(filepath.Join(out, filepath.FromSlash(blobs[0]))))

			changeSkippedAfterRename(t, out, blobs[0], blobs[1], tc.change)
			_, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
			require.ErrorIs(t, err, ErrChanged)
			assert.ErrorContains(t, err, blobs[1])
			_, err = os.Lstat(filepath.Join(out, filepath.FromSlash(manifest)))
			require.ErrorIs(t, err, fs.ErrNotExist, "the manifest was published over a changed blob")
			_, err = ReadReady(out)
			require.ErrorIs(t, err, fs.ErrNotExist, "the ready marker was written over a changed blob")

			testHookRenamed = nil
			_ = os.Remove(filepath.Join(out, filepath.FromSlash(blobs[1])+".moved"))
			res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
			require.NoError(t, err)
			assert.False(t, res.AlreadyPublished)
			assert.Equal(t, 2, res.Files, "the manifest and the changed blob")
			assert.Equal(t, len(files)-2, res.Skipped)
			requireTree(t, out, files)
			got, err := ollama.ModelFiles(out, name)
			require.NoError(t, err, "OUT is a valid Ollama store")
			assert.Len(t, got, len(files))
			st, err := os.Lstat(filepath.Join(out, filepath.FromSlash(blobs[1])))
			require.NoError(t, err)
			assert.Equal(t, fs.FileMode(0o644), st.Mode())
			r, err := ReadReady(out)
			require.NoError(t, err)
			assert.Len(t, r.Files, len(files))
		})
	}
}

// The same for a plain-directory model: a skipped file that changes before the ready marker
// is written fails the run without the marker; a rerun completes.
func TestSkippedFileChangedBeforeReady(t *testing.T) {
	for _, tc := range skippedChanges {
		t.Run(tc.name, func(t *testing.T) {
			_, enc, m := encryptedModel(t, testFiles, modelcrypt.EncryptOptions{})
			out := shmDir(t)
			_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
			require.NoError(t, err)
			require.NoError(t, os.Remove(filepath.Join(out, MetaDir, ReadyFile)))
			require.NoError(t, os.Remove(filepath.Join(out, "config.json")))

			changeSkippedAfterRename(t, out, "config.json", "model-00001.safetensors", tc.change)
			_, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
			require.ErrorIs(t, err, ErrChanged)
			assert.ErrorContains(t, err, "model-00001.safetensors")
			_, err = ReadReady(out)
			require.ErrorIs(t, err, fs.ErrNotExist, "the ready marker was written over a changed file")

			testHookRenamed = nil
			victim := filepath.Join(out, "model-00001.safetensors")
			_ = os.Remove(victim + ".moved")
			if st, err := os.Lstat(victim); err == nil && st.Mode().Type() == fs.ModeSymlink {
				// A symlink at a model path is foreign to a plain-directory model.
				_, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
				require.ErrorIs(t, err, ErrForeignFiles)
				require.NoError(t, os.Remove(victim))
			}
			res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
			require.NoError(t, err)
			assert.Equal(t, 1, res.Files, "the changed file")
			assert.Equal(t, len(testFiles)-1, res.Skipped)
			requireTree(t, out, testFiles)
			_, err = ReadReady(out)
			require.NoError(t, err)
		})
	}
}

// The same for CCZoo input.
func TestSkippedCCZFileChangedBeforeReady(t *testing.T) {
	key, in, want := cczFixture(t)
	out := shmDir(t)
	_, err := UnpackCCZ(context.Background(), key, in, out, Options{}, ccz.Options{})
	require.NoError(t, err)
	require.NoError(t, os.Remove(filepath.Join(out, MetaDir, ReadyFile)))
	require.NoError(t, os.Remove(filepath.Join(out, "config.json")))

	changeSkippedAfterRename(t, out, "config.json", "model.safetensors", skippedChanges[0].change)
	_, err = UnpackCCZ(context.Background(), key, in, out, Options{}, ccz.Options{})
	require.ErrorIs(t, err, ErrChanged)
	assert.ErrorContains(t, err, "model.safetensors")
	_, err = ReadReady(out)
	require.ErrorIs(t, err, fs.ErrNotExist)

	testHookRenamed = nil
	res, err := UnpackCCZ(context.Background(), key, in, out, Options{}, ccz.Options{})
	require.NoError(t, err)
	assert.Equal(t, 1, res.Files)
	requireTree(t, out, want)
	_, err = ReadReady(out)
	require.NoError(t, err)
}

// An Ollama model whose manifest is already published and skipped, but a blob is not: a
// skipped blob changed after the staged blob's rename fails the run before the ready marker.
func TestSkippedBlobChangedWithSkippedManifest(t *testing.T) {
	key := newKey(t)
	_, enc, files := ollamaModel(t, key, "tiny")
	m := openModel(t, key, enc)
	out := shmDir(t)
	_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	blobs := sortedBlobs(files)
	require.NoError(t, os.Remove(filepath.Join(out, MetaDir, ReadyFile)))
	require.NoError(t, os.Remove(filepath.Join(out, filepath.FromSlash(blobs[0]))))

	changeSkippedAfterRename(t, out, blobs[0], blobs[1], skippedChanges[1].change)
	_, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.ErrorIs(t, err, ErrChanged)
	assert.ErrorContains(t, err, blobs[1])
	_, err = ReadReady(out)
	require.ErrorIs(t, err, fs.ErrNotExist)

	testHookRenamed = nil
	res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	assert.Equal(t, 1, res.Files, "the replaced blob")
	requireTree(t, out, files)
}
