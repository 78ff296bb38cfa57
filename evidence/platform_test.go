package evidence

import (
	"bytes"
	"context"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-configfs-tsm/configfs/configfsi"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence/evidencetest"
	"github.com/cai-agent/cai-agent/evidence/internal/tcg"
	"github.com/cai-agent/cai-agent/evidence/rtmr"
	"github.com/cai-agent/cai-agent/evidence/rtmr/rtmrtest"
)

func fixture(t testing.TB, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "testdata", rel))
	require.NoError(t, err)
	return b
}

func reportDataOffset(q []byte) int { return evidencetest.ReportDataOffset(q) }

func fakeTSM(_ testing.TB, quote []byte, patch bool, provider string) configfsi.Client {
	return evidencetest.TSM(quote, patch, provider)
}

type env struct {
	root, state string
	k           *rtmrtest.Kernel
	tsm         configfsi.Client
}

func newEnv(t testing.TB) *env {
	root := t.TempDir()
	return &env{
		root:  root,
		state: filepath.Join(t.TempDir(), "state"),
		k:     &rtmrtest.Kernel{Root: root, Sysfs: true},
		tsm:   fakeTSM(t, fixture(t, "tdx/cos-113-tdx-quote.dat"), true, "tdx_guest"),
	}
}

func (e *env) opts(tee string) Options {
	return Options{TEE: tee, StateDir: e.state, Root: e.root, TSM: e.tsm, Kernel: e.k}
}

func (e *env) open(t testing.TB, tee string) *Platform {
	t.Helper()
	p, err := Open(context.Background(), e.opts(tee))
	require.NoError(t, err)
	t.Cleanup(func() { p.Close() })
	return p
}

func (e *env) installCCEL(t testing.TB) {
	path := filepath.Join(e.root, CCELPath)
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, fixture(t, "tdx/cos-113-ccel_data.dat"), 0o444))
}

// replayOwn folds the SHA-384 digests of the agent's own log (all RTMR3 records).
func replayOwn(t testing.TB, log []byte) ([48]byte, int) {
	t.Helper()
	l, err := tcg.Walk(log)
	require.NoError(t, err)
	var acc [48]byte
	for _, r := range l.Records {
		require.EqualValues(t, 4, r.MRIndex)
		var d [48]byte
		copy(d[:], r.Digests[0].Sum)
		acc = rtmr.ExtendValue(acc, d)
	}
	return acc, len(l.Records)
}

func requireConsistent(t testing.TB, p *Platform) int {
	t.Helper()
	log, err := p.EventLog()
	require.NoError(t, err)
	want, n := replayOwn(t, log)
	rt, err := p.RTMRs()
	require.NoError(t, err)
	require.Equal(t, hex.EncodeToString(want[:]), hex.EncodeToString(rt[3]), "RTMR3 must replay from the log")
	_, err = os.Stat(filepath.Join(p.stateDir, WALFile))
	require.ErrorIs(t, err, fs.ErrNotExist, "no pending write-ahead record")
	return n
}

func TestOpenAutoRequiresTDX(t *testing.T) {
	e := newEnv(t)
	e.tsm = fakeTSM(t, fixture(t, "tdx/cos-113-tdx-quote.dat"), true, "fake")
	_, err := Open(context.Background(), e.opts(TEEAuto))
	require.ErrorIs(t, err, ErrNoTEE)
	assert.Contains(t, err.Error(), `"fake"`)
	assert.Contains(t, err.Error(), "--tee sample")
	_, err = Open(context.Background(), e.opts(TEETDX))
	require.ErrorIs(t, err, ErrNoTEE)
	_, err = Open(context.Background(), e.opts("sgx"))
	require.ErrorIs(t, err, ErrNoTEE)

	if _, err := os.Stat("/sys/kernel/config/tsm/report"); err != nil {
		// This machine has no configfs-tsm: the real client makes auto fail clearly.
		_, err := Open(context.Background(), Options{TEE: TEEAuto, StateDir: t.TempDir()})
		require.ErrorIs(t, err, ErrNoTEE)
		assert.Contains(t, err.Error(), "configfs-tsm")
	}

	e.tsm = fakeTSM(t, fixture(t, "tdx/cos-113-tdx-quote.dat"), true, "tdx_guest")
	p := e.open(t, TEEAuto)
	assert.Equal(t, TEETDX, p.TEE())
}

