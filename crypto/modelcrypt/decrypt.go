package modelcrypt

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
)

// Model is an opened encrypted model: its parsed header and manifest, and after Unlock its
// key schedule. A Model is safe for concurrent use after Unlock returns.
type Model struct {
	hdr *header
	man *Manifest
	ks  *keySchedule // nil until Unlock succeeds
	sum [32]byte
}

// Open reads and parses the public header and manifest (object HeaderObject) from src. No key
// is needed and nothing is authenticated yet: the header checksum only catches accidental
// damage. It returns ErrNotModel when src has no header object or its magic is wrong,
// ErrUnsupportedVersion for another format version, and ErrCorrupt for a malformed header.
func Open(ctx context.Context, src Source) (*Model, error) {
	rc, err := src.Open(ctx, HeaderObject, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%w: %w", ErrNotModel, err)
		}
		return nil, fmt.Errorf("modelcrypt: open %s: %w", HeaderObject, err)
	}
	defer rc.Close()
	var mg [len(magic)]byte
	if n, err := io.ReadFull(rc, mg[:]); err != nil || string(mg[:]) != magic {
		if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("modelcrypt: read %s: %w", HeaderObject, err)
		}
		_ = n
		return nil, ErrNotModel
	}
	var buf bytes.Buffer
	buf.Write(mg[:])
	if _, err := buf.ReadFrom(io.LimitReader(rc, maxHeaderSize+1-int64(len(magic)))); err != nil {
		return nil, fmt.Errorf("modelcrypt: read %s: %w", HeaderObject, err)
	}
	if buf.Len() > maxHeaderSize {
		// Another version is reported as such before anything else (SPEC.md §9), whatever
		// its size.
		if _, _, err := parseHeader(buf.Bytes()[:offVersion+2]); errors.Is(err, ErrUnsupportedVersion) {
			return nil, err
		}
		return nil, headerCorrupt("header object larger than %d bytes", maxHeaderSize)
	}
	h, man, err := parseHeader(buf.Bytes()) // our own buffer: no copy needed
	if err != nil {
		return nil, err
	}
	return &Model{hdr: h, man: man, sum: sha256.Sum256(h.manifest)}, nil
}

// ParseHeader parses a complete header object, as Open does after reading it. The Model keeps
// its own copy of b: a later change of the caller's bytes cannot make Unlock authenticate
// other bytes than those parsed.
func ParseHeader(b []byte) (*Model, error) {
	h, man, err := parseHeader(bytes.Clone(b))
	if err != nil {
		return nil, err
	}
	return &Model{hdr: h, man: man, sum: sha256.Sum256(h.manifest)}, nil
}

// Version returns the format version from the header.
func (m *Model) Version() int { return Version }

// KeyHint returns the public, unauthenticated key hint (e.g. kbs:///repo/type/tag), or "".
// It only says where to look for the key; anyone can change it, and it affects nothing else.
func (m *Model) KeyHint() string { return m.hdr.keyHint }

// Manifest returns a copy of the manifest. Before Unlock it is unauthenticated (fine for
// display, not for decisions); after Unlock it is authenticated under the key.
func (m *Model) Manifest() *Manifest {
	c := *m.man
	c.Files = make([]ManifestFile, len(m.man.Files))
	for i, f := range m.man.Files {
		f.Shards = append([]Shard(nil), f.Shards...)
		c.Files[i] = f
	}
	return &c
}

// ManifestSHA256 returns the SHA-256 of the exact manifest bytes. After Unlock these bytes
// are authenticated, so the digest identifies the model's content (it covers every file's
// path, size and plaintext SHA-256) and is what the agent measures.
func (m *Model) ManifestSHA256() [32]byte { return m.sum }

// ManifestBytes returns a copy of the exact (canonical JSON) manifest bytes.
func (m *Model) ManifestBytes() []byte { return bytes.Clone(m.hdr.manifest) }

// Unlocked reports whether Unlock succeeded.
func (m *Model) Unlocked() bool { return m.ks != nil }

// Unlock checks key against the header's key commitment (ErrWrongKey on mismatch, compared
// in constant time) and then authenticates the header and manifest (ErrCorrupt on mismatch).
// The key is not retained; only an HKDF pseudorandom key derived from it, wiped by Lock.
func (m *Model) Unlock(key []byte) error {
	ks, err := newKeySchedule(key, m.hdr.salt[:])
	if err != nil {
		return err
	}
	c := ks.commitment()
	ok := subtle.ConstantTimeCompare(c, m.hdr.commit[:]) == 1
	clear(c)
	if !ok {
		ks.zero()
		return ErrWrongKey
	}
	if subtle.ConstantTimeCompare(ks.manifestTag(m.hdr.raw, m.hdr.manifest), m.hdr.tag[:]) != 1 {
		ks.zero()
		return headerCorrupt("header/manifest authentication failed (tampered)")
	}
	m.Lock() // a second Unlock wipes the first one's key material
	m.ks = ks
	return nil
}

