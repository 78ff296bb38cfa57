package modelcrypt

import (
	"bytes"
	"context"
	"errors"
	"io"
	"maps"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// raSource is a memSource that asks for read-ahead (like the agent's HTTP source), so
// Decrypt reads every object on a goroutine of its own ahead of decryption.
type raSource struct{ memSource }

func (*raSource) ReadAhead() bool { return true }

func runRA(t *testing.T, objs map[string][]byte, opts DecryptOptions) (*memSink, error) {
	t.Helper()
	src := &raSource{memSource{objs: objs}}
	m, err := Open(context.Background(), src)
	require.NoError(t, err)
	require.NoError(t, m.Unlock(testKey(1)))
	sink := newMemSink()
	_, err = m.Decrypt(context.Background(), src, sink, opts)
	return sink, err
}

func TestReadAheadRoundTrip(t *testing.T) {
	files := map[string][]byte{"big": pattern(1, 64*40+3), "one": pattern(2, 64*9), "small": pattern(3, 10), "empty": nil}
	dir, _ := encryptTo(t, testKey(1), files, EncryptOptions{ChunkSize: 64, ShardSize: 256})
	objs := loadDir(t, dir)
	for _, w := range []int{1, 2, 3, 8} {
		for _, verify := range []bool{false, true} {
			sink, err := runRA(t, objs, DecryptOptions{Workers: w, VerifyDigests: verify})
			require.NoError(t, err)
			for p, want := range files {
				assert.True(t, bytes.Equal(want, sink.files[p].data), p)
			}
			assert.Len(t, sink.closedFiles(), len(files))
		}
	}
}

// The corruption classes are caught the same way when objects are read ahead.
func TestReadAheadCorruption(t *testing.T) {
	objs, man := fixture(t, 1)
	a1 := objOf(man, "a", 1)
	a2 := objOf(man, "a", 2)
	const ec = fxChunk + tagSize
	cases := map[string]struct {
		mutate func(o map[string][]byte)
		object string
		chunk  int64
		reason string
	}{
		"truncate mid-chunk":         {func(o map[string][]byte) { o[a1] = o[a1][:ec+10] }, a1, 1, "truncated inside"},
		"truncate at chunk boundary": {func(o map[string][]byte) { o[a1] = o[a1][:ec] }, a1, 1, "ends before"},
		"drop last chunk of file":    {func(o map[string][]byte) { o[a2] = o[a2][:ec] }, a2, 1, "ends before"},
		"trailing data":              {func(o map[string][]byte) { o[a1] = append(bytes.Clone(o[a1]), 0) }, a1, -1, "trailing"},
		"reorder chunks": {func(o map[string][]byte) {
			o[a1] = append(bytes.Clone(o[a1][ec:]), o[a1][:ec]...)
		}, a1, 0, "authentication"},
		"flip ciphertext bit": {func(o map[string][]byte) {
			o[a1] = bytes.Clone(o[a1])
			o[a1][ec+3] ^= 1
		}, a1, 1, "authentication"},
		"object missing": {func(o map[string][]byte) { delete(o, a2) }, a2, -1, "missing"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			o := maps.Clone(objs)
			tc.mutate(o)
			for _, w := range []int{1, 2} {
				for _, verify := range []bool{false, true} {
					sink, err := runRA(t, o, DecryptOptions{VerifyDigests: verify, Workers: w})
					requireCorrupt(t, err, "a", tc.object, tc.chunk, tc.reason)
					assert.NotContains(t, sink.closedFiles(), "a", "an unverified file was closed")
				}
			}
		})
	}
}

// A read error is retried by the read-ahead goroutine (reopening at the chunk's offset).
func TestReadAheadRetry(t *testing.T) {
	objs, man := fixture(t, 1)
	a1 := objOf(man, "a", 1)
	src := &raFlakySource{flakySource{memSource: memSource{objs: objs}, object: a1, after: fxChunk + tagSize + 5}}
	m, err := Open(context.Background(), src)
	require.NoError(t, err)
	require.NoError(t, m.Unlock(testKey(1)))
	sink := newMemSink()
	_, err = m.Decrypt(context.Background(), src, sink, DecryptOptions{Retries: 1, Workers: 1})
	require.NoError(t, err)
	assert.Equal(t, []int64{0, fxChunk + tagSize}, src.offs, "reopened at chunk 1")
	assert.Equal(t, fixtureFiles()["a"], sink.files["a"].data)
}

type raFlakySource struct{ flakySource }

func (*raFlakySource) ReadAhead() bool { return true }

// stallSource serves one object whose body blocks after its first chunk until the
// context of its Open is cancelled.
type stallSource struct {
	raSource
	object  string
	stalled atomic.Bool
}

func (s *stallSource) Open(ctx context.Context, name string, off int64) (io.ReadCloser, error) {
	rc, err := s.memSource.Open(ctx, name, off)
	if err != nil || name != s.object {
		return rc, err
	}
	return io.NopCloser(io.MultiReader(io.LimitReader(rc, fxChunk+tagSize), readerFunc(func([]byte) (int, error) {
		s.stalled.Store(true)
		<-ctx.Done()
		return 0, ctx.Err()
	}))), nil
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// failSink fails every WriteAt, once the stallSource's read is stalled.
type failSink struct {
	*memSink
	src *stallSource
}

type failFile struct {
	File
	src *stallSource
}

func (s failSink) Create(path string, size int64) (File, error) {
	f, err := s.memSink.Create(path, size)
	return failFile{f, s.src}, err
}

func (f failFile) WriteAt([]byte, int64) (int, error) {
	for deadline := time.Now().Add(5 * time.Second); !f.src.stalled.Load() && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	return 0, errors.New("disk full")
}

// A failure of the decrypting side stops the read-ahead goroutine even while it is blocked
// in a read that would never end on its own (a stalled transfer): Decrypt returns the
// failure promptly instead of waiting for the read.
func TestReadAheadStopsStalledRead(t *testing.T) {
	files := map[string][]byte{"a": pattern(1, 64*4)}
	dir, man := encryptTo(t, testKey(1), files, EncryptOptions{ChunkSize: 64, ShardSize: 256})
	src := &stallSource{raSource: raSource{memSource{objs: loadDir(t, dir)}}, object: man.Files[0].Shards[0].Object}
	m, err := Open(context.Background(), src)
	require.NoError(t, err)
	require.NoError(t, m.Unlock(testKey(1)))
	done := make(chan error, 1)
	go func() {
		_, err := m.Decrypt(context.Background(), src, failSink{newMemSink(), src}, DecryptOptions{Workers: 1})
		done <- err
	}()
	select {
	case err := <-done:
		require.ErrorContains(t, err, "disk full")
		assert.True(t, src.stalled.Load(), "the read-ahead was blocked in the stalled read")
	case <-time.After(10 * time.Second):
		t.Fatal("Decrypt did not return while the read-ahead was stalled")
	}
}