func TestTDXAttest(t *testing.T) {
	for _, name := range []string{"cos-113-tdx-quote.dat", "quote_v5_sample.dat"} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t)
			quote := fixture(t, "tdx/"+name)
			e.tsm = fakeTSM(t, quote, true, "tdx_guest")
			p := e.open(t, TEETDX)
			var rd [64]byte
			for i := range rd {
				rd[i] = byte(i)
			}
			ev, err := p.Attest(context.Background(), rd)
			require.NoError(t, err)
			assert.Equal(t, TEETDX, ev.TEE)
			assert.Nil(t, ev.CCEventLog, "no CCEL and no records: nil")
			off := reportDataOffset(ev.Quote)
			assert.Equal(t, rd[:], ev.Quote[off:off+64])
			assert.Equal(t, quote[:off], ev.Quote[:off])
		})
	}

	// Unpatched: the quote's REPORTDATA is not what was asked for, and that is refused.
	e := newEnv(t)
	e.tsm = fakeTSM(t, fixture(t, "tdx/cos-113-tdx-quote.dat"), false, "tdx_guest")
	p := e.open(t, TEETDX)
	_, err := p.Attest(context.Background(), [64]byte{1})
	require.ErrorIs(t, err, ErrQuote)
	// …but the fixture's own (all-zero) REPORTDATA works and yields the verifying quote.
	ev, err := p.Attest(context.Background(), [64]byte{})
	require.NoError(t, err)
	assert.Equal(t, fixture(t, "tdx/cos-113-tdx-quote.dat"), ev.Quote)

	// Garbage from the provider is refused.
	e.tsm = fakeTSM(t, []byte("not a quote"), false, "tdx_guest")
	p = e.open(t, TEETDX)
	_, err = p.Attest(context.Background(), [64]byte{})
	require.ErrorIs(t, err, ErrQuote)
}

// cc_eventlog = firmware CCEL (trimmed) ‖ our records ‖ 8×FF; it replays to the quote's
// RTMR0..2 and to RTMR3 as extended.
func TestCCEventLogWithCCEL(t *testing.T) {
	e := newEnv(t)
	e.installCCEL(t)
	p := e.open(t, TEETDX)

	cc, err := p.CCEventLog()
	require.NoError(t, err)
	ccel, err := tcg.Trim(fixture(t, "tdx/cos-113-ccel_data.dat"))
	require.NoError(t, err)
	require.Equal(t, append(append([]byte{}, ccel...), tcg.EndMarker...), cc)

	ev1, _ := BinaryEvent("/usr/bin/ollama", bytes.Repeat([]byte{0xAB}, 48))
	ev2, _ := ModelEvent("tinyllama:latest", bytes.Repeat([]byte{0xCD}, 32))
	for _, ev := range []Event{ev1, ev2} {
		d, err := p.Measure(context.Background(), ev)
		require.NoError(t, err)
		want := AAELDigest(ev)
		require.Equal(t, want[:], d)
	}
	requireConsistent(t, p)

	ev, err := p.AttestNonce(context.Background(), "nonce-1")
	require.NoError(t, err)
	own, err := p.EventLog()
	require.NoError(t, err)
	want := append(append(append([]byte{}, ccel...), own...), tcg.EndMarker...)
	require.Equal(t, want, ev.CCEventLog)
	rd, err := NonceReportData("nonce-1", ev.CCEventLog)
	require.NoError(t, err)
	off := reportDataOffset(ev.Quote)
	assert.Equal(t, rd[:], ev.Quote[off:off+64], "REPORTDATA binds the nonce and the log served")

	// Replay of the joined log: RTMR0..2 are the quote's, RTMR3 the fake kernel's.
	l, err := tcg.Walk(ev.CCEventLog)
	require.NoError(t, err)
	var mr [4][48]byte
	for _, r := range l.Records {
		if r.MRIndex == 0 || r.Type == tcg.EvNoAction {
			continue
		}
		var d [48]byte
		copy(d[:], r.Digests[0].Sum)
		mr[r.MRIndex-1] = rtmr.ExtendValue(mr[r.MRIndex-1], d)
	}
	qr, err := QuoteRTMRs(ev.Quote)
	require.NoError(t, err)
	for i := 0; i < 3; i++ {
		assert.Equal(t, qr[i], mr[i], "RTMR%d", i)
	}
	assert.Equal(t, e.k.RTMR(3), mr[3])
}

