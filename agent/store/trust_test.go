package store

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
)

// Someone who can write OUT's directories swaps a published file for a same-size file of its
// own right after our rename, before the publish record is written. The record must pin the
// inode we renamed (ours, verified), not whatever the path names a moment later; otherwise a
// rerun trusts the swapped file from the record and reports the model as already published.
func TestRecordPinsRenamedInode(t *testing.T) {
	files := map[string][]byte{"big.bin": randBytes(rehashBelow + 4096)}
	_, enc, m := encryptedModel(t, files, modelcrypt.EncryptOptions{ChunkSize: 64 << 10, ShardSize: 1 << 20})
	out := shmDir(t)
	big := filepath.Join(out, "big.bin")
	testHookRenamed = func(rel string) {
		if rel != "big.bin" {
			return
		}
		// The swap: another inode, same size, other content.
		require.NoError(t, os.WriteFile(big+".evil", make([]byte, len(files["big.bin"])), 0o644))
		require.NoError(t, os.Rename(big+".evil", big))
	}
	_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	testHookRenamed = nil
	require.NoError(t, err)

	res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	assert.False(t, res.AlreadyPublished, "the swapped file was trusted from the publish record")
	assert.Equal(t, 1, res.Files)
	requireTree(t, out, files)
}

// Published files and the directories the publisher creates must be readable by Ollama (often
// another user) whatever the process umask; nothing is writable by group or others.
func TestPublishedModesIgnoreUmask(t *testing.T) {
	_, enc, m := encryptedModel(t, testFiles, modelcrypt.EncryptOptions{})
	out := shmDir(t)
	old := syscall.Umask(0o077)
	_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	syscall.Umask(old)
	require.NoError(t, err)
	requireTree(t, out, testFiles)
	err = filepath.WalkDir(out, func(p string, d fs.DirEntry, err error) error {
		require.NoError(t, err)
		if d.Name() == MetaDir {
			return filepath.SkipDir
		}
		if p == out {
			return nil
		}
		st, err := os.Lstat(p)
		require.NoError(t, err)
		want := fs.FileMode(0o644)
		if d.IsDir() {
			want = 0o755
		}
		assert.Equal(t, want, st.Mode().Perm(), p)
		return nil
	})
	require.NoError(t, err)
}

// A published file that someone else can write (group/other-writable, or owned by another
// user) may change after it was checked without leaving a trace, and one with a mode other
// than 0644 may be unreadable for the runtime: neither is trusted as published, each is
// replaced by our own copy.
func TestWritableByOthersNotTrusted(t *testing.T) {
	_, enc, m := encryptedModel(t, testFiles, modelcrypt.EncryptOptions{})
	out := shmDir(t)
	_, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)

	p := filepath.Join(out, "config.json")
	require.NoError(t, os.Chmod(p, 0o666))
	res, err := Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	assert.False(t, res.AlreadyPublished)
	assert.Equal(t, 1, res.Files)
	st, err := os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o644), st.Mode().Perm())
	requireTree(t, out, testFiles)

	// Nor one the runtime (often another user) could not read.
	require.NoError(t, os.Chmod(p, 0o600))
	res, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	assert.Equal(t, 1, res.Files)
	st, err = os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o644), st.Mode().Perm())

	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	require.NoError(t, os.Chown(p, 65534, 65534))
	res, err = Unpack(context.Background(), m, modelcrypt.DirSource(enc), out, Options{})
	require.NoError(t, err)
	assert.False(t, res.AlreadyPublished)
	assert.Equal(t, 1, res.Files)
	st, err = os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, uint32(os.Geteuid()), st.Sys().(*syscall.Stat_t).Uid)
}
