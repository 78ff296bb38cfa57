// Package store publishes a decrypted model into an output directory (OUT): a plain directory
// tree, or an Ollama store (OLLAMA_MODELS) with manifests/ and blobs/.
//
// Guarantees:
//
//   - Plaintext only in memory: OUT must be on tmpfs or ramfs (statfs magic), checked on the
//     directory the files land in after it is created, unless Options.AllowNonTmpfs.
//   - Atomic publish: every file is decrypted into OUT/.cai-agent/staging/ (outside blobs/,
//     where Ollama deletes unknown files at startup). Nothing is renamed into place until the
//     decryptor has verified every byte of every file of the run and Options.BeforePublish
//     accepted it. Then the files are renamed in, non-manifest files first and Ollama
//     manifests (manifests/...) last, so a model never looks complete to Ollama before all
//     its blobs are there. On any failure before that point the staging directory is removed
//     and nothing of the run is published.
//   - One run per OUT: a non-blocking flock on OUT/.cai-agent/lock (ErrLocked).
//   - Crash recovery: a rerun (e.g. after kill -9) removes stale staging and completes. Files
//     already published and identical to the model's are skipped (not decrypted again). A
//     publish record, OUT/.cai-agent/published.jsonl, gets one line per file after its rename
//     (path, size, plaintext SHA-256), preceded by an invalidating line before a file is
//     replaced; the last line per path wins. On tmpfs (TD-private memory, written only by us)
//     the record plus a size check establishes "identical" for files over 1 MiB (files up to
//     1 MiB, such as manifests, are always re-hashed: it is free); on other file systems
//     (AllowNonTmpfs) the record is not trusted and existing files are re-hashed.
//   - OUT/.cai-agent/ready.json (model name, kind, manifest digests, files) is written after
//     everything is published and removed before a run publishes anything; a rerun on an
//     identical, complete OUT is a fast no-op that reports Result.AlreadyPublished.
package store

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Names inside OUT.
const (
	MetaDir     = ".cai-agent" // lock, staging, publish record, ready marker
	LockFile    = "lock"
	StagingDir  = "staging"
	RecordFile  = "published.jsonl"
	ReadyFile   = "ready.json"
	manifestDir = "manifests"
)

// File system magic numbers (linux/magic.h).
const (
	TmpfsMagic = 0x01021994
	RamfsMagic = 0x858458f6
)

var (
	// ErrNotTmpfs means the output directory is not on tmpfs or ramfs, so decrypted plaintext
	// would reach a disk the host can read.
	ErrNotTmpfs = errors.New("store: output directory is not on tmpfs or ramfs (plaintext would reach disk; use a tmpfs mount such as /dev/shm, or --allow-non-tmpfs for development)")
	// ErrLocked means another run holds the output directory's lock.
	ErrLocked = errors.New("store: output directory is locked by another cai-agent run")
)

// Options tune Unpack and UnpackCCZ.
type Options struct {
	// AllowNonTmpfs allows an output directory that is not on tmpfs/ramfs (development only).
	AllowNonTmpfs bool
	// VerifyDigests re-hashes every file's plaintext (SHA-256) against the manifest.
	VerifyDigests bool
	// Workers is the decryptor's parallelism; 0 means GOMAXPROCS.
	Workers int
	// Progress, if set, is called concurrently with counts of verified plaintext bytes.
	Progress func(int64)
	// BeforePublish, if set, is called after every byte was decrypted, verified and staged,
	// before the first rename; an error aborts the run with nothing published. Result's Files,
	// Bytes and digests are final; AlreadyPublished is false.
	BeforePublish func(ctx context.Context, r *Result) error
}

// Result describes a published model.
type Result struct {
	Kind string // "files", "ollama" or "ccz"
	Name string // the Ollama model name, or ""
	// ManifestSHA256 is what the agent measures into RTMR3 (the OpModel event): for an Ollama
	// model, the hex SHA-256 of the Ollama manifest file (the ID `ollama list` shows);
	// otherwise the hex SHA-256 of the cai manifest (for CCZoo input, of the file list, see
	// UnpackCCZ).
	ManifestSHA256 string
	// ModelSHA256 is the hex SHA-256 of the cai manifest (recorded in the ready marker); for
	// CCZoo input, the same as ManifestSHA256.
	ModelSHA256      string
	Files            int   // files decrypted and published by this run
	Skipped          int   // files already published and identical
	Bytes            int64 // plaintext bytes decrypted by this run
	AlreadyPublished bool  // the complete model was already published: nothing was done
	Duration         time.Duration
}

