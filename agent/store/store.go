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
//   - Confined to OUT: everything below OUT is opened through os.Root (a symlink planted in
//     OUT cannot lead outside it; files are moved into place with renameat(2) between
//     directory descriptors), and OUT/.cai-agent must be a real directory owned by this user
//     and not writable by group or others, else the run is refused: it holds the staging and
//     the publish record, which decides what is trusted without re-hashing.
//   - Modes: published files are 0644 and the directories the publisher creates 0755,
//     whatever the umask, so the runtime (often another user) can read them.
//   - Crash recovery: a rerun (e.g. after kill -9) removes stale staging and completes. Files
//     already published and identical to the model's are skipped (not decrypted again); a file
//     owned by another user or with a mode other than 0644 is never skipped but replaced. Each
//     skipped file is re-checked through os.Root (same inode, size, ctime, mode and owner) right
//     before the first manifest rename and again before the ready marker is written; if one
//     changed, the run fails with ErrChanged and publishes nothing further (a rerun decrypts it
//     again). A publish record, OUT/.cai-agent/published.jsonl, gets one line per file after its
//     rename (path, size, plaintext SHA-256, and the inode and ctime of the file renamed, taken
//     from a descriptor opened on it in staging), preceded by an invalidating line before a file
//     is replaced; the last line per path wins. On tmpfs (TD-private memory, written only by us)
//     the record plus a size, inode and ctime check establishes "identical" for files over 1 MiB
//     (files up to 1 MiB, such as manifests, are always re-hashed: it is free); on other file
//     systems (AllowNonTmpfs) the record is not trusted and existing files are re-hashed.
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
	"io/fs"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
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
	// ErrForeignFiles means a plain-directory output holds files that are not part of the
	// model: a runtime loading the directory could pick them up, and they are not measured.
	ErrForeignFiles = errors.New("store: output directory holds files that are not part of this model")
	// ErrChanged means a file found already published and identical (so not decrypted again)
	// was removed, replaced or modified before the run finished publishing. The run stops
	// before an Ollama manifest or the ready marker vouches for it; a rerun decrypts it again.
	ErrChanged = errors.New("store: a file found already published changed during the run (a rerun decrypts it again)")
)

// Options tune Unpack and UnpackCCZ.
type Options struct {
	// AllowNonTmpfs allows an output directory that is not on tmpfs/ramfs (development only).
	AllowNonTmpfs bool
	// VerifyDigests re-hashes every file's plaintext (SHA-256) against the manifest.
	VerifyDigests bool
	// Workers is the decryptor's parallelism; 0 means GOMAXPROCS.
	Workers int
	// Progress, if set, is called concurrently with counts of verified plaintext bytes (files
	// found already published and identical are counted once, before decrypting); the counts
	// add up to the manifest's total size.
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
	return tmpfsType(dir, &st)
}

// checkTmpfsAt is CheckTmpfs for the directory name opened in root (no path is resolved
// again after the open).
func checkTmpfsAt(root *os.Root, name, display string) error {
	d, err := root.Open(name)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	defer d.Close()
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(d.Fd()), &st); err != nil {
		return fmt.Errorf("store: statfs %s: %w", display, err)
	}
	return tmpfsType(display, &st)
}

func tmpfsType(dir string, st *unix.Statfs_t) error {
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
	// Ino and CtimeNS (publish record only) identify the published inode and its last status
	// change: any later write, truncation or replacement changes one of them, so a file
	// modified after publishing is re-hashed instead of trusted.
	Ino     uint64 `json:"ino,omitempty"`
	CtimeNS int64  `json:"ctime_ns,omitempty"`
}

// inodeStamp returns the inode number and ctime (ns) of fi, or zeros.
func inodeStamp(fi os.FileInfo) (uint64, int64) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, 0
	}
	return st.Ino, st.Ctim.Nano()
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