func TestMeasureInterfaces(t *testing.T) {
	for _, tc := range []struct {
		name string
		k    func(root string) *rtmrtest.Kernel
	}{
		{"sysfs", func(root string) *rtmrtest.Kernel { return &rtmrtest.Kernel{Root: root, Sysfs: true} }},
		{"sysfs preferred over ioctl", func(root string) *rtmrtest.Kernel {
			return &rtmrtest.Kernel{Root: root, Sysfs: true, Ioctl: true, V3Only: true}
		}},
		{"ioctl", func(root string) *rtmrtest.Kernel { return &rtmrtest.Kernel{Root: root, Ioctl: true} }},
		{"ioctl v3 numbering", func(root string) *rtmrtest.Kernel { return &rtmrtest.Kernel{Root: root, Ioctl: true, V3Only: true} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.k = tc.k(e.root)
			p := e.open(t, TEETDX)
			for i := 0; i < 3; i++ {
				_, err := p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: fmt.Sprint(i)})
				require.NoError(t, err)
			}
			assert.Equal(t, 3, requireConsistent(t, p))
			assert.Equal(t, 3, e.k.Extends())
		})
	}

	// Neither interface: attestation works, measurement fails with ErrMeasure.
	e := newEnv(t)
	e.k = &rtmrtest.Kernel{Root: e.root}
	p := e.open(t, TEETDX)
	_, err := p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "x"})
	require.ErrorIs(t, err, ErrMeasure)
	require.ErrorIs(t, err, rtmr.ErrNotSupported)
	_, err = p.Attest(context.Background(), [64]byte{})
	require.NoError(t, err)
	// RTMRs then come from a quote.
	rt, err := p.RTMRs()
	require.NoError(t, err)
	qr, _ := QuoteRTMRs(fixture(t, "tdx/cos-113-tdx-quote.dat"))
	assert.Equal(t, qr[0][:], rt[0])

	// An invalid event is refused before anything happens.
	_, err = newEnv(t).open(t, TEESample).Measure(context.Background(), Event{Domain: "a b", Operation: "o"})
	require.ErrorIs(t, err, ErrInvalidEvent)
}

var errCrash = errors.New("simulated crash")

// A crash between any two steps of a measurement (write-ahead record, extend, append, clear)
// is recovered at the next Open with RTMR3 and the log agreeing.
func TestCrashRecovery(t *testing.T) {
	type outcome int
	const (
		dropped outcome = iota
		kept
	)
	for _, tc := range []struct {
		name  string
		setup func(e *env, p *Platform)
		want  outcome
	}{
		{"after write-ahead record", func(e *env, p *Platform) { p.hook = crashAt("wal", false) }, dropped},
		{"after write-ahead record (panic)", func(e *env, p *Platform) { p.hook = crashAt("wal", true) }, dropped},
		{"after extend", func(e *env, p *Platform) { p.hook = crashAt("extend", false) }, kept},
		{"after extend (panic)", func(e *env, p *Platform) { p.hook = crashAt("extend", true) }, kept},
		{"during append (half a record written)", func(e *env, p *Platform) {
			p.hook = func(step string) error {
				if step != "extend" {
					return nil
				}
				f, err := os.OpenFile(filepath.Join(e.state, EventLogFile), os.O_WRONLY|os.O_APPEND, 0)
				if err != nil {
					return err
				}
				f.Write([]byte{4, 0, 0, 0, 6, 0})
				f.Close()
				return errCrash
			}
		}, kept},
		{"after append", func(e *env, p *Platform) { p.hook = crashAt("append", false) }, kept},
		{"after append (panic)", func(e *env, p *Platform) { p.hook = crashAt("append", true) }, kept},
		{"after clear", func(e *env, p *Platform) { p.hook = crashAt("clear", false) }, kept},
		{"kernel fails before extending", func(e *env, p *Platform) {
			e.k.BeforeExtend = func(int) error { return syscall.EIO }
		}, dropped},
		{"during the write-ahead record (temp file left)", func(e *env, p *Platform) {
			p.hook = func(step string) error {
				if step != "wal" {
					return nil
				}
				// Undo the rename: as if the crash came before it.
				wal := filepath.Join(e.state, WALFile)
				return errors.Join(os.Rename(wal, filepath.Join(e.state, "."+WALFile+".tmp123")), errCrash)
			}
		}, dropped},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			p, err := Open(context.Background(), e.opts(TEETDX))
			require.NoError(t, err)
			_, err = p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "before"})
			require.NoError(t, err)
			rtmrBefore := e.k.RTMR(3)

			tc.setup(e, p)
			func() {
				defer func() { _ = recover() }()
				_, err = p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "crash"})
			}()
			// The process "dies": drop p without any cleanup beyond what the kernel does
			// (closing the lock file releases the flock).
			p.lock.Close()
			e.k.BeforeExtend = nil

			p2 := e.open(t, TEETDX)
			n := requireConsistent(t, p2)
			log, err := p2.EventLog()
			require.NoError(t, err)
			recs, err := tcg.Walk(log)
			require.NoError(t, err)
			switch tc.want {
			case dropped:
				assert.Equal(t, 1, n)
				assert.Equal(t, rtmrBefore, e.k.RTMR(3))
			case kept:
				assert.Equal(t, 2, n)
				assert.Contains(t, string(recs.Records[1].Data), "Test crash")
			}
			matches, _ := filepath.Glob(filepath.Join(e.state, ".*tmp*"))
			assert.Empty(t, matches, "temporary files are cleaned up")

			// And measuring continues normally.
			_, err = p2.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "after"})
			require.NoError(t, err)
			assert.Equal(t, n+1, requireConsistent(t, p2))
		})
	}
}

