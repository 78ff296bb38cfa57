package main

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// createExclusive: the file appears only complete (never while being written), never
// replaces anything (a dangling symlink included), and leaves no temporary file behind.
func TestCreateExclusive(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "key")
	require.NoError(t, createExclusive(p, 0o600, func(w io.Writer) error {
		_, err := os.Lstat(p)
		require.ErrorIs(t, err, fs.ErrNotExist, "the file must not be visible while it is written")
		_, err = w.Write([]byte("secret\n"))
		return err
	}))
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	assert.Equal(t, "secret\n", string(b))
	st, err := os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o600), st.Mode().Perm())

	// Refuses an existing file and leaves it alone.
	err = createExclusive(p, 0o600, func(w io.Writer) error { _, err := w.Write([]byte("other")); return err })
	require.ErrorIs(t, err, fs.ErrExist)
	b, _ = os.ReadFile(p)
	assert.Equal(t, "secret\n", string(b))

	// Refuses a dangling symlink: nothing is created at its target.
	link, target := filepath.Join(dir, "link"), filepath.Join(dir, "target")
	require.NoError(t, os.Symlink(target, link))
	require.ErrorIs(t, createExclusive(link, 0o600, func(io.Writer) error { return nil }), fs.ErrExist)
	assert.NoFileExists(t, target)

	// A failed write leaves nothing.
	boom := errors.New("boom")
	require.ErrorIs(t, createExclusive(filepath.Join(dir, "failed"), 0o644, func(w io.Writer) error {
		w.Write([]byte("partial"))
		return boom
	}), boom)
	assert.NoFileExists(t, filepath.Join(dir, "failed"))

	// Mode as asked, whatever the umask.
	require.NoError(t, createExclusive(filepath.Join(dir, "pub"), 0o644, func(io.Writer) error { return nil }))
	st, err = os.Stat(filepath.Join(dir, "pub"))
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o644), st.Mode().Perm())

	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	assert.ElementsMatch(t, []string{"key", "link", "pub"}, names, "no temporary files left")
}

// writeFileAtomic (evidence --out) replaces a regular file or a symlink, never writing through
// the link; a FIFO or a device at the path is refused, not replaced by a regular file.
func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "quote")
	require.NoError(t, writeFileAtomic(p, []byte("one"), 0o644))
	require.NoError(t, writeFileAtomic(p, []byte("two"), 0o644))
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	assert.Equal(t, "two", string(b))

	victim, link := filepath.Join(dir, "victim"), filepath.Join(dir, "link")
	require.NoError(t, os.WriteFile(victim, []byte("keep"), 0o644))
	require.NoError(t, os.Symlink(victim, link))
	require.NoError(t, writeFileAtomic(link, []byte("new"), 0o644))
	b, _ = os.ReadFile(victim)
	assert.Equal(t, "keep", string(b))
	st, err := os.Lstat(link)
	require.NoError(t, err)
	assert.True(t, st.Mode().IsRegular())

	fifo := filepath.Join(dir, "quote.fifo")
	require.NoError(t, syscall.Mkfifo(fifo, 0o644))
	err = writeFileAtomic(fifo, []byte("quote"), 0o644)
	require.ErrorContains(t, err, "is a named pipe, not a regular file")
	st, err = os.Lstat(fifo)
	require.NoError(t, err)
	assert.NotZero(t, st.Mode()&os.ModeNamedPipe, "the FIFO is still there")

	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, ents, 4, "no temporary files left")
}
