package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/agent/store"
	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
	"github.com/cai-agent/cai-agent/kbc"
)

const testResource = "kbs:///default/model-key/test"

// fakeTEE records measurements (fails when err is set) and the RTMR3 it would hold.
type fakeTEE struct {
	mu     sync.Mutex
	events []evidence.Event
	failOp string // fail the measurement of this operation
}

func (f *fakeTEE) Measure(_ context.Context, ev evidence.Event) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := ev.Validate(); err != nil {
		return nil, err
	}
	if ev.Operation == f.failOp {
		return nil, evidence.ErrMeasure
	}
	f.events = append(f.events, ev)
	d := evidence.AAELDigest(ev)
	return d[:], nil
}

func (f *fakeTEE) ops() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var s []string
	for _, e := range f.events {
		s = append(s, e.Operation)
	}
	return s
}

// fakeBroker releases key for testResource, records how many measurements existed at the
// time of the request, or fails with err.
type fakeBroker struct {
	key            []byte
	err            error
	tee            *fakeTEE
	measuredBefore int
	calls          int
	released       [][]byte // the slices handed out (the agent must wipe them)
}

func (b *fakeBroker) GetResource(_ context.Context, uri string) ([]byte, error) {
	b.calls++
	if b.tee != nil {
		b.measuredBefore = len(b.tee.ops())
	}
	if b.err != nil {
		return nil, b.err
	}
	if uri != testResource {
		return nil, kbc.ErrNotFound
	}
	k := bytes.Clone(b.key)
	b.released = append(b.released, k)
	return k, nil
}

// testModel encrypts a small multi-file, multi-shard model and returns its directory, the
// key and the plaintext files.
func testModel(t testing.TB, size int) (dir string, key []byte, plain map[string][]byte) {
	t.Helper()
	in := t.TempDir()
	plain = map[string][]byte{
		"weights.bin":   make([]byte, size),
		"config.json":   []byte(`{"layers":2}`),
		"tok/vocab.txt": bytes.Repeat([]byte("token\n"), 1000),
	}
	_, err := rand.Read(plain["weights.bin"])
	require.NoError(t, err)
	var files []modelcrypt.InputFile
	for name, b := range plain {
		p := filepath.Join(in, filepath.FromSlash(name))
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, b, 0o644))
		files = append(files, modelcrypt.InputFile{Name: name, Path: p})
	}
	key = make([]byte, modelcrypt.KeySize)
	_, err = rand.Read(key)
	require.NoError(t, err)
	dir = filepath.Join(t.TempDir(), "enc")
	_, err = modelcrypt.Encrypt(context.Background(), key, files, dir, modelcrypt.EncryptOptions{ChunkSize: 4096, ShardSize: 64 << 10, KeyHint: testResource})
	require.NoError(t, err)
	return dir, key, plain
}

func requirePublished(t *testing.T, out string, plain map[string][]byte) {
	t.Helper()
	for name, b := range plain {
		got, err := os.ReadFile(filepath.Join(out, filepath.FromSlash(name)))
		require.NoError(t, err, name)
		require.True(t, bytes.Equal(b, got), name)
	}
	_, err := store.ReadReady(out)
	require.NoError(t, err)
}

// requireNothingPublished checks that out holds no model file and no ready marker.
func requireNothingPublished(t *testing.T, out string, plain map[string][]byte) {
	t.Helper()
	for name := range plain {
		_, err := os.Stat(filepath.Join(out, filepath.FromSlash(name)))
		require.ErrorIs(t, err, os.ErrNotExist, name)
	}
	_, err := store.ReadReady(out)
	require.ErrorIs(t, err, os.ErrNotExist)
	entries, _ := os.ReadDir(filepath.Join(out, store.MetaDir, store.StagingDir))
	require.Empty(t, entries, "staged plaintext left behind")
}