// CheckTmpfs returns nil if dir is on tmpfs or ramfs, and an error wrapping ErrNotTmpfs
// naming the directory and its file system type otherwise.
func CheckTmpfs(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return fmt.Errorf("store: statfs %s: %w", dir, err)
	}
	switch uint32(st.Type) {
	case TmpfsMagic, RamfsMagic:
		return nil
	}
	return fmt.Errorf("%w: %s has file system type 0x%x", ErrNotTmpfs, dir, uint32(st.Type))
}

// FileInfo is one published file in the ready marker and the publish record.
type FileInfo struct {
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"` // hex; "" in the record marks a file being replaced
}

// Ready is the content of OUT/.cai-agent/ready.json.
type Ready struct {
	Name           string     `json:"name,omitempty"`
	Kind           string     `json:"kind"`
	ManifestSHA256 string     `json:"manifest_sha256"`
	ModelSHA256    string     `json:"model_sha256"`
	Files          []FileInfo `json:"files"`
	PublishedAt    time.Time  `json:"published_at"`
}

// ReadReady reads OUT's ready marker (os.ErrNotExist when the model is not published).
func ReadReady(out string) (*Ready, error) {
	b, err := os.ReadFile(filepath.Join(out, MetaDir, ReadyFile))
	if err != nil {
		return nil, err
	}
	var r Ready
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("store: %s: %w", ReadyFile, err)
	}
	return &r, nil
}

// publisher is one locked run on OUT.
type publisher struct {
	out, meta, staging string
	lock               *os.File
	trustRecord        bool
	record             map[string]FileInfo
}

// begin checks OUT, takes the lock, removes stale staging and loads the publish record.
func begin(out string, opts Options) (_ *publisher, err error) {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	onTmpfs := CheckTmpfs(out)
	if onTmpfs != nil && (!opts.AllowNonTmpfs || !errors.Is(onTmpfs, ErrNotTmpfs)) {
		return nil, onTmpfs
	}
	p := &publisher{out: out, meta: filepath.Join(out, MetaDir), trustRecord: onTmpfs == nil}
	p.staging = filepath.Join(p.meta, StagingDir)
	if err := os.MkdirAll(p.meta, 0o700); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	lf, err := os.OpenFile(filepath.Join(p.meta, LockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lf.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s", ErrLocked, out)
		}
		return nil, fmt.Errorf("store: lock %s: %w", out, err)
	}
	p.lock = lf
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	// Stale staging from a crashed run: we hold the lock, so nobody else is writing it.
	if err := os.RemoveAll(p.staging); err != nil {
		return nil, fmt.Errorf("store: remove stale staging: %w", err)
	}
	if err := os.Mkdir(p.staging, 0o700); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	if onTmpfs == nil {
		if err := CheckTmpfs(p.staging); err != nil {
			return nil, err
		}
	}
	if p.record, err = loadRecord(filepath.Join(p.meta, RecordFile)); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *publisher) close() {
	_ = os.RemoveAll(p.staging)
	if p.lock != nil {
		_ = unix.Flock(int(p.lock.Fd()), unix.LOCK_UN)
		_ = p.lock.Close()
		p.lock = nil
	}
}

func loadRecord(name string) (map[string]FileInfo, error) {
	rec := map[string]FileInfo{}
	b, err := os.ReadFile(name)
	if errors.Is(err, os.ErrNotExist) {
		return rec, nil
	}
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var fi FileInfo
		// A torn last line (crash while appending) is ignored: its file is then not trusted.
		if json.Unmarshal(sc.Bytes(), &fi) == nil && fi.Path != "" {
			rec[fi.Path] = fi
		}
	}
	return rec, nil
}

