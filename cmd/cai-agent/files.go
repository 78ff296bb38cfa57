package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
)

// createExclusive creates path with what write writes, never replacing anything and never
// leaving a partial file at path, even after a crash: the data goes to a new temporary file
// in path's directory (a fresh name, O_EXCL, mode perm), is synced, and is then hard-linked
// to path; link(2) fails if anything, even a dangling symlink, is at path (the error wraps
// fs.ErrExist). On a file system without hard links path is created with O_EXCL and written
// in place instead. On failure the temporary file is removed.
func createExclusive(path string, perm os.FileMode, write func(io.Writer) error) error {
	if _, err := os.Lstat(path); err == nil {
		return &fs.PathError{Op: "create", Path: path, Err: fs.ErrExist}
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := writeSynced(f, perm, write); err != nil {
		return err
	}
	err = os.Link(tmp, path)
	var le *os.LinkError
	if errors.As(err, &le) && (errors.Is(le.Err, syscall.EPERM) || errors.Is(le.Err, syscall.EOPNOTSUPP) || errors.Is(le.Err, syscall.ENOSYS)) {
		// No hard links here (e.g. vfat, some FUSE file systems).
		return createInPlace(path, perm, write)
	}
	if errors.Is(err, fs.ErrExist) {
		return &fs.PathError{Op: "create", Path: path, Err: fs.ErrExist}
	}
	if err != nil {
		return err
	}
	// The file is in place and complete; a failed directory sync only risks the entry after
	// a crash, which a rerun would see as missing.
	if err := syncDir(dir); err != nil {
		slog.Warn("created, but syncing the directory failed", "file", path, "err", err)
	}
	return nil
}

// createInPlace creates path with O_EXCL and writes it; on failure path is removed.
func createInPlace(path string, perm os.FileMode, write func(io.Writer) error) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if err := writeSynced(f, perm, write); err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

// writeSynced sets f's mode to perm (whatever the umask), writes it, syncs and closes it.
func writeSynced(f *os.File, perm os.FileMode, write func(io.Writer) error) error {
	err := f.Chmod(perm)
	if err == nil {
		err = write(f)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// writeFileAtomic replaces path with data through a new temporary file in its directory (a
// fresh name, O_EXCL, mode perm, synced) renamed into place, so path is never partial. A
// symlink at path is replaced, not followed; anything else that is not a regular file (a FIFO,
// a device such as /dev/null) is refused rather than replaced.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	if st, err := os.Lstat(path); err == nil && !st.Mode().IsRegular() && st.Mode().Type() != fs.ModeSymlink {
		return fmt.Errorf("%s is a %s, not a regular file; refusing to replace it", path, fileKind(st.Mode()))
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	err = writeSynced(f, perm, func(w io.Writer) error { _, err := w.Write(data); return err })
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
	}
	return err
}

// syncDir fsyncs a directory, so a new entry in it survives a crash.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// fileKind names the type of a file that is not a regular file.
func fileKind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m&fs.ModeNamedPipe != 0:
		return "named pipe"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeDevice != 0:
		return "device"
	}
	return "special file"
}