// publisher is one locked run on OUT. Everything below OUT is reached through root and meta
// (os.Root), so a symlink planted in OUT cannot make the publisher read or write outside it,
// and meta is a directory verified to be ours and closed to others (openMeta).
type publisher struct {
	out         string   // for messages
	root        *os.Root // OUT
	meta        *os.Root // OUT/.cai-agent
	lock        *os.File
	trustRecord bool
	record      map[string]FileInfo
}

// checkNoForeign fails with ErrForeignFiles if OUT (outside its metadata directory) holds
// anything but the directories and regular files of paths: a plain-directory model must be
// exactly what is served. (An Ollama store is shared by many models and is not checked.)
func (p *publisher) checkNoForeign(paths []string) error {
	want := map[string]bool{}
	for _, rel := range paths {
		want[rel] = true
		for d := path.Dir(rel); d != "."; d = path.Dir(d) {
			want[d+"/"] = true
		}
	}
	var foreign []string
	err := fs.WalkDir(p.root.FS(), ".", func(rel string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		switch {
		case rel == ".":
			return nil
		case rel == MetaDir:
			return fs.SkipDir
		case d.IsDir() && want[rel+"/"]:
			return nil
		case d.Type().IsRegular() && want[rel]:
			return nil
		}
		foreign = append(foreign, rel)
		if d.IsDir() {
			return fs.SkipDir
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("store: %s: %w", p.out, err)
	}
	if len(foreign) > 0 {
		more := ""
		if len(foreign) > 5 {
			more = fmt.Sprintf(" and %d more", len(foreign)-5)
			foreign = foreign[:5]
		}
		return fmt.Errorf("%w: %s has %s%s; remove them or use an empty directory", ErrForeignFiles, p.out, strings.Join(foreign, ", "), more)
	}
	return nil
}

// begin checks OUT, takes the lock, removes stale staging and loads the publish record.
func begin(out string, opts Options) (_ *publisher, err error) {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	root, err := os.OpenRoot(out)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	p := &publisher{out: out, root: root}
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	onTmpfs := checkTmpfsAt(root, ".", out)
	if onTmpfs != nil && (!opts.AllowNonTmpfs || !errors.Is(onTmpfs, ErrNotTmpfs)) {
		return nil, onTmpfs
	}
	p.trustRecord = onTmpfs == nil
	if p.meta, err = openMeta(root, out); err != nil {
		return nil, err
	}
	lf, err := p.meta.OpenFile(LockFile, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
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
	// Stale staging from a crashed run: we hold the lock, so nobody else is writing it.
	if err := p.meta.RemoveAll(StagingDir); err != nil {
		return nil, fmt.Errorf("store: remove stale staging: %w", err)
	}
	if err := p.meta.Mkdir(StagingDir, 0o700); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	if onTmpfs == nil {
		if err := checkTmpfsAt(p.meta, StagingDir, filepath.Join(out, MetaDir, StagingDir)); err != nil {
			return nil, err
		}
	}
	if p.record, err = loadRecord(p.meta, RecordFile); err != nil {
		return nil, err
	}
	return p, nil
}

// openMeta creates (0700) or opens OUT/.cai-agent and checks, on the opened directory, that
// it is a real directory (not a symlink), owned by this process's user and not writable by
// group or others: it holds the lock, staging and the publish record that decides which
// published files are trusted without re-hashing, so nobody else may be able to plant or
// swap anything in it.
func openMeta(root *os.Root, out string) (*os.Root, error) {
	if err := root.Mkdir(MetaDir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("store: %w", err)
	}
	name := filepath.Join(out, MetaDir)
	lst, err := root.Lstat(MetaDir)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	if !lst.IsDir() {
		return nil, fmt.Errorf("store: %s is not a directory (%s)", name, lst.Mode().Type())
	}
	meta, err := root.OpenRoot(MetaDir)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	d, err := meta.Open(".")
	if err != nil {
		meta.Close()
		return nil, fmt.Errorf("store: %w", err)
	}
	st, err := d.Stat()
	d.Close()
	if err != nil {
		meta.Close()
		return nil, fmt.Errorf("store: %w", err)
	}
	if !os.SameFile(lst, st) {
		meta.Close()
		return nil, fmt.Errorf("store: %s changed while it was opened", name)
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || int(sys.Uid) != os.Geteuid() || st.Mode().Perm()&0o022 != 0 {
		meta.Close()
		uid := -1
		if ok {
			uid = int(sys.Uid)
		}
		return nil, fmt.Errorf("store: %s (owner uid %d, mode %v) must be owned by uid %d and not writable by group or others; remove it",
			name, uid, st.Mode().Perm(), os.Geteuid())
	}
	return meta, nil
}

func (p *publisher) close() {
	if p.lock != nil {
		// Only while we hold the lock: staging belongs to whoever holds it.
		_ = p.meta.RemoveAll(StagingDir)
		_ = unix.Flock(int(p.lock.Fd()), unix.LOCK_UN)
		_ = p.lock.Close()
		p.lock = nil
	}
	if p.meta != nil {
		_ = p.meta.Close()
		p.meta = nil
	}
	if p.root != nil {
		_ = p.root.Close()
		p.root = nil
	}
}

func loadRecord(dir *os.Root, name string) (map[string]FileInfo, error) {
	rec := map[string]FileInfo{}
	b, err := dir.ReadFile(name)
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
	f, err := p.meta.OpenFile(RecordFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
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
	if err := writeFileSync(p.meta, RecordFile+".tmp", buf.Bytes()); err != nil {
		return err
	}
	return p.meta.Rename(RecordFile+".tmp", RecordFile)
}

// fileID is the identity of a published file as identical accepted it (from its Lstat).
type fileID struct {
	dev, ino uint64
	size     int64
	ctimeNS  int64
	uid      uint32
	mode     fs.FileMode
}

// statID returns fi's identity, or false if fi has no stat_t.
func statID(fi os.FileInfo) (fileID, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, false
	}
	return fileID{dev: uint64(st.Dev), ino: st.Ino, size: fi.Size(), ctimeNS: st.Ctim.Nano(), uid: st.Uid, mode: fi.Mode()}, true
}

// identical reports whether OUT/rel is already the published file with this size and digest,
// and if so returns the identity it accepted, which publish re-checks (checkKept) before
// anything vouches for the file.
func (p *publisher) identical(rel string, size int64, sum [32]byte) (fileID, bool) {
	if strings.Split(rel, "/")[0] == MetaDir {
		return fileID{}, false
	}
	dst := filepath.FromSlash(rel)
	st, err := p.root.Lstat(dst)
	if err != nil || !st.Mode().IsRegular() || st.Size() != size {
		return fileID{}, false
	}
	// A file someone else can write may change after this check without a trace in OUT's
	// directories, and one without our mode may be unreadable for the runtime: either is
	// not trusted as published, it is replaced by our own copy.
	id, ok := statID(st)
	if !ok || int(id.uid) != os.Geteuid() || st.Mode().Perm() != filePerm {
		return fileID{}, false
	}
	hexSum := hex.EncodeToString(sum[:])
	if r := p.record[rel]; p.trustRecord && size > rehashBelow && r.Ino != 0 {
		if r.SHA256 == hexSum && r.Size == size && r.Ino == id.ino && r.CtimeNS == id.ctimeNS {
			return id, true
		}
		// Changed since published (or another model's digest): re-hash below.
	}
	f, err := p.root.OpenFile(dst, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return fileID{}, false
	}
	defer f.Close()
	if fst, err := f.Stat(); err != nil || !os.SameFile(st, fst) {
		return fileID{}, false
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return fileID{}, false
	}
	// Changed while it was hashed: the bytes hashed are not (all) the file's, so not identical.
	fst, err := f.Stat()
	if err != nil {
		return fileID{}, false
	}
	if got, ok := statID(fst); !ok || got != id {
		return fileID{}, false
	}
	if hex.EncodeToString(h.Sum(nil)) != hexSum {
		return fileID{}, false
	}
	return id, true
}

// checkKept re-checks, through p.root and without following a symlink, that every file kept
// as already published (kept: path → the identity identical accepted) is still that regular
// file: same device, inode, size, ctime, mode and owner. Otherwise (removed, replaced,
// written, chmod-ed or chown-ed since; `ollama rm` of another model sharing a blob deletes
// every blob no published manifest references) it fails with ErrChanged naming the file.
func (p *publisher) checkKept(kept map[string]fileID) error {
	for _, rel := range slices.Sorted(maps.Keys(kept)) {
		want := kept[rel]
		name := filepath.Join(p.out, filepath.FromSlash(rel))
		st, err := p.root.Lstat(filepath.FromSlash(rel))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%w: %s: %w", ErrChanged, name, err)
		}
		var why string
		got, ok := fileID{}, false
		if err == nil {
			got, ok = statID(st)
		}
		switch {
		case err != nil:
			why = "was removed"
		case st.Mode().Type() == fs.ModeSymlink:
			why = "was replaced by a symlink"
		case !st.Mode().IsRegular():
			why = "was replaced by a non-regular file"
		case !ok || got.dev != want.dev || got.ino != want.ino:
			why = "was replaced by another file"
		case got.uid != want.uid || int(got.uid) != os.Geteuid():
			why = fmt.Sprintf("is now owned by uid %d", got.uid)
		case got.mode != want.mode || got.mode.Perm()&0o022 != 0:
			why = fmt.Sprintf("now has mode %v", got.mode.Perm())
		case got.size != want.size || got.ctimeNS != want.ctimeNS:
			why = "was modified"
		default:
			continue
		}
		return fmt.Errorf("%w: %s %s since it was found identical", ErrChanged, name, why)
	}
	return nil
}

// filePerm is the mode of every published file; a file found with another mode is not taken
// as published (it is replaced).
const filePerm fs.FileMode = 0o644

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

// stagePath returns rel's staging path relative to p.meta.
func stagePath(rel string) string {
	return filepath.Join(StagingDir, filepath.FromSlash(rel))
}

// publish renames staged files into place, manifests/... last, recording each, then writes
// the ready marker. The files kept as already published (not staged; see identical) are
// re-checked right before the first manifest rename and before the ready marker is written
// (checkKept); if one changed, nothing more is published.
func (p *publisher) publish(files []stagedFile, kept map[string]fileID, ready *Ready) error {
	if err := p.meta.Remove(ReadyFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("store: %w", err)
	}
	if err := syncDir(p.meta, "."); err != nil {
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
	keptChecked := false
	for _, f := range ordered {
		dst := filepath.FromSlash(f.rel)
		if err := mkdirAll(p.root, filepath.Dir(dst)); err != nil {
			return fmt.Errorf("store: publish %s: %w", f.rel, err)
		}
		if _, ok := p.record[f.rel]; ok || exists(p.root, dst) {
			if err := p.appendRecord(FileInfo{Path: f.rel}); err != nil {
				return fmt.Errorf("store: record: %w", err)
			}
		}
		// The manifest makes the model complete for Ollama: every blob it names that this run
		// did not stage must still be the one found identical.
		if isManifest(f) && !keptChecked {
			if err := p.checkKept(kept); err != nil {
				return err
			}
			keptChecked = true
		}
		st, err := p.rename(f.rel)
		if err != nil {
			return fmt.Errorf("store: publish %s: %w", f.rel, err)
		}
		fi := FileInfo{Path: f.rel, Size: f.size, SHA256: hex.EncodeToString(f.sum[:])}
		fi.Ino, fi.CtimeNS = inodeStamp(st)
		if err := p.appendRecord(fi); err != nil {
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
	// The ready marker vouches for every file, the kept ones included.
	if err := p.checkKept(kept); err != nil {
		return err
	}
	if err := writeFileSync(p.meta, ReadyFile+".tmp", append(b, '\n')); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if err := p.meta.Rename(ReadyFile+".tmp", ReadyFile); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	return syncDir(p.meta, ".")
}

// rename moves the staged file rel into place with renameat(2) between two directory file
// descriptors, both opened inside their roots: the staging directory (in p.meta, which only
// we can write) and rel's parent in OUT. So the file renamed is the one we staged, and it
// lands below OUT even if someone swaps directories in OUT meanwhile. The destination
// directory is fsynced. It returns the renamed file's status after the rename, taken from a
// descriptor opened on it in staging: the inode and ctime the publish record pins are those of
// the file we verified, never of whatever another process put at rel after the rename.
func (p *publisher) rename(rel string) (os.FileInfo, error) {
	dir, base := path.Split(rel)
	if dir == "" {
		dir = "."
	}
	from, err := p.meta.Open(filepath.Join(StagingDir, filepath.FromSlash(dir)))
	if err != nil {
		return nil, err
	}
	defer from.Close()
	staged, err := p.meta.OpenFile(stagePath(rel), os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, err
	}
	defer staged.Close()
	to, err := p.root.Open(filepath.FromSlash(dir))
	if err != nil {
		return nil, err
	}
	defer to.Close()
	if err := unix.Renameat(int(from.Fd()), base, int(to.Fd()), base); err != nil {
		return nil, &os.LinkError{Op: "rename", Old: stagePath(rel), New: rel, Err: err}
	}
	if testHookRenamed != nil {
		testHookRenamed(rel)
	}
	// After the rename: renaming changes the file's ctime.
	st, err := staged.Stat()
	if err != nil {
		return nil, err
	}
	return st, to.Sync()
}

// readyMatches reports whether OUT's ready marker already describes exactly this model and
// every file in it is (still) identical.
func (p *publisher) readyMatches(kind, modelSHA string, files []FileInfo) bool {
	b, err := p.meta.ReadFile(ReadyFile)
	if err != nil {
		return false
	}
	var r Ready
	if err := json.Unmarshal(b, &r); err != nil || r.Kind != kind || r.ModelSHA256 != modelSHA || len(r.Files) != len(files) {
		return false
	}
	for i, f := range files {
		if r.Files[i] != f {
			return false
		}
	}
	return true
}

// mkdirAll creates dir and its missing parents in root with mode 0755 whatever the umask
// (the runtime, often another user, must traverse them); existing directories are left as
// they are.
func mkdirAll(root *os.Root, dir string) error {
	if dir == "." {
		return nil
	}
	if st, err := root.Stat(dir); err == nil {
		if !st.IsDir() {
			return &os.PathError{Op: "mkdir", Path: dir, Err: syscall.ENOTDIR}
		}
		return nil
	}
	if err := mkdirAll(root, filepath.Dir(dir)); err != nil {
		return err
	}
	if err := root.Mkdir(dir, 0o755); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil
		}
		return err
	}
	d, err := root.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Chmod(0o755)
}

func exists(root *os.Root, name string) bool {
	_, err := root.Lstat(name)
	return err == nil
}

func syncDir(root *os.Root, dir string) error {
	d, err := root.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func writeFileSync(root *os.Root, name string, b []byte) error {
	f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW, 0o644)
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
	sp := stagePath(rel)
	if err := p.meta.MkdirAll(filepath.Dir(sp), 0o700); err != nil {
		return nil, err
	}
	f, err := p.meta.OpenFile(sp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, filePerm)
	if err != nil {
		return nil, err
	}
	// filePerm whatever the umask: the runtime (Ollama, often another user) must read it.
	if err := f.Chmod(filePerm); err != nil {
		f.Close()
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