func crashAt(step string, panics bool) func(string) error {
	return func(s string) error {
		if s != step {
			return nil
		}
		if panics {
			panic(errCrash)
		}
		return errCrash
	}
}

// The kernel reports an error although it extended: the measurement is logged and succeeds.
func TestExtendErrorAfterEffect(t *testing.T) {
	e := newEnv(t)
	e.k.AfterExtend = func(int) error { return syscall.EINTR }
	p := e.open(t, TEETDX)
	_, err := p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "x"})
	require.NoError(t, err)
	assert.Equal(t, 1, requireConsistent(t, p))
}

// Another writer extending RTMR3 while a measurement is pending cannot be reconciled.
func TestRecoveryInconsistent(t *testing.T) {
	e := newEnv(t)
	crashAfterWAL(t, e)
	e.k.SetRTMR(3, sha512.Sum384([]byte("someone else")))
	_, err := Open(context.Background(), e.opts(TEETDX))
	require.ErrorIs(t, err, ErrInconsistent)

	// A corrupt write-ahead record is refused too.
	require.NoError(t, os.WriteFile(filepath.Join(e.state, WALFile), []byte("{"), 0o600))
	_, err = Open(context.Background(), e.opts(TEETDX))
	require.ErrorIs(t, err, ErrInconsistent)
}

// A log left from an earlier boot (RTMR3 back to zero) is moved aside.
func TestStaleLogRetired(t *testing.T) {
	e := newEnv(t)
	p := e.open(t, TEETDX)
	_, err := p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "x"})
	require.NoError(t, err)
	p.Close()
	e.k.SetRTMR(3, [48]byte{}) // reboot
	p2 := e.open(t, TEETDX)
	assert.Equal(t, 0, requireConsistent(t, p2))
	stale, _ := filepath.Glob(filepath.Join(e.state, EventLogFile+".stale-*"))
	assert.Len(t, stale, 1)
}

// measureThenCorrupt opens the platform of tee, measures one event and appends garbage to the
// agent's own log.
func (e *env) measureThenCorrupt(t *testing.T, tee string) *Platform {
	t.Helper()
	p := e.open(t, tee)
	_, err := p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "x"})
	require.NoError(t, err)
	f, err := os.OpenFile(filepath.Join(e.state, EventLogFile), os.O_WRONLY|os.O_APPEND, 0)
	require.NoError(t, err)
	_, err = f.Write([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9})
	require.NoError(t, err)
	require.NoError(t, f.Close())
	return p
}

