package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cai-agent/cai-agent/agent/ollama"
	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
)

// Unpack decrypts the unlocked model m, read from src, into OUT and publishes it with the
// guarantees in the package documentation. For an Ollama model (manifest kind "ollama") it
// also checks, before decrypting anything, that the model name is valid, that its Ollama
// manifest is among the files, and that every other file is a blob named after its own
// (authenticated) SHA-256, since Ollama never re-checks blob contents.
//
// Errors from the decryptor (modelcrypt.ErrCorrupt, ...), ErrNotTmpfs and ErrLocked are
// wrapped so errors.Is works. On error nothing of this run is published.
func Unpack(ctx context.Context, m *modelcrypt.Model, src modelcrypt.Source, out string, opts Options) (*Result, error) {
	start := time.Now()
	if !m.Unlocked() {
		return nil, modelcrypt.ErrLocked
	}
	man := m.Manifest()
	sum := m.ManifestSHA256()
	res := &Result{Kind: man.Kind, ModelSHA256: hex.EncodeToString(sum[:])}
	res.ManifestSHA256 = res.ModelSHA256
	if man.Kind == modelcrypt.KindOllama {
		name, digest, err := checkOllama(man)
		if err != nil {
			return nil, err
		}
		res.Name, res.ManifestSHA256 = name, digest
	}
	infos := make([]FileInfo, len(man.Files))
	for i, f := range man.Files {
		if err := checkRel(f.Path); err != nil {
			return nil, err
		}
		infos[i] = FileInfo{Path: f.Path, Size: f.Size, SHA256: hex.EncodeToString(f.SHA256[:])}
	}

	p, err := begin(out, opts)
	if err != nil {
		return nil, err
	}
	defer p.close()
	if man.Kind != modelcrypt.KindOllama {
		paths := make([]string, len(man.Files))
		for i, f := range man.Files {
			paths[i] = f.Path
		}
		if err := p.checkNoForeign(paths); err != nil {
			return nil, err
		}
	}

	// Files already published and identical (the identity accepted, re-checked by publish).
	skip := map[string]fileID{}
	for _, f := range man.Files {
		if id, ok := p.identical(f.Path, f.Size, f.SHA256); ok {
			skip[f.Path] = id
		}
	}
	res.Skipped = len(skip)
	if opts.Progress != nil {
		// Files already published and identical count as done, so progress reaches the
		// model's size.
		var n int64
		for _, f := range man.Files {
			if _, ok := skip[f.Path]; ok {
				n += f.Size
			}
		}
		if n > 0 {
			opts.Progress(n)
		}
	}
	ready := &Ready{Name: res.Name, Kind: res.Kind, ManifestSHA256: res.ManifestSHA256, ModelSHA256: res.ModelSHA256, Files: infos}
	if len(skip) == len(man.Files) && p.readyMatches(res.Kind, res.ModelSHA256, infos) {
		res.AlreadyPublished = true
		res.Duration = time.Since(start)
		return res, nil
	}

	sk := &sink{p: p}
	defer sk.closeAll()
	stats, err := m.Decrypt(ctx, src, sk, modelcrypt.DecryptOptions{
		Workers:       opts.Workers,
		VerifyDigests: opts.VerifyDigests,
		Skip: func(f modelcrypt.ManifestFile) bool {
			_, ok := skip[f.Path]
			return ok
		},
		Progress: opts.Progress,
	})
	if err != nil {
		return nil, err
	}
	var staged []stagedFile
	for _, f := range man.Files {
		if _, ok := skip[f.Path]; ok {
			continue
		}
		if !sk.verified(f.Path) {
			return nil, fmt.Errorf("store: %s was not verified by the decryptor", f.Path)
		}
		staged = append(staged, stagedFile{rel: f.Path, size: f.Size, sum: f.SHA256})
	}
	res.Files, res.Bytes = stats.Files, stats.Bytes
	if man.Kind == modelcrypt.KindOllama {
		if err := checkOllamaManifest(p, man, skip); err != nil {
			return nil, err
		}
	}
	if opts.BeforePublish != nil {
		if err := opts.BeforePublish(ctx, res); err != nil {
			return nil, err
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := p.publish(staged, skip, ready); err != nil {
		return nil, err
	}
	res.Duration = time.Since(start)
	return res, nil
}

// checkOllama validates an Ollama model's manifest layout and returns its name and the hex
// SHA-256 of its Ollama manifest file.
func checkOllama(man *modelcrypt.Manifest) (string, string, error) {
	n, err := ollama.ParseName(man.OllamaModel)
	if err != nil {
		return "", "", fmt.Errorf("store: model %q: %w", man.OllamaModel, err)
	}
	mp := n.ManifestPath()
	digest := ""
	for _, f := range man.Files {
		if f.Path == mp {
			digest = hex.EncodeToString(f.SHA256[:])
			continue
		}
		want, _ := ollama.BlobPath("sha256:" + hex.EncodeToString(f.SHA256[:]))
		if f.Path != want {
			return "", "", fmt.Errorf("store: Ollama model %s: file %q is neither its manifest (%s) nor a blob named after its content (%s)", n, f.Path, mp, want)
		}
	}
	if digest == "" {
		return "", "", fmt.Errorf("store: Ollama model %s: its manifest %s is not in the encrypted model", n, mp)
	}
	return n.String(), digest, nil
}

// checkOllamaManifest parses the decrypted (verified, staged) Ollama manifest, or the
// published one when it was skipped as identical, and requires every blob it references to
// be part of the model (SPEC.md §5.4), so a published manifest never points at a missing
// blob. The bytes checked are the ones whose SHA-256 the model authenticates.
func checkOllamaManifest(p *publisher, man *modelcrypt.Manifest, skip map[string]fileID) error {
	n, _ := ollama.ParseName(man.OllamaModel)
	mp := n.ManifestPath()
	var b []byte
	var err error
	if _, ok := skip[mp]; ok {
		b, err = p.root.ReadFile(filepath.FromSlash(mp))
	} else {
		b, err = p.meta.ReadFile(stagePath(mp))
	}
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	for _, f := range man.Files {
		if f.Path == mp && sha256.Sum256(b) != f.SHA256 {
			return fmt.Errorf("store: Ollama model %s: %s changed while it was checked", n, mp)
		}
	}
	om, err := ollama.ParseManifest(b)
	if err != nil {
		return fmt.Errorf("store: Ollama model %s: %w", n, err)
	}
	have := map[string]bool{}
	for _, f := range man.Files {
		have[f.Path] = true
	}
	for _, d := range om.Blobs() {
		bp, _ := ollama.BlobPath(d)
		if !have[bp] {
			return fmt.Errorf("store: Ollama model %s: its manifest references %s, which the encrypted model does not contain", n, d)
		}
	}
	return nil
}

// sink stages decrypted files; it implements modelcrypt.Sink.
type sink struct {
	p     *publisher
	mu    sync.Mutex
	files map[string]*stageFile
}

type stageFile struct {
	*os.File
	rel    string
	mu     sync.Mutex
	closed bool
	ok     bool
}

func (s *sink) Create(rel string, size int64) (modelcrypt.File, error) {
	f, err := s.p.mkStaged(rel, size)
	if err != nil {
		return nil, err
	}
	sf := &stageFile{File: f, rel: rel}
	s.mu.Lock()
	if s.files == nil {
		s.files = map[string]*stageFile{}
	}
	s.files[rel] = sf
	s.mu.Unlock()
	return sf, nil
}

// Close is called by the decryptor only after the file was fully verified.
func (f *stageFile) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return errors.New("store: staged file closed twice")
	}
	f.closed = true
	err := f.File.Sync()
	if cerr := f.File.Close(); err == nil {
		err = cerr
	}
	f.ok = err == nil
	return err
}

func (s *sink) verified(rel string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.files[rel]
	if f == nil {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ok
}

// closeAll closes files the decryptor abandoned (after an error); staging is removed by the
// publisher.
func (s *sink) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.files {
		f.mu.Lock()
		if !f.closed {
			f.closed = true
			_ = f.File.Close()
		}
		f.mu.Unlock()
	}
}
