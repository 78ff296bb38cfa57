package modelcrypt

import (
	"context"
	"crypto/cipher"
	"fmt"
	"sync"
	"sync/atomic"
)

// chunkPool is a fixed set of chunk buffers owned by one worker (constant memory).
type chunkPool chan []byte

func newChunkPool(n, size int) chunkPool {
	p := make(chunkPool, n)
	for range n {
		p <- make([]byte, size)
	}
	return p
}

// decryptShardParallel decrypts shard j of file fi into out like decryptShard without
// hashing, but spreads the chunks over `helpers` goroutines: this goroutine reads the object
// sequentially (still one Source.Open) into buffers from pool and hands each chunk to a
// helper, which authenticates, decrypts and writes it. Used when one shard is all that is
// left to do, so a lone shard still uses every core. It returns after every helper finished;
// on success every chunk was verified and written and the object ended after the final chunk.
func (m *Model) decryptShardParallel(ctx context.Context, src Source, fi, j int, out File, pool chunkPool,
	helpers int, opts DecryptOptions, written *atomic.Int64) error {
	s, err := m.newShardStream(ctx, src, fi, j, nil, opts.Retries)
	if err != nil {
		return err
	}
	defer s.Close()

	type job struct {
		buf []byte
		i   int64
	}
	var (
		firstErr error
		errOnce  sync.Once
		failed   atomic.Bool
		wg       sync.WaitGroup
	)
	fail := func(err error) {
		errOnce.Do(func() { firstErr = err; failed.Store(true) })
	}
	jobs := make(chan job, cap(pool))
	for range helpers {
		aead, err := m.shardAEAD(s.file, j)
		if err != nil {
			close(jobs)
			wg.Wait()
			return err
		}
		wg.Add(1)
		go func(aead cipher.AEAD) {
			defer wg.Done()
			nonce := new([nonceSize]byte)
			for jb := range jobs {
				if !failed.Load() {
					if err := m.openAndWrite(s, aead, nonce, jb.i, jb.buf, out, opts, written); err != nil {
						fail(err)
					}
				}
				pool <- jb.buf[:cap(jb.buf)]
			}
		}(aead)
	}
	for i := int64(0); i < s.shard.Chunks && !failed.Load(); i++ {
		if err := ctx.Err(); err != nil {
			fail(context.Cause(ctx))
			break
		}
		buf := <-pool
		n := s.shard.chunkPlainSize(i, s.chunk)
		if err := s.read(i, buf[:n+tagSize]); err != nil {
			pool <- buf
			fail(err)
			break
		}
		jobs <- job{buf[:n+tagSize], i}
	}
	close(jobs)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return s.checkEnd()
}

func (m *Model) openAndWrite(s *shardStream, aead cipher.AEAD, nonce *[nonceSize]byte, i int64, enc []byte, out File,
	opts DecryptOptions, written *atomic.Int64) error {
	pt, err := s.open(aead, i, enc, nonce)
	if err != nil {
		return err
	}
	off := s.shard.Offset + i*int64(s.chunk)
	if _, err := out.WriteAt(pt, off); err != nil {
		return fmt.Errorf("modelcrypt: write %q at %d: %w", s.file.Path, off, err)
	}
	written.Add(int64(len(pt)))
	if opts.Progress != nil {
		opts.Progress(int64(len(pt)))
	}
	return nil
}