// A corrupt own log is an ErrEventLog, never silently served.
func TestCorruptOwnLog(t *testing.T) {
	e := newEnv(t)
	p := e.measureThenCorrupt(t, TEESample)
	_, err := p.CCEventLog()
	require.ErrorIs(t, err, ErrEventLog)
	_, err = p.Attest(context.Background(), [64]byte{})
	require.ErrorIs(t, err, ErrEventLog)
}

// Nor is RTMR3 extended past a corrupt own log: a record appended after the garbage would be
// unreadable too, and RTMR3 would hold a measurement no verifier can ever replay.
func TestMeasureRefusesCorruptOwnLog(t *testing.T) {
	e := newEnv(t)
	p := e.measureThenCorrupt(t, TEETDX)
	before := e.k.RTMR(3)
	extends := e.k.Extends()
	_, err := p.Measure(context.Background(), Event{Domain: "example.com", Operation: "Test", Content: "y"})
	require.ErrorIs(t, err, ErrEventLog)
	assert.Equal(t, before, e.k.RTMR(3))
	assert.Equal(t, extends, e.k.Extends())
	_, err = os.Stat(filepath.Join(e.state, WALFile))
	assert.ErrorIs(t, err, fs.ErrNotExist)
}

func TestSampleTEE(t *testing.T) {
	e := newEnv(t)
	p := e.open(t, TEESample)
	assert.Equal(t, TEESample, p.TEE())

	ev, err := p.Attest(context.Background(), [64]byte{7})
	require.NoError(t, err)
	assert.Nil(t, ev.CCEventLog)
	q, err := ParseSampleQuote(ev.Quote)
	require.NoError(t, err)
	assert.Equal(t, "1", q.SVN)
	assert.True(t, q.Unsigned)
	rd, _ := q.ReportDataBytes()
	assert.Equal(t, [64]byte{7}, rd)
	// A SHA-384 binding (last 16 bytes zero) is encoded as its 48 bytes, as CoCo's sample
	// attester encodes the runtime-data digest that Trustee's sample verifier compares.
	assert.Equal(t, base64.StdEncoding.EncodeToString(rd[:48]), q.ReportData)
	full := [64]byte{63: 1}
	ev, err = p.Attest(context.Background(), full)
	require.NoError(t, err)
	q, err = ParseSampleQuote(ev.Quote)
	require.NoError(t, err)
	assert.Equal(t, base64.StdEncoding.EncodeToString(full[:]), q.ReportData)
	rd, _ = q.ReportDataBytes()
	assert.Equal(t, full, rd)

	_, err = p.Measure(context.Background(), Event{Domain: "domain", Operation: "operation", Content: "content"})
	require.NoError(t, err)
	requireConsistent(t, p)
	ev, err = p.Attest(context.Background(), [64]byte{})
	require.NoError(t, err)
	require.True(t, bytes.HasPrefix(ev.CCEventLog, tcg.SpecIDHeader()), "no CCEL: a Spec ID header first")
	require.True(t, bytes.HasSuffix(ev.CCEventLog, tcg.EndMarker))
	q, err = ParseSampleQuote(ev.Quote)
	require.NoError(t, err)
	mr, err := q.RTMRs()
	require.NoError(t, err)
	d := AAELDigest(Event{Domain: "domain", Operation: "operation", Content: "content"})
	assert.Equal(t, rtmr.ExtendValue([48]byte{}, d), mr[3])
	qr, err := QuoteRTMRs(ev.Quote)
	require.NoError(t, err)
	assert.Equal(t, mr, qr)

	// Sample never reads the firmware CCEL even when present.
	e.installCCEL(t)
	cc, err := p.CCEventLog()
	require.NoError(t, err)
	assert.True(t, bytes.HasPrefix(cc, tcg.SpecIDHeader()))

	// State survives reopening; the state file says what it is.
	p.Close()
	p2 := e.open(t, TEESample)
	requireConsistent(t, p2)
	st, err := os.ReadFile(filepath.Join(e.state, SampleFile))
	require.NoError(t, err)
	assert.Contains(t, string(st), "SAMPLE TEE")

	// Strict parsing.
	for _, bad := range []string{`{"svn":"1","report_data":""}`, `{"svn":"1","report_data":"` + q.ReportData + `","rtmrs":["","","",""],"unsigned":true,"warning":""}`, string(fixture(t, "tdx/cos-113-tdx-quote.dat"))} {
		_, err := ParseSampleQuote([]byte(bad))
		assert.Error(t, err)
	}
}

