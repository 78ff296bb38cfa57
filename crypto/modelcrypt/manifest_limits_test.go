package modelcrypt

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A hostile header (no key needed, read at Open) must not make the manifest parser allocate
// far more than the manifest's own size (SPEC.md §8: the manifest limit bounds the parser's
// memory). Tiny array elements ({} or null) used to cost ~150 bytes of Go structs per 3 bytes
// of JSON: 2.4 GB allocated (1.3 GB resident) for one 16 MiB manifest.
func TestManifestParserMemoryBounded(t *testing.T) {
	digest := `"sha256":"` + strings.Repeat("0", 64) + `"`
	for name, c := range map[string]struct{ head, elem, tail string }{
		"empty files": {`{"chunk_size":64,"files":[`, `{},`, `{}],"kind":"files","shard_size":64}`},
		"null files":  {`{"chunk_size":64,"files":[`, `null,`, `null],"kind":"files","shard_size":64}`},
		"empty shards": {`{"chunk_size":64,"files":[{"path":"a",` + digest + `,"shards":[`, `{},`,
			`{}],"size":0}],"kind":"files","shard_size":64}`},
		"null shards": {`{"chunk_size":64,"files":[{"path":"a",` + digest + `,"shards":[`, `null,`,
			`null],"size":0}],"kind":"files","shard_size":64}`},
	} {
		t.Run(name, func(t *testing.T) {
			var b bytes.Buffer
			b.WriteString(c.head)
			for b.Len() < MaxManifestSize-len(c.elem)-len(c.tail) {
				b.WriteString(c.elem)
			}
			b.WriteString(c.tail)
			require.LessOrEqual(t, b.Len(), MaxManifestSize)

			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := parseManifest(b.Bytes())
			runtime.ReadMemStats(&after)
			require.ErrorIs(t, err, ErrCorrupt)
			alloc := after.TotalAlloc - before.TotalAlloc
			require.Less(t, alloc, uint64(8*b.Len()), "allocated %d MiB to reject a %d MiB manifest", alloc>>20, b.Len()>>20)
		})
	}
}

// ParseHeader keeps its own copy: changing the caller's bytes afterwards does not change what
// Unlock authenticates.
func TestParseHeaderCopies(t *testing.T) {
	key := testKey(3)
	dir, _ := encryptTo(t, key, map[string][]byte{"a.bin": pattern(1, 1000)}, EncryptOptions{ChunkSize: 64, ShardSize: 640})
	b, err := os.ReadFile(filepath.Join(dir, HeaderObject))
	require.NoError(t, err)
	m, err := ParseHeader(b)
	require.NoError(t, err)
	for i := range b {
		b[i] ^= 0xff
	}
	require.NoError(t, m.Unlock(key))
}

// zeroReads returns the object's bytes, then (0, nil) forever instead of io.EOF.
type zeroReads struct{ src Source }

type zeroAfter struct{ r io.Reader }

func (z zeroAfter) Read(p []byte) (int, error) {
	n, err := z.r.Read(p)
	if err == io.EOF {
		return n, nil
	}
	return n, err
}
func (zeroAfter) Close() error { return nil }

func (s zeroReads) Open(ctx context.Context, name string, off int64) (io.ReadCloser, error) {
	rc, err := s.src.Open(ctx, name, off)
	if err != nil || name == HeaderObject {
		return rc, err
	}
	return zeroAfter{rc}, nil
}

// A source whose reader never reports the end of an object is an error, not a hang.
func TestSourceWithoutEOF(t *testing.T) {
	key := testKey(4)
	dir, _ := encryptTo(t, key, map[string][]byte{"a.bin": pattern(2, 1000)}, EncryptOptions{ChunkSize: 64, ShardSize: 640})
	src := zeroReads{DirSource(dir)}
	m, err := Open(context.Background(), src)
	require.NoError(t, err)
	require.NoError(t, m.Unlock(key))
	done := make(chan error, 1)
	go func() {
		_, err := m.Decrypt(context.Background(), src, newMemSink(), DecryptOptions{Workers: 1})
		done <- err
	}()
	select {
	case err := <-done:
		require.ErrorIs(t, err, io.ErrNoProgress)
	case <-time.After(10 * time.Second):
		t.Fatal("Decrypt hung on a reader that never ends")
	}
}
