package modelcrypt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Source reads the objects of an encrypted model: the files of the encrypted directory that
// `cai-agent encrypt` writes. A local directory (DirSource) and an HTTP(S) base URL (package
// agent) are the two implementations; both are untrusted: everything read is authenticated.
type Source interface {
	// Open returns the named object's bytes from offset off to its end. name is a
	// slash-separated path relative to the encrypted model's root.
	Open(ctx context.Context, name string, off int64) (io.ReadCloser, error)
}

// Sink receives decrypted plaintext files.
type Sink interface {
	// Create returns a writer for the file at path (slash-separated, relative, already
	// validated by the decryptor) whose final size is size. WriteAt must be safe for
	// concurrent use on disjoint ranges.
	Create(path string, size int64) (File, error)
}

// File is a plaintext file being written by the decryptor.
type File interface {
	io.WriterAt
	// Close is called once, after every byte of the file was written and verified.
	Close() error
}

// DirSource returns a Source reading the encrypted model stored in directory dir.
func DirSource(dir string) Source { return dirSource(dir) }

type dirSource string

func (d dirSource) Open(_ context.Context, name string, off int64) (io.ReadCloser, error) {
	if !filepath.IsLocal(filepath.FromSlash(name)) {
		return nil, fmt.Errorf("open %q: not a local path", name)
	}
	f, err := os.Open(filepath.Join(string(d), filepath.FromSlash(name)))
	if err != nil {
		return nil, err
	}
	if off != 0 {
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			return nil, errors.Join(err, f.Close())
		}
	}
	return f, nil
}