// Two Platforms (as two processes) measuring concurrently through one state dir stay consistent.
func TestConcurrentMeasure(t *testing.T) {
	e := newEnv(t)
	ps := []*Platform{e.open(t, TEETDX), e.open(t, TEETDX)}
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			p := ps[i%2]
			for j := 0; j < 5; j++ {
				if i%2 == 0 {
					_, err := p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: fmt.Sprint(i, j)})
					assert.NoError(t, err)
				} else {
					_, err := p.Attest(context.Background(), [64]byte{byte(j)})
					assert.NoError(t, err)
				}
			}
		}(i)
	}
	wg.Wait()
	assert.Equal(t, 10, requireConsistent(t, ps[0]))
}

// A write-ahead record whose record does not take old_rtmr3 to new_rtmr3 is refused: a
// tampered record can never be appended to the log.
func TestRecoveryRefusesForgedRecord(t *testing.T) {
	e := newEnv(t)
	p, err := Open(context.Background(), e.opts(TEETDX))
	require.NoError(t, err)
	p.hook = crashAt("extend", false)
	_, err = p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "real"})
	require.ErrorIs(t, err, errCrash)
	p.Close()

	walPath := filepath.Join(e.state, WALFile)
	b, err := os.ReadFile(walPath)
	require.NoError(t, err)
	var w walRecord
	require.NoError(t, json.Unmarshal(b, &w))
	forged, _ := tcg.AAELRecord(Domain + " Test forged")
	w.Record = forged
	b, _ = json.Marshal(w)
	require.NoError(t, os.WriteFile(walPath, b, 0o600))
	_, err = Open(context.Background(), e.opts(TEETDX))
	require.ErrorIs(t, err, ErrInconsistent)
}

// BenchmarkMeasure is the cost of one crash-safe measurement (write-ahead record with fsyncs,
// extension through the fake sysfs, log append with fsync, clear).
func BenchmarkMeasure(b *testing.B) {
	e := newEnv(b)
	p := e.open(b, TEETDX)
	ev := Event{Domain: Domain, Operation: "Bench", Content: `{"n":1}`}
	for b.Loop() {
		if _, err := p.Measure(context.Background(), ev); err != nil {
			b.Fatal(err)
		}
	}
}

func TestMain(m *testing.M) {
	// The library logs measurements and recoveries with slog; keep test output readable.
	slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil)))
	os.Exit(m.Run())
}

// A reboot with a persistent state directory and a pending write-ahead record: RTMR3 is zero
// again, so the old record and log are retired instead of blocking the agent.
func TestStaleWALAfterReboot(t *testing.T) {
	e := newEnv(t)
	p, err := Open(context.Background(), e.opts(TEETDX))
	require.NoError(t, err)
	_, err = p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "a"})
	require.NoError(t, err)
	p.hook = crashAt("extend", false)
	_, err = p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "b"})
	require.ErrorIs(t, err, errCrash)
	p.Close()
	e.k.SetRTMR(3, [48]byte{}) // reboot
	p2 := e.open(t, TEETDX)
	assert.Equal(t, 0, requireConsistent(t, p2))
	stale, _ := filepath.Glob(filepath.Join(e.state, "*.stale-*"))
	assert.Len(t, stale, 2)
}

// Open warns when RTMR3 does not replay from the agent's log (another writer).
func TestWarnsWhenUnreplayable(t *testing.T) {
	var buf bytes.Buffer
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&buf, nil)))
	defer slog.SetDefault(old)

	e := newEnv(t)
	e.open(t, TEETDX).Close()
	assert.NotContains(t, buf.String(), "does not replay")
	e.k.SetRTMR(3, sha512.Sum384([]byte("someone else")))
	e.open(t, TEETDX).Close()
	assert.Contains(t, buf.String(), "RTMR3 does not replay")
}