func TestRunPublishesAndMeasures(t *testing.T) {
	dir, key, plain := testModel(t, 300<<10)
	tee := &fakeTEE{}
	broker := &fakeBroker{key: key, tee: tee}
	out := filepath.Join(t.TempDir(), "out")
	self, err := os.Executable()
	require.NoError(t, err)
	var progressed int64
	var pmu sync.Mutex
	cfg := Config{
		Source: modelcrypt.DirSource(dir), Out: out, Evidence: tee, Broker: broker,
		MeasureBinaries: []string{self}, AllowNonTmpfs: true, VerifyDigests: true, ModelName: "test-model",
		Progress: func(done, total int64) { pmu.Lock(); progressed = max(progressed, done); pmu.Unlock() },
	}
	res, err := Run(context.Background(), cfg)
	require.NoError(t, err)
	requirePublished(t, out, plain)
	require.Len(t, broker.released, 1)
	require.Equal(t, make([]byte, len(key)), broker.released[0], "the released key was not wiped")
	require.Equal(t, []string{evidence.OpBinary, evidence.OpModel}, tee.ops())
	require.Equal(t, 1, broker.measuredBefore, "binaries must be measured before the key is requested")
	require.Equal(t, 3, res.Files)
	require.False(t, res.AlreadyPublished)
	require.Len(t, res.Measurements, 2)
	require.Contains(t, res.Measurements[1].Content, `"name":"test-model"`)
	require.Contains(t, res.Measurements[1].Content, res.ManifestSHA256)
	var total int64
	for _, b := range plain {
		total += int64(len(b))
	}
	require.Equal(t, total, res.Bytes)
	require.Equal(t, total, progressed)

	// Rerun: a no-op that still measures the model.
	res2, err := Run(context.Background(), cfg)
	require.NoError(t, err)
	require.True(t, res2.AlreadyPublished)
	require.Zero(t, res2.Bytes)
	require.Equal(t, []string{evidence.OpBinary, evidence.OpModel, evidence.OpBinary, evidence.OpModel}, tee.ops())
	require.Equal(t, res.Measurements[1].Digest, res2.Measurements[1].Digest)
	requirePublished(t, out, plain)
}

// With the real evidence platform, a retried run measures each binary once per boot (its log
// already holds the event) but the model every time: the log grows by one Model event, not by
// the binaries again, and RTMR3 still replays from it.
func TestRunRetriedMeasuresBinariesOnce(t *testing.T) {
	dir, key, _ := testModel(t, 10<<10)
	ctx := context.Background()
	tee, err := evidence.Open(ctx, evidence.Options{TEE: evidence.TEESample, StateDir: filepath.Join(t.TempDir(), "state")})
	require.NoError(t, err)
	defer tee.Close()
	cfg := Config{Source: modelcrypt.DirSource(dir), Out: filepath.Join(t.TempDir(), "out"), Evidence: tee,
		Broker: &fakeBroker{key: key}, MeasureBinaries: []string{"agent_test.go", "agent.go"}, AllowNonTmpfs: true}
	records := func() []eventlog.Record {
		b, err := tee.EventLog()
		require.NoError(t, err)
		recs, err := eventlog.Parse(b)
		require.NoError(t, err)
		return recs
	}
	res, err := Run(ctx, cfg)
	require.NoError(t, err)
	require.Len(t, records(), 3)
	for _, m := range res.Measurements {
		require.False(t, m.AlreadyMeasured)
	}

	// A failed attempt after the binaries (the broker refuses) and a retry.
	cfg.Broker = &fakeBroker{err: kbc.ErrRefused}
	_, err = Run(ctx, cfg)
	require.ErrorIs(t, err, kbc.ErrRefused)
	cfg.Broker = &fakeBroker{key: key}
	res, err = Run(ctx, cfg)
	require.NoError(t, err)
	recs := records()
	require.Len(t, recs, 4, "only the model measured again")
	require.Equal(t, evidence.OpModel, recs[3].AAEL.Operation)
	require.Len(t, res.Measurements, 3)
	require.True(t, res.Measurements[0].AlreadyMeasured)
	require.True(t, res.Measurements[1].AlreadyMeasured)
	require.False(t, res.Measurements[2].AlreadyMeasured)
	r, err := tee.RTMRs()
	require.NoError(t, err)
	rep, err := eventlog.Replay(recs)
	require.NoError(t, err)
	require.Equal(t, r[3], rep[3][:])
}

