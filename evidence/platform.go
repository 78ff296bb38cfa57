package evidence

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"

	"github.com/google/go-configfs-tsm/configfs/configfsi"
	"golang.org/x/sys/unix"

	"github.com/cai-agent/cai-agent/evidence/internal/tcg"
	"github.com/cai-agent/cai-agent/evidence/rtmr"
)

// Sentinel errors of the evidence runtime (match with errors.Is).
var (
	// ErrNoTEE: the requested TEE is not available (e.g. --tee auto outside a TDX guest).
	ErrNoTEE = errors.New("no usable TEE")
	// ErrQuote: the TEE failed to produce a quote, or produced one that does not check out.
	ErrQuote = errors.New("quote generation failed")
	// ErrMeasure: an RTMR extension or its event log record failed.
	ErrMeasure = errors.New("measurement failed")
	// ErrInconsistent: RTMR3 and the agent's event log (with its write-ahead record) cannot be
	// reconciled — another writer extended RTMR3, or the state directory was tampered with.
	// The agent refuses to measure or attest until an operator resolves it.
	ErrInconsistent = errors.New("RTMR3 and the event log disagree")
	// ErrEventLog: an event log (the agent's or the firmware CCEL) is unreadable or malformed.
	ErrEventLog = errors.New("event log unreadable")
	// ErrLogFull: the agent's log already holds MaxOwnRecords measurements (errors wrapping it
	// also wrap ErrMeasure).
	ErrLogFull = errors.New("event log full")
)

// TEEAuto selects TDX when configfs-tsm reports the tdx_guest provider.
const TEEAuto = "auto"

// Options configures Open.
type Options struct {
	// TEE is TEEAuto, TEETDX or TEESample. The sample TEE is never chosen automatically.
	TEE string
	// StateDir holds the agent's event log, its write-ahead record, a lock file and the sample
	// TEE's state. It is created (0755: nothing in it is secret, and `cai-agent serve` puts
	// its group-accessible socket there by default) if missing; the files in it are 0600.
	// It should be on tmpfs (/run): the log describes RTMR3 of this boot only.
	StateDir string
	// Root is the filesystem root under which /sys and /dev paths are resolved ("" = "/").
	Root string
	// TSM is the configfs-tsm client used for quotes; nil = the real one (linuxtsm).
	TSM configfsi.Client
	// RTMRDevice is the legacy ioctl device; "" = Root/dev/tdx_guest.
	RTMRDevice string
	// Kernel is the kernel interface for RTMR sysfs files and ioctls; nil = rtmr.OS.
	Kernel rtmr.Kernel
}

// State directory file names.
const (
	EventLogFile = "eventlog"     // the agent's TCG2 records, append-only
	WALFile      = "eventlog.wal" // the write-ahead record of a pending extension
	LockFile     = "lock"         // flock(2) serializing processes sharing the state dir
	SampleFile   = "sample-tee.json"
)

// CCELPath is the firmware CCEL data (ACPI CCEL log area), relative to the root.
const CCELPath = "sys/firmware/acpi/tables/data/CCEL"

// MaxOwnLogSize bounds the agent's own log in bytes, so that evidence carrying it stays well
// within what readers accept (64 MiB for a log, 128 MiB for a bundle in base64).
const MaxOwnLogSize = 16 << 20

// MaxOwnRecords is the most measurements the agent's own log takes: half of what a verifier
// accepts in a whole cc_eventlog (eventlog.MaxRecords), the rest being left to the firmware's.
const MaxOwnRecords = tcg.MaxRecords / 2

// maxLogSize bounds how much of any event log file is read.
const maxLogSize = 64 << 20

