package evidence

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/cai-agent/cai-agent/evidence/internal/tcg"
	"github.com/cai-agent/cai-agent/evidence/rtmr"
)

// walRecord is the write-ahead record of one pending RTMR3 extension. It is written
// atomically (temporary file, fsync, rename, fsync of the directory) before the extension, so
// after a crash it either exists whole or not at all.
type walRecord struct {
	Version int `json:"version"`
	// Offset is the length of the event log before the record is appended.
	Offset int64 `json:"offset"`
	// Old and New are RTMR3 before and after the extension (hex).
	Old string `json:"old_rtmr3"`
	New string `json:"new_rtmr3"`
	// Record is the TCG2 record to append (std base64 in JSON).
	Record []byte `json:"record"`
}

// Measure logs ev and extends RTMR3 with AAELDigest(ev), crash-safely:
//
//  1. write-ahead record {log offset, RTMR3 before, RTMR3 expected after, record} (atomic);
//  2. extend RTMR3 through the kernel;
//  3. append the record to the event log (fsync);
//  4. delete the write-ahead record.
//
// After a crash at any point, Open (and every later call) finds the write-ahead record and
// reads RTMR3: if it holds the expected value the extension happened and the record is
// (re)appended; if it holds the old value it did not and the log is cut back to the offset;
// anything else is ErrInconsistent. So RTMR3 always replays from the log. It returns the
// 48-byte digest extended.
func (p *Platform) Measure(ctx context.Context, ev Event) ([]byte, error) {
	d, _, err := p.measure(ctx, ev, false)
	return d, err
}

// MeasureOnce is Measure unless this boot's event log already has ev in RTMR3 (a record of
// the same event, so RTMR3 already commits to it): then it extends nothing and returns the
// digest with measured false. The check and the extension happen under the platform's lock.
// It is for events whose repetition says nothing new, such as a binary measured again by a
// retried run; without it, a job a service manager retries would grow the log each time.
func (p *Platform) MeasureOnce(ctx context.Context, ev Event) (digest []byte, measured bool, err error) {
	return p.measure(ctx, ev, true)
}

func (p *Platform) measure(ctx context.Context, ev Event, once bool) ([]byte, bool, error) {
	if err := ev.Validate(); err != nil {
		return nil, false, err
	}
	if err := ctx.Err(); err != nil {
		return nil, false, err
	}
	var digest [48]byte
	measured := false
	err := p.lockedCtx(ctx, func() error {
		if p.regs == nil {
			return fmt.Errorf("%w: %w", ErrMeasure, p.regsErr)
		}
		if err := p.recoverLocked(); err != nil {
			return err
		}
		rec, d := tcg.AAELRecord(ev.Text())
		digest = d
		old, err := p.regs.Read(3)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrMeasure, err)
		}
		logPath := filepath.Join(p.stateDir, EventLogFile)
		// Checked before anything is extended: a log that cannot be written (a symlink, not a
		// regular file) must fail the measurement while RTMR3 still replays from it.
		off, err := stateFileSize(logPath)
		if err != nil {
			return fmt.Errorf("%w: event log: %w", ErrMeasure, err)
		}
		// A record appended to a log that does not parse could never be read back: refuse
		// while RTMR3 still matches what verifiers can replay.
		if off > 0 {
			l, err := readOwnLog(logPath)
			if err != nil {
				return fmt.Errorf("%w: %s: %w; refusing to extend RTMR3 past it", ErrEventLog, logPath, err)
			}
			// Verifiers refuse a cc_eventlog of more than MaxRecords records (firmware
			// and agent together): evidence past this could never be verified.
			if once && hasRecord(l, ev.Text(), d) {
				return nil
			}
			if len(l.Records) >= MaxOwnRecords || off+int64(len(rec)) > MaxOwnLogSize {
				return fmt.Errorf("%w: %w: it holds %d measurements in %d bytes, the most a verifiable log leaves room for (%d, %d bytes); refusing to extend RTMR3",
					ErrMeasure, ErrLogFull, len(l.Records), off, MaxOwnRecords, MaxOwnLogSize)
			}
		}
		newV := rtmr.ExtendValue(old, d)
		w := walRecord{Version: 1, Offset: off, Old: hex.EncodeToString(old[:]), New: hex.EncodeToString(newV[:]), Record: rec}
		if err := p.writeWAL(w); err != nil {
			return fmt.Errorf("%w: write-ahead record: %w", ErrMeasure, err)
		}
		if err := p.step("wal"); err != nil {
			return err
		}
		if err := p.regs.Extend(3, d); err != nil {
			// The kernel may or may not have extended: resolve from RTMR3 right away.
			if rerr := p.recoverLocked(); rerr != nil {
				return fmt.Errorf("%w: %w (and recovery: %w)", ErrMeasure, err, rerr)
			}
			if cur, rerr := p.regs.Read(3); rerr == nil && cur == newV {
				// The extension took effect despite the error; recovery logged it.
				slog.Warn("RTMR3 extension reported an error but took effect; logged", "err", err)
				measured = true
				return nil
			}
			return fmt.Errorf("%w: %w", ErrMeasure, err)
		}
		if err := p.step("extend"); err != nil {
			return err
		}
		if err := writeLogAt(logPath, off, rec); err != nil {
			return fmt.Errorf("%w: append to event log: %w", ErrMeasure, err)
		}
		if err := p.step("append"); err != nil {
			return err
		}
		if err := p.clearWAL(); err != nil {
			return fmt.Errorf("%w: clear write-ahead record: %w", ErrMeasure, err)
		}
		if err := p.step("clear"); err != nil {
			return err
		}
		measured = true
		slog.Info("measured into RTMR3", "tee", p.tee, "domain", ev.Domain, "operation", ev.Operation, "content", ev.Content,
			"digest", hex.EncodeToString(d[:]), "rtmr3", w.New, "via", p.regs.Interface())
		return nil
	})
	if err != nil {
		return nil, false, err
	}
	return digest[:], measured, nil
}