// A hostile quote that makes go-tdx-guest's abi panic (the FuzzParseQuote crasher kept in
// evidence/verify) is an error, not a crash of `eventlog replay --quote`.
func TestQuoteRTMRsHostileQuote(t *testing.T) {
	raw, err := os.ReadFile("verify/testdata/fuzz/FuzzParseQuote/149b652469d09bfd")
	require.NoError(t, err)
	lines := strings.SplitN(string(raw), "\n", 2)
	require.Len(t, lines, 2)
	lit := strings.TrimSpace(lines[1])
	lit = strings.TrimSuffix(strings.TrimPrefix(lit, "[]byte("), ")")
	quote, err := strconv.Unquote(lit)
	require.NoError(t, err)
	_, err = QuoteRTMRs([]byte(quote))
	require.Error(t, err)
}

// A state directory others can write is tightened when this process owns it (an emptyDir is
// 0777) and refused when it is shared (sticky, like /tmp) or someone else's.
func TestStateDirPermissions(t *testing.T) {
	own := filepath.Join(t.TempDir(), "state")
	require.NoError(t, os.Mkdir(own, 0o755))
	require.NoError(t, os.Chmod(own, 0o777))
	p, err := Open(context.Background(), Options{TEE: TEESample, StateDir: own})
	require.NoError(t, err)
	p.Close()
	fi, err := os.Stat(own)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o755), fi.Mode().Perm())

	shared := filepath.Join(t.TempDir(), "shared")
	require.NoError(t, os.Mkdir(shared, 0o755))
	require.NoError(t, os.Chmod(shared, 0o777|os.ModeSticky))
	_, err = Open(context.Background(), Options{TEE: TEESample, StateDir: shared})
	require.ErrorContains(t, err, "writable by others")
	fi, err = os.Stat(shared)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o777), fi.Mode().Perm(), "left as it was")

	if os.Geteuid() != 0 {
		return // chown needs root
	}
	foreign := filepath.Join(t.TempDir(), "foreign")
	require.NoError(t, os.Mkdir(foreign, 0o755))
	require.NoError(t, os.Chmod(foreign, 0o777))
	require.NoError(t, os.Chown(foreign, 65534, 65534))
	_, err = Open(context.Background(), Options{TEE: TEESample, StateDir: foreign})
	require.ErrorContains(t, err, "writable by others")
}

// crashAfterWAL leaves a pending measurement in e's state directory: the write-ahead
// record is written, then the process "crashes" before RTMR3 is extended.
func crashAfterWAL(t *testing.T, e *env) {
	t.Helper()
	p, err := Open(context.Background(), e.opts(TEETDX))
	require.NoError(t, err)
	p.hook = crashAt("wal", false)
	_, err = p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "x"})
	require.ErrorIs(t, err, errCrash)
	p.Close()
}

// A full own log (MaxOwnRecords measurements) refuses another one: a verifier would refuse
// the evidence.
// seedOwnLog writes, as if measured earlier this boot, the agent's log of the events next(0),
// next(1), … until next returns false, with the fake RTMR3 set to their fold, which it returns.
func (e *env) seedOwnLog(t *testing.T, next func(i int) (Event, bool)) [48]byte {
	t.Helper()
	var log []byte
	var r3 [48]byte
	for i := 0; ; i++ {
		ev, ok := next(i)
		if !ok {
			break
		}
		rec, d := tcg.AAELRecord(ev.Text())
		log = append(log, rec...)
		r3 = rtmr.ExtendValue(r3, d)
	}
	require.NoError(t, os.MkdirAll(e.state, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(e.state, EventLogFile), log, 0o600))
	e.k.SetRTMR(3, r3)
	return r3
}

func TestMeasureRefusesFullLog(t *testing.T) {
	e := newEnv(t)
	r3 := e.seedOwnLog(t, func(i int) (Event, bool) {
		return Event{Domain: "example.com", Operation: "Tick", Content: strconv.Itoa(i)}, i < MaxOwnRecords
	})
	p := e.open(t, TEETDX)
	_, err := p.Measure(context.Background(), Event{Domain: "example.com", Operation: "Tick", Content: "one more"})
	require.ErrorIs(t, err, ErrMeasure)
	require.ErrorIs(t, err, ErrLogFull)
	require.Contains(t, err.Error(), "32768 measurements")
	assert.Equal(t, r3, e.k.RTMR(3))
}