// Platform is the evidence runtime of one TEE: it attests (quotes plus cc_eventlog) and
// measures events into RTMR3 with a crash-safe event log. Its methods are safe for concurrent
// use, and processes sharing a StateDir are serialized by a lock file.
type Platform struct {
	tee      string
	stateDir string
	root     string
	quoter   quoter
	regs     rtmr.Registers // nil when the kernel cannot extend (regsErr says why)
	regsErr  error

	mu   chan struct{} // a 1-slot semaphore: the in-process lock, which a caller can stop waiting for
	lock *os.File
	// hook, when set by tests, runs after each step of a measurement; an error aborts the
	// measurement there, as a crash would.
	hook func(step string) error
}

type quoter interface {
	quote(ctx context.Context, reportData [64]byte) ([]byte, error)
	// rtmrs returns the current RTMRs from a fresh quote (used when the kernel offers no
	// register reads).
	rtmrs(ctx context.Context) ([4][48]byte, error)
}

// Open returns the Platform for opts.TEE. For TEEAuto it probes configfs-tsm and selects TDX
// when the provider is tdx_guest; otherwise it fails with ErrNoTEE (the sample TEE must be
// asked for by name). Open then recovers a measurement interrupted by a crash (see Measure).
func Open(ctx context.Context, opts Options) (*Platform, error) {
	if opts.StateDir == "" {
		return nil, fmt.Errorf("evidence: no state directory given")
	}
	root := opts.Root
	if root == "" {
		root = "/"
	}
	k := opts.Kernel
	if k == nil {
		k = rtmr.OS
	}
	p := &Platform{stateDir: opts.StateDir, root: root, mu: make(chan struct{}, 1)}
	switch opts.TEE {
	case TEESample:
		p.tee = TEESample
		s := &sampleTEE{path: filepath.Join(opts.StateDir, SampleFile)}
		p.quoter, p.regs = s, s
	case TEETDX, TEEAuto, "":
		q, err := openTDX(opts.TSM)
		if err != nil {
			if opts.TEE == TEETDX {
				return nil, err
			}
			return nil, fmt.Errorf("%w (--tee auto selects only TDX; use --tee sample for development without a TEE)", err)
		}
		p.tee = TEETDX
		p.quoter = q
		p.regs, p.regsErr = rtmr.Open(k, root, opts.RTMRDevice)
		if p.regsErr != nil {
			p.regs = nil
			slog.Info("RTMR3 cannot be extended on this kernel; measurements will fail", "err", p.regsErr)
		}
	default:
		return nil, fmt.Errorf("%w: unknown TEE %q (want auto, tdx or sample)", ErrNoTEE, opts.TEE)
	}
	if err := os.MkdirAll(opts.StateDir, 0o755); err != nil {
		return nil, fmt.Errorf("evidence: state directory: %w", err)
	}
	if err := secureStateDir(opts.StateDir); err != nil {
		return nil, err
	}
	lf, err := openStateFile(filepath.Join(opts.StateDir, LockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("evidence: state directory lock: %w", err)
	}
	p.lock = lf
	err = p.locked(func() error {
		if err := p.recoverLocked(); err != nil {
			return err
		}
		return p.checkFreshLocked()
	})
	if err != nil {
		lf.Close()
		return nil, err
	}
	return p, nil
}

// secureStateDir makes sure nobody else can write the state directory: whoever can could
// replace the log or the write-ahead record (symlinks are never followed, but files can be
// forged or removed). A directory this process owns is tightened (a Kubernetes emptyDir is
// created 0777); a shared one (sticky, like /tmp) or someone else's, writable by others, is
// refused.
func secureStateDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("evidence: state directory: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("evidence: state directory %s is not a directory", dir)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || fi.Mode().Perm()&0o022 == 0 {
		return nil
	}
	if int(st.Uid) != os.Geteuid() || fi.Mode()&os.ModeSticky != 0 {
		// Someone else's, or a shared directory such as /tmp: not ours to change.
		return fmt.Errorf("evidence: state directory %s (mode %v, owner uid %d) is writable by others; use a directory only this user (uid %d) can write", dir, fi.Mode().Perm(), st.Uid, os.Geteuid())
	}
	if err := os.Chmod(dir, fi.Mode().Perm()&^0o022); err != nil {
		return fmt.Errorf("evidence: state directory: %w", err)
	}
	slog.Info("state directory was writable by others; permissions tightened", "dir", dir, "mode", fi.Mode().Perm()&^0o022)
	return nil
}