// Lock wipes the key material held since Unlock. The model must not be in use.
func (m *Model) Lock() {
	if m.ks != nil {
		m.ks.zero()
		m.ks = nil
	}
}

func (k *keySchedule) zero() { clear(k.prk) }

// shardAEAD returns the AES-256-GCM instance of shard j of file f.
func (m *Model) shardAEAD(f *ManifestFile, j int) (cipher.AEAD, error) {
	key := m.ks.shardKey(m.man.ChunkSize, f, j)
	defer clear(key)
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// ChunkOffset returns the offset of chunk i inside its shard object.
func (m *Model) ChunkOffset(i int64) int64 { return i * int64(m.man.ChunkSize+tagSize) }

// DecryptChunk authenticates and decrypts one chunk (ciphertext ‖ tag, exactly as stored at
// ChunkOffset(index) in the object of shard `shard` of file `file`, both indexes into the
// manifest) and appends its plaintext to dst. It gives random access to any chunk.
func (m *Model) DecryptChunk(dst []byte, file, shard int, index int64, chunk []byte) ([]byte, error) {
	if m.ks == nil {
		return nil, ErrLocked
	}
	if file < 0 || file >= len(m.man.Files) || shard < 0 || shard >= len(m.man.Files[file].Shards) {
		return nil, fmt.Errorf("modelcrypt: no shard %d of file %d", shard, file)
	}
	f := &m.man.Files[file]
	s := f.Shards[shard]
	if index < 0 || index >= s.Chunks {
		return nil, fmt.Errorf("modelcrypt: file %q shard %d has no chunk %d", f.Path, shard, index)
	}
	if want := s.chunkPlainSize(index, m.man.ChunkSize) + tagSize; len(chunk) != want {
		return nil, &CorruptError{File: f.Path, Object: s.Object, Chunk: index,
			Reason: fmt.Sprintf("chunk is %d bytes, want %d", len(chunk), want)}
	}
	aead, err := m.shardAEAD(f, shard)
	if err != nil {
		return nil, err
	}
	var nonce [nonceSize]byte
	chunkNonce(&nonce, index, index == s.Chunks-1)
	out, err := aead.Open(dst, nonce[:], chunk, nil)
	if err != nil {
		return nil, &CorruptError{File: f.Path, Object: s.Object, Chunk: index, Reason: "authentication failed"}
	}
	return out, nil
}

// shardStream reads one shard object sequentially and yields verified plaintext chunks.
type shardStream struct {
	ctx     context.Context
	src     Source
	file    *ManifestFile
	shard   Shard
	chunk   int
	aead    cipher.AEAD
	rc      io.ReadCloser
	buf     []byte // chunk+tag bytes, reused
	next    int64  // next chunk index
	retries int
	nonce   [nonceSize]byte
}

func (m *Model) newShardStream(ctx context.Context, src Source, fi, j int, buf []byte, retries int) (*shardStream, error) {
	f := &m.man.Files[fi]
	aead, err := m.shardAEAD(f, j)
	if err != nil {
		return nil, err
	}
	s := f.Shards[j]
	rc, err := src.Open(ctx, s.Object, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, &CorruptError{File: f.Path, Object: s.Object, Chunk: -1, Reason: "object missing"}
		}
		return nil, fmt.Errorf("modelcrypt: file %q: open object %q: %w", f.Path, s.Object, err)
	}
	return &shardStream{ctx: ctx, src: src, file: f, shard: s, chunk: m.man.ChunkSize, aead: aead, rc: rc,
		buf: buf, retries: retries}, nil
}

func (s *shardStream) corrupt(i int64, format string, args ...any) error {
	return &CorruptError{File: s.file.Path, Object: s.shard.Object, Chunk: i, Reason: fmt.Sprintf(format, args...)}
}

// nextChunk returns the verified plaintext of the next chunk (valid until the next call) and
// its plaintext offset inside the file, or io.EOF after the final chunk was verified and the
// object was seen to end there.
func (s *shardStream) nextChunk() ([]byte, int64, error) {
	if s.buf == nil {
		s.buf = make([]byte, s.chunk+tagSize)
	}
	return s.nextChunkInto(s.buf)
}