// The own log also stops at MaxOwnLogSize bytes (big events fill it before the record count).
func TestMeasureRefusesLogOverSize(t *testing.T) {
	e := newEnv(t)
	big := strings.Repeat("x", 16<<10)
	size := 0
	r3 := e.seedOwnLog(t, func(i int) (Event, bool) {
		ev := Event{Domain: "example.com", Operation: strconv.Itoa(i), Content: big}
		rec, _ := tcg.AAELRecord(ev.Text())
		more := size < MaxOwnLogSize-(16<<10) // until less than one big event's room is left
		size += len(rec)
		return ev, more
	})
	p := e.open(t, TEETDX)
	_, err := p.Measure(context.Background(), Event{Domain: "example.com", Operation: "last", Content: big})
	require.ErrorIs(t, err, ErrLogFull)
	assert.Equal(t, r3, e.k.RTMR(3))
	// A small one still fits.
	_, err = p.Measure(context.Background(), Event{Domain: "example.com", Operation: "small", Content: "x"})
	require.NoError(t, err)
}

// A measurement waiting for the platform (held, say, by a hung quote) gives up when its
// context ends, and measures nothing later.
func TestMeasureGivesUpWaiting(t *testing.T) {
	e := newEnv(t)
	p := e.open(t, TEETDX)
	held, release := make(chan struct{}), make(chan struct{})
	go p.locked(func() error { close(held); <-release; return nil })
	<-held
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := p.Measure(ctx, Event{Domain: "example.com", Operation: "Late", Content: "x"})
		done <- err
	}()
	cancel()
	select {
	case err := <-done:
		require.ErrorIs(t, err, context.Canceled)
	case <-time.After(10 * time.Second):
		t.Fatal("Measure kept waiting for the platform after its context ended")
	}
	close(release)
	_, err := p.Measure(context.Background(), Event{Domain: "example.com", Operation: "Next", Content: "y"})
	require.NoError(t, err)
	assert.Equal(t, 1, e.k.Extends(), "only the second measurement")
}

// MeasureOnce extends RTMR3 only for an event its log does not hold yet; Measure always does.
// A full log still takes a MeasureOnce of an event it holds (nothing to extend).
func TestMeasureOnce(t *testing.T) {
	e := newEnv(t)
	p := e.open(t, TEETDX)
	ctx := context.Background()
	bin := Event{Domain: Domain, Operation: OpBinary, Content: `{"path":"/usr/bin/ollama","sha384":"00"}`}
	d1, measured, err := p.MeasureOnce(ctx, bin)
	require.NoError(t, err)
	assert.True(t, measured)
	r3 := e.k.RTMR(3)
	d2, measured, err := p.MeasureOnce(ctx, bin)
	require.NoError(t, err)
	assert.False(t, measured)
	assert.Equal(t, d1, d2)
	assert.Equal(t, r3, e.k.RTMR(3), "nothing extended")
	log, err := p.EventLog()
	require.NoError(t, err)
	l, err := tcg.Walk(log)
	require.NoError(t, err)
	assert.Len(t, l.Records, 1)

	// Another event (other content) is measured; Measure repeats an event.
	other := bin
	other.Content = `{"path":"/usr/bin/ollama","sha384":"01"}`
	_, measured, err = p.MeasureOnce(ctx, other)
	require.NoError(t, err)
	assert.True(t, measured)
	_, err = p.Measure(ctx, bin)
	require.NoError(t, err)
	log, err = p.EventLog()
	require.NoError(t, err)
	l, err = tcg.Walk(log)
	require.NoError(t, err)
	assert.Len(t, l.Records, 3)

	// A full log refuses a new event but not one it holds.
	e = newEnv(t)
	e.seedOwnLog(t, func(i int) (Event, bool) {
		return Event{Domain: "example.com", Operation: "Tick", Content: strconv.Itoa(i)}, i < MaxOwnRecords
	})
	p = e.open(t, TEETDX)
	_, measured, err = p.MeasureOnce(ctx, Event{Domain: "example.com", Operation: "Tick", Content: "7"})
	require.NoError(t, err)
	assert.False(t, measured)
	_, _, err = p.MeasureOnce(ctx, Event{Domain: "example.com", Operation: "Tick", Content: "new"})
	require.ErrorIs(t, err, ErrLogFull)
}