// hasRecord reports whether l has an RTMR3 record of the AAEL event text with digest d.
func hasRecord(l *tcg.Log, text string, d [48]byte) bool {
	data := tcg.TaggedEvent(text)
	for _, r := range l.Records {
		if r.MRIndex != tcg.MRIndexRTMR3 || r.Type != tcg.EvEventTag || !bytes.Equal(r.Data, data) {
			continue
		}
		for _, dg := range r.Digests {
			if dg.Alg == tcg.AlgSHA384 && bytes.Equal(dg.Sum, d[:]) {
				return true
			}
		}
	}
	return false
}

func (p *Platform) step(name string) error {
	if p.hook == nil {
		return nil
	}
	return p.hook(name)
}

func (p *Platform) walPath() string { return filepath.Join(p.stateDir, WALFile) }

func (p *Platform) writeWAL(w walRecord) error {
	b, err := json.Marshal(w)
	if err != nil {
		return err
	}
	return writeFileAtomic(p.walPath(), b)
}

func (p *Platform) clearWAL() error {
	if err := os.Remove(p.walPath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return syncDir(p.stateDir)
}

// recoverLocked resolves a pending write-ahead record (see Measure).
func (p *Platform) recoverLocked() error {
	// Temporary files of a write-ahead record whose rename never happened are garbage.
	if tmps, _ := filepath.Glob(filepath.Join(p.stateDir, "."+WALFile+".tmp*")); len(tmps) > 0 {
		for _, t := range tmps {
			os.Remove(t)
		}
	}
	b, err := readStateFile(p.walPath())
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%w: write-ahead record: %w", ErrMeasure, err)
	}
	var w walRecord
	if err := json.Unmarshal(b, &w); err != nil || w.Version != 1 || w.Offset < 0 {
		return fmt.Errorf("%w: write-ahead record %s is corrupt", ErrInconsistent, p.walPath())
	}
	old, err1 := hex.DecodeString(w.Old)
	newV, err2 := hex.DecodeString(w.New)
	if err1 != nil || err2 != nil || len(old) != 48 || len(newV) != 48 {
		return fmt.Errorf("%w: write-ahead record %s is corrupt", ErrInconsistent, p.walPath())
	}
	// The record must be exactly one RTMR3 record whose digest takes old to new.
	l, err := tcg.Walk(w.Record)
	if err != nil || len(l.Records) != 1 || l.HeaderEnd != 0 || l.End != len(w.Record) ||
		l.Records[0].MRIndex != tcg.MRIndexRTMR3 || len(l.Records[0].Digests) != 1 ||
		l.Records[0].Digests[0].Alg != tcg.AlgSHA384 {
		return fmt.Errorf("%w: write-ahead record %s does not hold one RTMR3 record", ErrInconsistent, p.walPath())
	}
	var d, o [48]byte
	copy(d[:], l.Records[0].Digests[0].Sum)
	copy(o[:], old)
	if nv := rtmr.ExtendValue(o, d); !bytes.Equal(nv[:], newV) {
		return fmt.Errorf("%w: write-ahead record %s: its record does not extend old_rtmr3 to new_rtmr3", ErrInconsistent, p.walPath())
	}
	if p.regs == nil {
		return fmt.Errorf("%w: a measurement is pending but RTMR3 cannot be read: %w", ErrInconsistent, p.regsErr)
	}
	cur, err := p.regs.Read(3)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrMeasure, err)
	}
	logPath := filepath.Join(p.stateDir, EventLogFile)
	size, err := stateFileSize(logPath)
	if err != nil {
		return fmt.Errorf("%w: event log: %w", ErrMeasure, err)
	}
	if size < w.Offset {
		return fmt.Errorf("%w: event log %s is shorter (%d bytes) than when the pending measurement began (%d)", ErrInconsistent, logPath, size, w.Offset)
	}
	switch {
	case bytes.Equal(cur[:], newV):
		if err := writeLogAt(logPath, w.Offset, w.Record); err != nil {
			return fmt.Errorf("%w: recover: append to event log: %w", ErrMeasure, err)
		}
		slog.Warn("recovered an interrupted measurement: RTMR3 was extended, record appended", "rtmr3", w.New)
	case bytes.Equal(cur[:], old):
		if err := truncateLog(logPath, w.Offset); err != nil {
			return fmt.Errorf("%w: recover: truncate event log: %w", ErrMeasure, err)
		}
		slog.Warn("recovered an interrupted measurement: RTMR3 was not extended, record dropped", "rtmr3", w.Old)
	case cur == [48]byte{}:
		// RTMR3 is zero only right after boot: the record and the log are from an earlier
		// boot (a state directory that is not on tmpfs). Keep them aside, start afresh.
		stamp := time.Now().Unix()
		for _, f := range []string{p.walPath(), logPath} {
			if err := os.Rename(f, fmt.Sprintf("%s.stale-%d", f, stamp)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("%w: retire stale state: %w", ErrEventLog, err)
			}
		}
		slog.Warn("RTMR3 is zero: the write-ahead record and event log are from an earlier boot; moved aside")
		return syncDir(p.stateDir)
	default:
		return fmt.Errorf("%w: a measurement was interrupted and RTMR3 (%x) is neither the value before it (%s) nor after it (%s): "+
			"something else extended RTMR3; see %s", ErrInconsistent, cur, w.Old, w.New, p.walPath())
	}
	if err := p.clearWAL(); err != nil {
		return fmt.Errorf("%w: clear write-ahead record: %w", ErrMeasure, err)
	}
	return nil
}