// Platform is the Attester and Measurer the other packages take.
var (
	_ Attester = (*Platform)(nil)
	_ Measurer = (*Platform)(nil)
)

// TEE returns TEETDX or TEESample.
func (p *Platform) TEE() string { return p.tee }

// StateDir returns the state directory.
func (p *Platform) StateDir() string { return p.stateDir }

// Close releases the state directory lock file.
func (p *Platform) Close() error {
	p.mu <- struct{}{}
	defer func() { <-p.mu }()
	if p.lock == nil {
		return nil
	}
	err := p.lock.Close()
	p.lock = nil
	return err
}

// locked runs f holding the in-process lock and the state directory's flock.
func (p *Platform) locked(f func() error) error { return p.lockedCtx(context.Background(), f) }

// lockedCtx is locked, giving up with ctx's error while still waiting for the in-process lock
// (held, say, by a quote that hangs); once the lock is held, f runs only if ctx is not done.
func (p *Platform) lockedCtx(ctx context.Context, f func() error) error {
	select {
	case p.mu <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-p.mu }()
	if err := ctx.Err(); err != nil {
		return err
	}
	if p.lock == nil {
		return fmt.Errorf("evidence: platform is closed")
	}
	for {
		err := unix.Flock(int(p.lock.Fd()), unix.LOCK_EX)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("evidence: lock %s: %w", p.lock.Name(), err)
		}
	}
	defer unix.Flock(int(p.lock.Fd()), unix.LOCK_UN)
	return f()
}

// Attest returns evidence for reportData: a quote from the TEE and the cc_eventlog (see
// CCEventLog) read under the same lock, so the log matches the RTMRs in the quote.
func (p *Platform) Attest(ctx context.Context, reportData [64]byte) (*Evidence, error) {
	return p.AttestBound(ctx, func([]byte) ([64]byte, error) { return reportData, nil })
}

// AttestBound is Attest for REPORTDATA that depends on the cc_eventlog being attached, such
// as NonceReportData(nonce, ccEventLog): bind receives exactly the cc_eventlog bytes that the
// returned Evidence carries, and no measurement can slip in between. bind runs with the
// platform locked and must not call p's methods.
func (p *Platform) AttestBound(ctx context.Context, bind func(ccEventLog []byte) ([64]byte, error)) (*Evidence, error) {
	var ev *Evidence
	err := p.locked(func() error {
		if err := p.recoverLocked(); err != nil {
			return err
		}
		cc, err := p.ccEventLogLocked()
		if err != nil {
			return err
		}
		rd, err := bind(cc)
		if err != nil {
			return err
		}
		q, err := p.quoter.quote(ctx, rd)
		if err != nil {
			return err
		}
		ev = &Evidence{TEE: p.tee, Quote: q, CCEventLog: cc}
		return nil
	})
	return ev, err
}

// AttestNonce is AttestBound with NonceReportData(nonce, ccEventLog), the binding `cai-agent
// serve` and `cai-agent evidence --nonce` use and `cai-agent verify --nonce` checks.
func (p *Platform) AttestNonce(ctx context.Context, nonce string) (*Evidence, error) {
	return p.AttestBound(ctx, func(cc []byte) ([64]byte, error) { return NonceReportData(nonce, cc) })
}

// EventLog returns the agent's own TCG2 records (no header, no end marker).
func (p *Platform) EventLog() ([]byte, error) {
	var b []byte
	err := p.locked(func() error {
		var err error
		b, err = p.ownLogLocked()
		return err
	})
	return b, err
}