// nextChunkInto is nextChunk reading into buf (capacity at least chunk size + 16).
func (s *shardStream) nextChunkInto(buf []byte) ([]byte, int64, error) {
	i := s.next
	if i == s.shard.Chunks {
		if err := s.checkEnd(); err != nil {
			return nil, 0, err
		}
		s.next++
		return nil, 0, io.EOF
	}
	if i > s.shard.Chunks {
		return nil, 0, io.EOF
	}
	if err := s.ctx.Err(); err != nil {
		return nil, 0, context.Cause(s.ctx)
	}
	n := s.shard.chunkPlainSize(i, s.chunk)
	enc := buf[:n+tagSize]
	if err := s.read(i, enc); err != nil {
		return nil, 0, err
	}
	pt, err := s.open(s.aead, i, enc, &s.nonce)
	if err != nil {
		return nil, 0, err
	}
	s.next++
	return pt, s.shard.Offset + i*int64(s.chunk), nil
}

// open authenticates and decrypts chunk i (ciphertext ‖ tag in enc) in place with aead (this
// shard's key). It is safe for concurrent use with distinct aead values and buffers.
func (s *shardStream) open(aead cipher.AEAD, i int64, enc []byte, nonce *[nonceSize]byte) ([]byte, error) {
	chunkNonce(nonce, i, i == s.shard.Chunks-1)
	pt, err := aead.Open(enc[:0], nonce[:], enc, nil)
	if err != nil {
		return nil, s.corrupt(i, "authentication failed (tampered, reordered, duplicated, swapped or truncated)")
	}
	return pt, nil
}

// read fills enc with chunk i, reopening the object at the chunk's offset to retry a failed
// read (never on a short object, which is corruption).
func (s *shardStream) read(i int64, enc []byte) error {
	for attempt := 0; ; attempt++ {
		_, err := io.ReadFull(s.rc, enc)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, io.EOF):
			return s.corrupt(i, "object truncated: ends before this chunk")
		case errors.Is(err, io.ErrUnexpectedEOF):
			return s.corrupt(i, "object truncated inside this chunk")
		case attempt >= s.retries || s.ctx.Err() != nil:
			return fmt.Errorf("modelcrypt: file %q: read object %q chunk %d: %w", s.file.Path, s.shard.Object, i, err)
		}
		s.rc.Close()
		rc, oerr := s.src.Open(s.ctx, s.shard.Object, i*int64(s.chunk+tagSize))
		if oerr != nil {
			s.rc = io.NopCloser(bytes.NewReader(nil))
			return fmt.Errorf("modelcrypt: file %q: reopen object %q at chunk %d: %w (after %w)",
				s.file.Path, s.shard.Object, i, oerr, err)
		}
		s.rc = rc
	}
}

// checkEnd verifies the object has no bytes after the final chunk.
func (s *shardStream) checkEnd() error {
	var b [1]byte
	for range 100 { // as io.ReadAtLeast: a reader that keeps returning (0, nil) makes no progress
		n, err := s.rc.Read(b[:])
		if n > 0 {
			return s.corrupt(-1, "trailing data after the final chunk")
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("modelcrypt: file %q: read object %q: %w", s.file.Path, s.shard.Object, err)
		}
	}
	return fmt.Errorf("modelcrypt: file %q: read object %q: %w", s.file.Path, s.shard.Object, io.ErrNoProgress)
}

func (s *shardStream) Close() error { return s.rc.Close() }

// ShardReader returns a reader of the verified plaintext of shard `shard` of file `file`
// (indexes into the manifest), reading its object sequentially with one Source.Open. Read
// returns only bytes of chunks that were already authenticated; io.EOF is returned only
// after the final chunk was verified and the object was seen to end there. Any other
// failure is a *CorruptError or a read error.
func (m *Model) ShardReader(ctx context.Context, src Source, file, shard int) (io.ReadCloser, error) {
	if m.ks == nil {
		return nil, ErrLocked
	}
	if file < 0 || file >= len(m.man.Files) || shard < 0 || shard >= len(m.man.Files[file].Shards) {
		return nil, fmt.Errorf("modelcrypt: no shard %d of file %d", shard, file)
	}
	s, err := m.newShardStream(ctx, src, file, shard, nil, 0)
	if err != nil {
		return nil, err
	}
	return &shardReader{s: s}, nil
}

type shardReader struct {
	s       *shardStream
	pending []byte
	err     error
}

