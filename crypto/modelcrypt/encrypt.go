package modelcrypt

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
)

// InputFile is one plaintext file to encrypt.
type InputFile struct {
	Name string // slash-separated path inside the model (see ValidPath)
	Path string // file on disk
}

// EncryptOptions tune Encrypt. Zero values mean the defaults.
type EncryptOptions struct {
	ChunkSize   int       // plaintext bytes per chunk; 0 = DefaultChunkSize
	ShardSize   int64     // plaintext bytes per shard, a multiple of ChunkSize; 0 = DefaultShardSize
	KeyHint     string    // public, unauthenticated hint where the key lives (e.g. kbs:///repo/type/tag)
	Kind        string    // KindFiles (default) or KindOllama
	OllamaModel string    // for KindOllama: the model name, e.g. registry.ollama.ai/library/tiny:latest
	Workers     int       // files encrypted at once; 0 = GOMAXPROCS
	Rand        io.Reader // source of the 32-byte salt; nil = crypto/rand. Must be random outside tests.
	Progress    func(n int64)
}

// Encrypt encrypts files under key into the directory dst (files are stored sorted by Name), which is created (its parent must
// exist) or must be an empty directory. It reads every input file once, sequentially,
// hashing and sealing chunk by chunk with reused buffers (constant memory), several files
// in parallel. The header object is written last (via a temporary name and rename), so a
// failed or interrupted run never leaves a directory that opens as a model; on error Encrypt
// removes what it wrote. The returned manifest is the one stored.
func Encrypt(ctx context.Context, key []byte, files []InputFile, dst string, opts EncryptOptions) (_ *Manifest, retErr error) {
	if len(key) != KeySize {
		return nil, fmt.Errorf("modelcrypt: key is %d bytes, want %d", len(key), KeySize)
	}
	man := &Manifest{Kind: opts.Kind, OllamaModel: opts.OllamaModel, ChunkSize: opts.ChunkSize, ShardSize: opts.ShardSize}
	if man.Kind == "" {
		man.Kind = KindFiles
	}
	if man.ChunkSize == 0 {
		man.ChunkSize = DefaultChunkSize
	}
	if man.ShardSize == 0 {
		man.ShardSize = DefaultShardSize
		if man.ShardSize%int64(man.ChunkSize) != 0 {
			man.ShardSize -= man.ShardSize % int64(man.ChunkSize)
		}
	}
	if len(opts.KeyHint) > MaxKeyHintSize || !validHint(opts.KeyHint) {
		return nil, fmt.Errorf("%w: key hint must be printable UTF-8 of at most %d bytes", ErrInvalidOptions, MaxKeyHintSize)
	}
	if err := checkSizes(man.ChunkSize, man.ShardSize); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidOptions, err)
	}
	// Plan: sort by path (the canonical manifest order), stat every input, lay out shards,
	// name objects.
	files = slices.Clone(files)
	slices.SortStableFunc(files, func(a, b InputFile) int { return strings.Compare(a.Name, b.Name) })
	obj := 0
	for _, in := range files {
		if err := ValidPath(in.Name); err != nil {
			return nil, fmt.Errorf("modelcrypt: input %q: %w", in.Path, err)
		}
		st, err := os.Stat(in.Path)
		if err != nil {
			return nil, fmt.Errorf("modelcrypt: %w", err)
		}
		if !st.Mode().IsRegular() {
			return nil, fmt.Errorf("modelcrypt: %s: not a regular file", in.Path)
		}
		if st.Size() > MaxFileSize {
			return nil, fmt.Errorf("modelcrypt: %s: larger than %d bytes", in.Path, int64(MaxFileSize))
		}
		mf := ManifestFile{Path: in.Name, Size: st.Size(), Shards: planShards(st.Size(), man.ChunkSize, man.ShardSize)}
		for j := range mf.Shards {
			mf.Shards[j].Object = fmt.Sprintf("%06d.shard", obj)
			obj++
		}
		man.Files = append(man.Files, mf)
	}
	if err := man.validate(); err != nil {
		return nil, fmt.Errorf("modelcrypt: %w", err)
	}
	rnd := opts.Rand
	if rnd == nil {
		rnd = rand.Reader
	}
	salt := make([]byte, saltSize)
	if _, err := io.ReadFull(rnd, salt); err != nil {
		return nil, fmt.Errorf("modelcrypt: salt: %w", err)
	}
	ks, err := newKeySchedule(key, salt)
	if err != nil {
		return nil, err
	}
	defer ks.zero()

	// Output directory.
	created := false
	if err := os.Mkdir(dst, 0o755); err == nil {
		created = true
	} else if errors.Is(err, os.ErrExist) {
		ents, rerr := os.ReadDir(dst)
		if rerr != nil {
			return nil, fmt.Errorf("modelcrypt: %w", rerr)
		}
		if len(ents) != 0 {
			return nil, fmt.Errorf("modelcrypt: output directory %s is not empty", dst)
		}
	} else {
		return nil, fmt.Errorf("modelcrypt: %w", err)
	}
	defer func() {
		if retErr == nil {
			return
		}
		if created {
			os.RemoveAll(dst)
			return
		}
		for _, f := range man.Files {
			for _, s := range f.Shards {
				os.Remove(filepath.Join(dst, s.Object))
			}
		}
		os.Remove(filepath.Join(dst, HeaderObject+".tmp"))
	}()

	// Encrypt files in parallel; one worker handles one file's shards in order (the file's
	// SHA-256 needs its bytes in order).
	workers := opts.Workers
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	type job struct {
		i    int
		pipe bool
	}
	jobs := make(chan job)
	wg.Add(workers)
	for range workers {
		go func() {
			defer wg.Done()
			out := make([]byte, man.ChunkSize+tagSize)
			var hpInline, hpPipe *pipeHasher
			defer func() {
				for _, p := range []*pipeHasher{hpInline, hpPipe} {
					if p != nil {
						p.stop()
					}
				}
			}()
			for j := range jobs {
				if ctx.Err() != nil {
					continue
				}
				var hp *pipeHasher
				if j.pipe {
					if hpPipe == nil {
						hpPipe = newPipeHasher(man.ChunkSize, false)
					}
					hp = hpPipe
				} else {
					if hpInline == nil {
						hpInline = newPipeHasher(man.ChunkSize, true)
					}
					hp = hpInline
				}
				if err := encryptFile(ctx, ks, man, j.i, files[j.i].Path, dst, hp, out, opts.Progress); err != nil {
					errOnce.Do(func() { firstErr = err; cancel(err) })
				}
			}
		}()
	}
	remaining := man.TotalSize()
	for i := range man.Files {
		size := man.Files[i].Size
		select {
		case jobs <- job{i, pipelineFile(workers, size, remaining)}:
		case <-ctx.Done():
		}
		remaining -= size
	}
	close(jobs)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = context.Cause(ctx)
	}
	if firstErr != nil {
		return nil, firstErr
	}

	mb, err := marshalManifest(man)
	if err != nil {
		return nil, fmt.Errorf("modelcrypt: manifest: %w", err)
	}
	hdr, err := marshalHeader(ks, salt, mb, opts.KeyHint)
	if err != nil {
		return nil, err
	}
	tmp := filepath.Join(dst, HeaderObject+".tmp")
	if err := writeFileSync(tmp, hdr); err != nil {
		return nil, fmt.Errorf("modelcrypt: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dst, HeaderObject)); err != nil {
		return nil, fmt.Errorf("modelcrypt: %w", err)
	}
	if d, err := os.Open(dst); err == nil {
		d.Sync()
		d.Close()
	}
	return man, nil
}