// appendRecord appends lines to the publish record and fsyncs it.
func (p *publisher) appendRecord(fis ...FileInfo) error {
	f, err := os.OpenFile(filepath.Join(p.meta, RecordFile), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	for _, fi := range fis {
		b, _ := json.Marshal(fi)
		buf.Write(b)
		buf.WriteByte('\n')
		p.record[fi.Path] = fi
	}
	if _, err := f.Write(buf.Bytes()); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// compactRecord rewrites the publish record with one line per path (atomically), so it does
// not grow with every run.
func (p *publisher) compactRecord() error {
	paths := make([]string, 0, len(p.record))
	for k, fi := range p.record {
		if fi.SHA256 != "" {
			paths = append(paths, k)
		}
	}
	slices.Sort(paths)
	var buf bytes.Buffer
	for _, k := range paths {
		b, _ := json.Marshal(p.record[k])
		buf.Write(b)
		buf.WriteByte('\n')
	}
	name := filepath.Join(p.meta, RecordFile)
	if err := writeFileSync(name+".tmp", buf.Bytes()); err != nil {
		return err
	}
	return os.Rename(name+".tmp", name)
}

// identical reports whether OUT/rel is already the published file with this size and digest.
func (p *publisher) identical(rel string, size int64, sum [32]byte) bool {
	if strings.Split(rel, "/")[0] == MetaDir {
		return false
	}
	dst := filepath.Join(p.out, filepath.FromSlash(rel))
	st, err := os.Lstat(dst)
	if err != nil || !st.Mode().IsRegular() || st.Size() != size {
		return false
	}
	hexSum := hex.EncodeToString(sum[:])
	if p.trustRecord && size > rehashBelow {
		return p.record[rel].SHA256 == hexSum && p.record[rel].Size == size
	}
	f, err := os.Open(dst)
	if err != nil {
		return false
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return false
	}
	return hex.EncodeToString(h.Sum(nil)) == hexSum
}

// rehashBelow: published files up to this size (manifests, configs, templates) are always
// re-hashed instead of trusting the record: it costs nothing and covers a small file another
// program (e.g. Ollama rewriting a manifest) replaced with one of the same size.
const rehashBelow = 1 << 20

// testHookRenamed, if set (tests only), is called after each file is renamed into place.
var testHookRenamed func(rel string)

// stagedFile is a verified file in staging waiting to be renamed into place.
type stagedFile struct {
	rel  string
	size int64
	sum  [32]byte
}

// checkRel rejects paths that would land in our metadata directory.
func checkRel(rel string) error {
	if strings.Split(rel, "/")[0] == MetaDir {
		return fmt.Errorf("store: model file %q would overwrite %s/", rel, MetaDir)
	}
	return nil
}

func (p *publisher) stagePath(rel string) string {
	return filepath.Join(p.staging, filepath.FromSlash(rel))
}

// publish renames staged files into place, manifests/... last, recording each, then writes
// the ready marker.
func (p *publisher) publish(files []stagedFile, ready *Ready) error {
	if err := os.Remove(filepath.Join(p.meta, ReadyFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("store: %w", err)
	}
	if err := syncDir(p.meta); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	ordered := slices.Clone(files)
	isManifest := func(s stagedFile) bool { return ready.Kind == "ollama" && strings.HasPrefix(s.rel, manifestDir+"/") }
	slices.SortStableFunc(ordered, func(a, b stagedFile) int {
		switch ma, mb := isManifest(a), isManifest(b); {
		case ma == mb:
			return 0
		case mb:
			return -1
		default:
			return 1
		}
	})
	for _, f := range ordered {
		dst := filepath.Join(p.out, filepath.FromSlash(f.rel))
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return fmt.Errorf("store: publish %s: %w", f.rel, err)
		}
		if _, ok := p.record[f.rel]; ok || exists(dst) {
			if err := p.appendRecord(FileInfo{Path: f.rel}); err != nil {
				return fmt.Errorf("store: record: %w", err)
			}
		}
		if err := os.Rename(p.stagePath(f.rel), dst); err != nil {
			return fmt.Errorf("store: publish %s: %w", f.rel, err)
		}
		if err := syncDir(filepath.Dir(dst)); err != nil {
			return fmt.Errorf("store: publish %s: %w", f.rel, err)
		}
		if testHookRenamed != nil {
			testHookRenamed(f.rel)
		}
		if err := p.appendRecord(FileInfo{Path: f.rel, Size: f.size, SHA256: hex.EncodeToString(f.sum[:])}); err != nil {
			return fmt.Errorf("store: record: %w", err)
		}
	}
	if err := p.compactRecord(); err != nil {
		return fmt.Errorf("store: record: %w", err)
	}
	ready.PublishedAt = time.Now().UTC()
	b, err := json.MarshalIndent(ready, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(p.meta, ReadyFile+".tmp")
	if err := writeFileSync(tmp, append(b, '\n')); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(p.meta, ReadyFile)); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	return syncDir(p.meta)
}

// readyMatches reports whether OUT's ready marker already describes exactly this model and
// every file in it is (still) identical.
func (p *publisher) readyMatches(kind, modelSHA string, files []FileInfo) bool {
	r, err := ReadReady(p.out)
	if err != nil || r.Kind != kind || r.ModelSHA256 != modelSHA || len(r.Files) != len(files) {
		return false
	}
	for i, f := range files {
		if r.Files[i] != f {
			return false
		}
	}
	return true
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func writeFileSync(name string, b []byte) error {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// mkStaged creates the staging file for rel (parents included), sized to size.
func (p *publisher) mkStaged(rel string, size int64) (*os.File, error) {
	if err := checkRel(rel); err != nil {
		return nil, err
	}
	sp := p.stagePath(rel)
	if err := os.MkdirAll(filepath.Dir(sp), 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(sp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, err
	}
	if size > 0 {
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, err
		}
	}
	return f, nil
}