func (r *shardReader) Read(p []byte) (int, error) {
	for len(r.pending) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		r.pending, _, r.err = r.s.nextChunk()
	}
	n := copy(p, r.pending)
	r.pending = r.pending[n:]
	return n, nil
}

func (r *shardReader) Close() error { return r.s.Close() }

// DecryptOptions tune Decrypt.
type DecryptOptions struct {
	// Workers is the number of shards (files, with VerifyDigests) decrypted at once and of
	// goroutines a lone shard's chunks are spread over; 0 means GOMAXPROCS.
	Workers int
	// VerifyDigests re-hashes every file's plaintext with SHA-256 as it is produced (one pass,
	// in order) and compares it with the manifest before the file is closed. The AEAD already
	// guarantees integrity; this is defence in depth and costs ~0.6 s of CPU per GB.
	VerifyDigests bool
	// Skip, if set, is called once per file in manifest order; files it returns true for
	// are neither read nor created.
	Skip func(ManifestFile) bool
	// Progress, if set, is called (concurrently) with the plaintext bytes of each verified
	// chunk written.
	Progress func(n int64)
	// Retries is how many times a shard object is reopened (at the failed chunk's offset)
	// after a read error; truncation and authentication failures are never retried.
	Retries int
}

// Stats summarises a Decrypt run.
type Stats struct {
	Files        int   // files decrypted, verified and closed
	SkippedFiles int   // files Skip returned true for
	Bytes        int64 // plaintext bytes written
}

// pipelineFile reports whether a file dominates the remaining work: there is more than one
// worker and the file is more than half of the bytes still to dispatch (counting itself), so
// the other workers would run out of work while its lane is still going. Such a file gets
// its SHA-256 on its own goroutine (VerifyDigests), or, without hashing, the chunks of its
// lone shard spread over all workers. Files of a model with several similar files are done
// one per worker: one lane per core is faster than several goroutines per lane.
func pipelineFile(workers int, size, remaining int64) bool {
	return pipelining && workers > 1 && size > remaining-size
}

