package modelcrypt

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// memSink records every call: which files were created, what was written, and which were
// closed (and whether every byte had been written before Close).
type memSink struct {
	mu      sync.Mutex
	files   map[string]*memFile
	created []string
	closed  []string
	failOn  string // Create of this path fails
}

type memFile struct {
	s       *memSink
	path    string
	mu      sync.Mutex
	data    []byte
	written []bool // per byte (small tests only)
	closed  bool
}

func newMemSink() *memSink { return &memSink{files: map[string]*memFile{}} }

func (s *memSink) Create(path string, size int64) (File, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if path == s.failOn {
		return nil, fmt.Errorf("create refused")
	}
	if _, ok := s.files[path]; ok {
		return nil, fmt.Errorf("created twice: %s", path)
	}
	f := &memFile{s: s, path: path, data: make([]byte, size), written: make([]bool, size)}
	s.files[path] = f
	s.created = append(s.created, path)
	return f, nil
}

func (f *memFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return 0, fmt.Errorf("write after close")
	}
	if off < 0 || off+int64(len(p)) > int64(len(f.data)) {
		return 0, fmt.Errorf("write [%d,%d) outside size %d", off, off+int64(len(p)), len(f.data))
	}
	for i := range p {
		if f.written[off+int64(i)] {
			return 0, fmt.Errorf("byte %d written twice", off+int64(i))
		}
		f.written[off+int64(i)] = true
	}
	copy(f.data[off:], p)
	return len(p), nil
}

func (f *memFile) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return fmt.Errorf("closed twice")
	}
	for i, w := range f.written {
		if !w {
			return fmt.Errorf("closed with byte %d unwritten", i)
		}
	}
	f.closed = true
	f.s.mu.Lock()
	f.s.closed = append(f.s.closed, f.path)
	f.s.mu.Unlock()
	return nil
}

// closedFiles returns the closed paths, sorted.
func (s *memSink) closedFiles() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := append([]string(nil), s.closed...)
	sort.Strings(c)
	return c
}

// testKey returns a deterministic key.
func testKey(b byte) []byte { return bytes.Repeat([]byte{b}, KeySize) }

// seededRand is a deterministic io.Reader for salts.
type seededRand struct{ r *rand.ChaCha8 }

func newSeededRand(seed byte) io.Reader {
	var s [32]byte
	s[0] = seed
	return &seededRand{rand.NewChaCha8(s)}
}

func (r *seededRand) Read(p []byte) (int, error) { return r.r.Read(p) }

// writeInputs writes files (name → content) under dir and returns the InputFiles sorted by name.
func writeInputs(t testing.TB, dir string, files map[string][]byte) []InputFile {
	t.Helper()
	var out []InputFile
	for name, data := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, data, 0o644))
		out = append(out, InputFile{Name: name, Path: p})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// pattern returns n deterministic pseudo-random bytes.
func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// encryptTo encrypts files into a fresh directory and returns it.
func encryptTo(t testing.TB, key []byte, files map[string][]byte, opts EncryptOptions) (string, *Manifest) {
	t.Helper()
	base := t.TempDir()
	in := writeInputs(t, filepath.Join(base, "in"), files)
	dst := filepath.Join(base, "enc")
	man, err := Encrypt(context.Background(), key, in, dst, opts)
	require.NoError(t, err)
	return dst, man
}

// decryptDir opens, unlocks and decrypts the model in dir into a memSink.
func decryptDir(t testing.TB, dir string, key []byte, opts DecryptOptions) (*memSink, *Stats, error) {
	t.Helper()
	src := DirSource(dir)
	m, err := Open(context.Background(), src)
	if err != nil {
		return nil, nil, err
	}
	if err := m.Unlock(key); err != nil {
		return nil, nil, err
	}
	sink := newMemSink()
	st, err := m.Decrypt(context.Background(), src, sink, opts)
	return sink, st, err
}

// memSource serves objects from memory; it counts Opens.
type memSource struct {
	mu    sync.Mutex
	objs  map[string][]byte
	opens map[string]int
}

func (s *memSource) Open(_ context.Context, name string, off int64) (io.ReadCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.objs[name]
	if !ok {
		return nil, fmt.Errorf("open %s: %w", name, fs.ErrNotExist)
	}
	if s.opens == nil {
		s.opens = map[string]int{}
	}
	s.opens[name]++
	return io.NopCloser(bytes.NewReader(b[min(off, int64(len(b))):])), nil
}

// loadDir reads every object of an encrypted model directory into memory.
func loadDir(t testing.TB, dir string) map[string][]byte {
	t.Helper()
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	objs := map[string][]byte{}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".tmp") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		require.NoError(t, err)
		objs[e.Name()] = b
	}
	return objs
}