func TestRunBase64Key(t *testing.T) {
	dir, key, plain := testModel(t, 10<<10)
	tee := &fakeTEE{}
	b64 := []byte(" " + base64Std(key) + "\n")
	out := t.TempDir()
	_, err := Run(context.Background(), Config{Source: modelcrypt.DirSource(dir), Out: out, Evidence: tee, Broker: &fakeBroker{key: b64}, AllowNonTmpfs: true})
	require.NoError(t, err)
	requirePublished(t, out, plain)
}

func TestRunFailures(t *testing.T) {
	dir, key, plain := testModel(t, 200<<10)
	otherKey := bytes.Clone(key)
	otherKey[0] ^= 1
	tampered := filepath.Join(t.TempDir(), "tampered")
	require.NoError(t, os.CopyFS(tampered, os.DirFS(dir)))
	shards, err := filepath.Glob(filepath.Join(tampered, "*.shard"))
	require.NoError(t, err)
	require.NotEmpty(t, shards)
	b, err := os.ReadFile(shards[len(shards)-1])
	require.NoError(t, err)
	b[len(b)/2] ^= 0x80
	require.NoError(t, os.WriteFile(shards[len(shards)-1], b, 0o644))
	// A model without a key hint: without Config.Resource there is nothing to ask for.
	noHint := filepath.Join(t.TempDir(), "nohint")
	_, err = modelcrypt.Encrypt(context.Background(), key, []modelcrypt.InputFile{{Name: "agent_test.go", Path: "agent_test.go"}}, noHint, modelcrypt.EncryptOptions{})
	require.NoError(t, err)

	for _, tc := range []struct {
		name      string
		src       string
		broker    *fakeBroker
		tee       *fakeTEE
		binaries  []string
		tmpfsOnly bool
		noMeasure bool // nothing may be measured
		kind      string
		step      string
		is        []error
		calls     int // key requests expected
	}{
		{name: "broker refuses", broker: &fakeBroker{err: kbc.ErrRefused}, step: StepGetKey, is: []error{kbc.ErrRefused, ErrKey}, calls: 1},
		{name: "evidence fails", broker: &fakeBroker{err: evidence.ErrQuote}, step: StepGetKey, is: []error{evidence.ErrQuote}, calls: 1},
		{name: "wrong key", broker: &fakeBroker{key: otherKey}, step: StepUnlock, is: []error{modelcrypt.ErrWrongKey}, calls: 1},
		{name: "not a key", broker: &fakeBroker{key: []byte("short")}, step: StepGetKey, is: []error{ErrKey}, calls: 1},
		{name: "binary measurement fails", tee: &fakeTEE{failOp: evidence.OpBinary}, binaries: []string{"agent_test.go"}, step: StepMeasureBinaries, is: []error{evidence.ErrMeasure, ErrMeasure}},
		{name: "missing binary", binaries: []string{"no-such-binary"}, step: StepMeasureBinaries, is: []error{os.ErrNotExist, ErrMeasure}},
		{name: "model measurement fails", tee: &fakeTEE{failOp: evidence.OpModel}, step: StepMeasureModel, is: []error{evidence.ErrMeasure, ErrMeasure}, calls: 1},
		{name: "tampered shard", src: tampered, step: StepDecrypt, is: []error{modelcrypt.ErrCorrupt}, calls: 1},
		// Refused before any binary is measured: a retried broken configuration adds no events.
		{name: "source missing", src: filepath.Join(t.TempDir(), "nothing"), binaries: []string{"agent_test.go"}, step: StepOpenModel, is: []error{ErrSource}, noMeasure: true},
		{name: "no resource", src: noHint, binaries: []string{"agent_test.go"}, step: StepGetKey, is: []error{ErrConfig}, noMeasure: true},
		// A plain-files model where the caller expects an Ollama one (checked on the
		// authenticated manifest: the header may have been swapped after a first read).
		{name: "unexpected kind", kind: modelcrypt.KindOllama, step: StepUnlock, is: []error{ErrConfig}, calls: 1},
		// Refused before anything is measured or a key requested.
		{name: "non-tmpfs output", tmpfsOnly: true, binaries: []string{"agent_test.go"}, step: StepDecrypt, is: []error{store.ErrNotTmpfs}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := dir
			if tc.src != "" {
				src = tc.src
			}
			tee := tc.tee
			if tee == nil {
				tee = &fakeTEE{}
			}
			broker := tc.broker
			if broker == nil {
				broker = &fakeBroker{key: key}
			}
			out := filepath.Join(t.TempDir(), "out")
			if tc.tmpfsOnly {
				if store.CheckTmpfs(filepath.Dir(out)) == nil {
					t.Skip("TMPDIR is on tmpfs")
				}
			}
			_, err := Run(context.Background(), Config{
				Source: modelcrypt.DirSource(src), Out: out, Evidence: tee, Broker: broker,
				MeasureBinaries: tc.binaries, AllowNonTmpfs: !tc.tmpfsOnly, Kind: tc.kind,
			})
			require.Error(t, err)
			var se *StepError
			require.True(t, errors.As(err, &se), "%v", err)
			require.Equal(t, tc.step, se.Step, "%v", err)
			for _, target := range tc.is {
				require.ErrorIs(t, err, target)
			}
			require.Equal(t, tc.calls, broker.calls)
			require.NotContains(t, err.Error(), string(key))
			requireNothingPublished(t, out, plain)
			for _, op := range tee.ops() {
				require.NotEqual(t, evidence.OpModel, op, "model measured although not published")
			}
			if tc.tmpfsOnly || tc.noMeasure {
				require.Empty(t, tee.ops(), "measured before the step that failed")
			}
		})
	}
}