// Decrypt streams every file of the model (minus those opts.Skip returns true for) into sink.
// It requires Unlock.
//
// Contract: sink.Create is called once per file, in manifest order, from one goroutine (so
// at most Workers+1 files are open at a time); File.WriteAt is called concurrently on
// disjoint ranges with verified plaintext only; File.Close is called once, only after every
// chunk of every shard of that file was verified (and, with VerifyDigests, its SHA-256
// matched the manifest). Each shard object is read sequentially with one Source.Open
// (reopened at a chunk offset only to retry a read error). On the first error Decrypt stops
// all workers, calls no further Close, and returns that error; files it created but did not
// Close hold unverified or partial data and must be discarded by the sink's owner.
func (m *Model) Decrypt(ctx context.Context, src Source, sink Sink, opts DecryptOptions) (*Stats, error) {
	if m.ks == nil {
		return nil, ErrLocked
	}
	workers := opts.Workers
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	var (
		firstErr error
		errOnce  sync.Once
		stats    Stats
		files    atomic.Int64
		bytesOut atomic.Int64
		wg       sync.WaitGroup
	)
	fail := func(err error) {
		errOnce.Do(func() { firstErr = err; cancel(err) })
	}

	type openFile struct {
		idx       int
		f         File
		remaining atomic.Int64 // tasks not yet finished
	}
	type task struct {
		of     *openFile
		shards []int // in order
		hash   bool  // one task covers the whole file, hashed in order
		pipe   bool  // hash on a separate goroutine (see pipelineFile)
	}
	tasks := make(chan task)
	worker := func() {
		defer wg.Done()
		var buf []byte
		var pool chunkPool
		var hp, hpInline, hpPipe *pipeHasher
		defer func() {
			for _, p := range []*pipeHasher{hpInline, hpPipe} {
				if p != nil {
					p.stop()
				}
			}
		}()
		for t := range tasks {
			if ctx.Err() != nil {
				continue // drain
			}
			mf := &m.man.Files[t.of.idx]
			if t.hash {
				if t.pipe {
					if hpPipe == nil {
						hpPipe = newPipeHasher(m.man.ChunkSize+tagSize, false)
					}
					hp = hpPipe
				} else {
					if hpInline == nil {
						hpInline = newPipeHasher(m.man.ChunkSize+tagSize, true)
					}
					hp = hpInline
				}
				hp.reset()
			} else if buf == nil && !t.pipe {
				buf = make([]byte, m.man.ChunkSize+tagSize)
			}
			var err error
			for _, j := range t.shards {
				switch {
				case t.hash:
					err = m.decryptShard(ctx, src, t.of.idx, j, t.of.f, hp, nil, opts, &bytesOut)
				case t.pipe:
					if pool == nil {
						pool = newChunkPool(workers+2, m.man.ChunkSize+tagSize)
					}
					err = m.decryptShardParallel(ctx, src, t.of.idx, j, t.of.f, pool, workers, opts, &bytesOut)
				default:
					err = m.decryptShard(ctx, src, t.of.idx, j, t.of.f, nil, buf, opts, &bytesOut)
				}
				if err != nil {
					break
				}
			}
			if err == nil && t.hash {
				var sum [32]byte
				hp.sum(&sum)
				if subtle.ConstantTimeCompare(sum[:], mf.SHA256[:]) != 1 {
					err = &CorruptError{File: mf.Path, Chunk: -1, Reason: "plaintext SHA-256 does not match the manifest"}
				}
			}
			if err != nil {
				fail(err)
				continue
			}
			if t.of.remaining.Add(-1) == 0 && ctx.Err() == nil {
				if err := t.of.f.Close(); err != nil {
					fail(fmt.Errorf("modelcrypt: close %q: %w", mf.Path, err))
					continue
				}
				files.Add(1)
			}
		}
	}
	wg.Add(workers)
	for range workers {
		go worker()
	}

	// Decide up front which files are decrypted (Skip is called once per file, in order).
	todo := make([]bool, len(m.man.Files))
	var remaining int64
	for i, mf := range m.man.Files {
		mf.Shards = slices.Clone(mf.Shards) // Skip gets a copy it cannot use to alter ours
		if opts.Skip != nil && opts.Skip(mf) {
			stats.SkippedFiles++
			continue
		}
		todo[i] = true
		remaining += mf.Size
	}
dispatch:
	for i := range m.man.Files {
		if !todo[i] {
			continue
		}
		mf := m.man.Files[i]
		pipe := pipelineFile(workers, mf.Size, remaining)
		remaining -= mf.Size
		if ctx.Err() != nil {
			break
		}
		f, err := sink.Create(mf.Path, mf.Size)
		if err != nil {
			fail(fmt.Errorf("modelcrypt: create %q: %w", mf.Path, err))
			break
		}
		of := &openFile{idx: i, f: f}
		var ts []task
		if opts.VerifyDigests || len(mf.Shards) == 1 {
			all := make([]int, len(mf.Shards))
			for j := range all {
				all[j] = j
			}
			// With hashing, pipe moves the hash to its own goroutine; without, it spreads
			// the chunks of the file's only shard over all workers.
			ts = []task{{of: of, shards: all, hash: opts.VerifyDigests, pipe: pipe}}
		} else {
			// Several shards: they run in parallel; a file with fewer shards than workers
			// that is all that is left also spreads each shard's chunks.
			for j := range mf.Shards {
				ts = append(ts, task{of: of, shards: []int{j}, pipe: pipe && len(mf.Shards) < workers})
			}
		}
		of.remaining.Store(int64(len(ts)))
		for _, t := range ts {
			select {
			case tasks <- t:
			case <-ctx.Done():
				break dispatch
			}
		}
	}
	close(tasks)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = context.Cause(ctx)
	}
	if firstErr != nil {
		return nil, firstErr
	}
	stats.Files = int(files.Load())
	stats.Bytes = bytesOut.Load()
	return &stats, nil
}

// decryptShard decrypts shard j of file fi into out. With hp set, every chunk is read into
// a buffer from hp's ring and hashed (in order) by hp after it was written.
func (m *Model) decryptShard(ctx context.Context, src Source, fi, j int, out File, hp *pipeHasher, buf []byte,
	opts DecryptOptions, written *atomic.Int64) error {
	s, err := m.newShardStream(ctx, src, fi, j, buf, opts.Retries)
	if err != nil {
		return err
	}
	defer s.Close()
	for {
		b := buf
		if hp != nil {
			b = hp.get()
		}
		pt, off, err := s.nextChunkInto(b)
		if err == nil {
			_, err = out.WriteAt(pt, off)
			if err != nil {
				err = fmt.Errorf("modelcrypt: write %q at %d: %w", s.file.Path, off, err)
			}
		}
		if hp != nil {
			if err == nil {
				hp.hash(pt)
			} else {
				hp.put(b)
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		written.Add(int64(len(pt)))
		if opts.Progress != nil {
			opts.Progress(int64(len(pt)))
		}
	}
}