func writeFileSync(name string, b []byte) error {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	return errors.Join(err, f.Close())
}

// encryptFile encrypts file i of man from path into its shard objects and records its
// SHA-256. Each chunk is read into a buffer of hp's ring, hashed by hp (on its own
// goroutine) while this goroutine seals it into out (both only read the buffer).
func encryptFile(ctx context.Context, ks *keySchedule, man *Manifest, i int, path, dst string, hp *pipeHasher,
	out []byte, progress func(int64)) error {
	mf := &man.Files[i]
	in, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("modelcrypt: %w", err)
	}
	defer in.Close()
	hp.reset()
	var nonce [nonceSize]byte
	for j, s := range mf.Shards {
		key := ks.shardKey(man.ChunkSize, mf, j)
		block, err := aes.NewCipher(key)
		clear(key)
		if err != nil {
			return err
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			return err
		}
		obj, err := os.OpenFile(filepath.Join(dst, s.Object), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return fmt.Errorf("modelcrypt: %w", err)
		}
		for c := int64(0); c < s.Chunks; c++ {
			if err := ctx.Err(); err != nil {
				obj.Close()
				return context.Cause(ctx)
			}
			n := s.chunkPlainSize(c, man.ChunkSize)
			buf := hp.get()
			if _, err := io.ReadFull(in, buf[:n]); err != nil {
				hp.put(buf)
				obj.Close()
				if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
					return fmt.Errorf("modelcrypt: %s: file shrank while being encrypted", path)
				}
				return fmt.Errorf("modelcrypt: %w", err)
			}
			hp.hash(buf[:n])
			chunkNonce(&nonce, c, c == s.Chunks-1)
			ct := aead.Seal(out[:0], nonce[:], buf[:n], nil)
			if _, err := obj.Write(ct); err != nil {
				obj.Close()
				return fmt.Errorf("modelcrypt: %w", err)
			}
			if progress != nil {
				progress(int64(n))
			}
		}
		if err := errors.Join(obj.Sync(), obj.Close()); err != nil {
			return fmt.Errorf("modelcrypt: %w", err)
		}
	}
	var one [1]byte
	if n, _ := io.ReadFull(in, one[:]); n != 0 {
		return fmt.Errorf("modelcrypt: %s: file grew while being encrypted", path)
	}
	hp.sum(&mf.SHA256)
	return nil
}