// CCEventLog returns the cc_eventlog Attest would attach now: the firmware CCEL (TDX only,
// trimmed at its end marker) — or, when there is none, a minimal Spec ID header — followed by
// the agent's records and 8 bytes of 0xFF; nil when there is neither a CCEL nor a record.
func (p *Platform) CCEventLog() ([]byte, error) {
	var b []byte
	err := p.locked(func() error {
		if err := p.recoverLocked(); err != nil {
			return err
		}
		var err error
		b, err = p.ccEventLogLocked()
		return err
	})
	return b, err
}

func (p *Platform) ccEventLogLocked() ([]byte, error) {
	own, err := p.ownLogLocked()
	if err != nil {
		return nil, err
	}
	var ccel []byte
	if p.tee == TEETDX {
		path := filepath.Join(p.root, CCELPath)
		raw, err := readBounded(path)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return nil, fmt.Errorf("%w: firmware CCEL %s: %w", ErrEventLog, path, err)
		default:
			ccel, err = tcg.Trim(raw)
			if err != nil {
				return nil, fmt.Errorf("%w: firmware CCEL %s: %w", ErrEventLog, path, err)
			}
		}
	}
	if len(ccel) == 0 && len(own) == 0 {
		return nil, nil
	}
	if len(ccel) == 0 {
		ccel = tcg.SpecIDHeader()
	}
	out := make([]byte, 0, len(ccel)+len(own)+len(tcg.EndMarker))
	out = append(out, ccel...)
	out = append(out, own...)
	return append(out, tcg.EndMarker...), nil
}

// ownLogLocked reads and checks the agent's records: a headerless sequence of well-formed
// TCG2 records with no end marker.
func (p *Platform) ownLogLocked() ([]byte, error) {
	path := filepath.Join(p.stateDir, EventLogFile)
	b, err := readStateFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrEventLog, path, err)
	}
	l, err := tcg.Walk(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrEventLog, path, err)
	}
	if l.HeaderEnd != 0 || l.End != len(b) {
		return nil, fmt.Errorf("%w: %s: not a plain sequence of records", ErrEventLog, path)
	}
	return b, nil
}

func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readAllBounded(f)
}

// readStateFile reads a file of the state directory without following a symlink (see
// openStateFile).
func readStateFile(path string) ([]byte, error) {
	f, err := openStateFile(path, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readAllBounded(f)
}

// openStateFile opens a file of the state directory. The agent runs as root and the
// directory may be writable by others (a Kubernetes emptyDir is 0777), so a symlink there is
// never followed (O_NOFOLLOW: ELOOP) and anything but a regular file is refused: otherwise a
// planted link would make the agent write, truncate or create the file it points to.
func openStateFile(path string, flag int, perm os.FileMode) (*os.File, error) {
	f, err := os.OpenFile(path, flag|syscall.O_NOFOLLOW, perm)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	return f, nil
}

// stateFileSize returns the size of a state directory file (0 when it does not exist),
// refusing symlinks and non-regular files like openStateFile.
func stateFileSize(path string) (int64, error) {
	f, err := openStateFile(path, os.O_RDONLY, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

func readAllBounded(f *os.File) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(f, maxLogSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxLogSize {
		return nil, fmt.Errorf("larger than %d bytes", maxLogSize)
	}
	return b, nil
}

// RTMRs returns the current RTMR0..3. For TDX they are read from the kernel (tsm-mr sysfs, or
// a TDREPORT through the ioctl device), or from a fresh quote when neither is available; for
// the sample TEE they are the simulated values in its state file.
func (p *Platform) RTMRs() ([4][]byte, error) {
	ctx := context.Background()
	var out [4][]byte
	err := p.locked(func() error {
		if p.regs != nil {
			for i := range out {
				v, err := p.regs.Read(i)
				if err != nil {
					return err
				}
				out[i] = v[:]
			}
			return nil
		}
		v, err := p.quoter.rtmrs(ctx)
		if err != nil {
			return err
		}
		for i := range out {
			out[i] = v[i][:]
		}
		return nil
	})
	return out, err
}