// checkFreshLocked retires an event log left from an earlier boot: RTMR3 starts at zero when
// a TD launches and can never return to zero, so a non-empty log with RTMR3 = 0 describes a
// previous boot (a state directory that is not on tmpfs). It is renamed aside, not deleted.
func (p *Platform) checkFreshLocked() error {
	if p.regs == nil {
		return nil
	}
	logPath := filepath.Join(p.stateDir, EventLogFile)
	cur, err := p.regs.Read(3)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrMeasure, err)
	}
	fi, err := os.Stat(logPath)
	if err != nil || fi.Size() == 0 {
		if cur != ([48]byte{}) {
			p.warnIfUnreplayable(logPath, cur)
		}
		return nil
	}
	if cur != ([48]byte{}) {
		p.warnIfUnreplayable(logPath, cur)
		return nil
	}
	aside := fmt.Sprintf("%s.stale-%d", logPath, time.Now().Unix())
	if err := os.Rename(logPath, aside); err != nil {
		return fmt.Errorf("%w: retire stale event log: %w", ErrEventLog, err)
	}
	slog.Warn("RTMR3 is zero but the event log is not empty: it is from an earlier boot; moved aside", "old_log", aside)
	return syncDir(p.stateDir)
}

// warnIfUnreplayable logs a warning when the agent's records do not fold to RTMR3: something
// else extended RTMR3 without logging it here, and verifiers replaying the log will refuse it.
func (p *Platform) warnIfUnreplayable(logPath string, cur [48]byte) {
	l, err := readOwnLog(logPath)
	if errors.Is(err, fs.ErrNotExist) {
		l, err = &tcg.Log{}, nil // no record yet
	}
	if err != nil {
		slog.Warn("the event log is malformed", "log", logPath, "err", err)
		return
	}
	var acc [48]byte
	for _, r := range l.Records {
		for _, d := range r.Digests {
			if r.MRIndex == tcg.MRIndexRTMR3 && d.Alg == tcg.AlgSHA384 && len(d.Sum) == 48 {
				acc = rtmr.ExtendValue(acc, [48]byte(d.Sum))
			}
		}
	}
	if acc != cur {
		slog.Warn("RTMR3 does not replay from the agent's event log: another process extends RTMR3 without logging here; verifiers will refuse this evidence",
			"log", logPath, "rtmr3", hex.EncodeToString(cur[:]), "replayed", hex.EncodeToString(acc[:]))
	}
}

// readOwnLog reads and parses the agent's own log: TCG2 records only (no Spec ID header),
// exactly to its end. A missing log is fs.ErrNotExist.
func readOwnLog(path string) (*tcg.Log, error) {
	b, err := readStateFile(path)
	if err != nil {
		return nil, err
	}
	l, err := tcg.Walk(b)
	if err != nil {
		return nil, fmt.Errorf("malformed: %w", err)
	}
	if l.HeaderEnd != 0 || l.End != len(b) {
		return nil, errors.New("malformed: not a plain sequence of records")
	}
	return l, nil
}

// writeLogAt makes the log exactly its first off bytes followed by rec, and syncs it.
func writeLogAt(path string, off int64, rec []byte) error {
	f, err := openStateFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(off); err != nil {
		f.Close()
		return err
	}
	if _, err := f.WriteAt(rec, off); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func truncateLog(path string, off int64) error {
	f, err := openStateFile(path, os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) && off == 0 {
		return nil
	}
	if err != nil {
		return err
	}
	if err := f.Truncate(off); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// writeFileAtomic writes b to path through a synced temporary file and a rename.
func writeFileAtomic(path string, b []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		f.Close()
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
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