func TestRunCancelled(t *testing.T) {
	dir, key, plain := testModel(t, 200<<10)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	out := t.TempDir()
	_, err := Run(ctx, Config{Source: modelcrypt.DirSource(dir), Out: out, Evidence: &fakeTEE{}, Broker: &fakeBroker{key: key}, AllowNonTmpfs: true})
	require.ErrorIs(t, err, context.Canceled)
	requireNothingPublished(t, out, plain)
}

func TestRunConfig(t *testing.T) {
	_, err := Run(context.Background(), Config{})
	require.ErrorIs(t, err, ErrConfig)
}

func TestParseKey(t *testing.T) {
	k := bytes.Repeat([]byte{7}, 32)
	got, err := ParseKey(k)
	require.NoError(t, err)
	require.Equal(t, k, got)
	got, err = ParseKey([]byte(base64Std(k) + "\n"))
	require.NoError(t, err)
	require.Equal(t, k, got)
	_, err = ParseKey([]byte("c2VjcmV0"))
	require.ErrorIs(t, err, ErrKey)
	require.NotContains(t, err.Error(), "c2VjcmV0")
}

// BinaryEvent refuses what is not a regular file, without blocking on a FIFO planted in
// place of a binary.
func TestBinaryEventNotRegular(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "ollama")
	require.NoError(t, syscall.Mkfifo(fifo, 0o600))
	done := make(chan error, 1)
	go func() { _, err := BinaryEvent(fifo); done <- err }()
	select {
	case err := <-done:
		require.ErrorIs(t, err, ErrConfig)
		require.Contains(t, err.Error(), "not a regular file")
	case <-time.After(10 * time.Second):
		t.Fatal("BinaryEvent blocked on a FIFO")
	}
	_, err := BinaryEvent(dir)
	require.ErrorIs(t, err, ErrConfig)
	wd, err := os.Getwd()
	require.NoError(t, err)
	ev, err := BinaryEvent(filepath.Join("testdata", "..", "agent.go"))
	require.NoError(t, err)
	require.Contains(t, ev.Content, `"path":"`+filepath.Join(wd, "agent.go")+`"`)
}
