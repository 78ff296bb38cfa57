// Package agent is cai-agent's fetch-and-decrypt job: it measures the operator's binaries
// into RTMR3, obtains the model key from a key broker with fresh evidence, stream-decrypts
// the encrypted model from a local directory or an http(s) URL into tmpfs, measures the
// model into RTMR3 and publishes it atomically (a plain directory, or an Ollama store).
//
// The flow, in order (each step is logged with slog and named in a *StepError on failure):
//
//	open-model        read and parse the public header (model.cai) from the source, and settle
//	                  the resource, before anything is measured (a retried failure adds no events)
//	measure-binaries  OpBinary {"path","sha384"} per Config.MeasureBinaries, before any key request
//	                  (once per boot with *evidence.Platform: an event its log holds is not repeated)
//	get-key           Broker.GetResource(Resource or the model's key hint); the broker attests
//	unlock            check the key commitment and authenticate the manifest; the key is zeroed
//	decrypt           stream-decrypt, verify and stage every file (store.Unpack)
//	measure-model     OpModel {"manifest_sha256","name"}, before anything is published
//	publish           atomic renames, then the ready marker (store.Unpack)
//
// The model is measured before it is published, so a failure of the publish step itself
// (e.g. a full tmpfs during the renames) leaves a measurement of a model that is not served;
// a verifier sees that RTMR3 commits to the model, not that it is serving.
//
// On failure nothing of the run is published, the key is wiped, and staged plaintext is
// removed (store.Unpack's guarantees). A rerun on an identical, published model decrypts
// nothing but still measures the model, so this boot's RTMR3 always reflects it.
package agent

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"crypto/sha512"

	"github.com/cai-agent/cai-agent/agent/store"
	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/kbc"
)

// Steps of the flow, as named in StepError.Step and in log records.
const (
	StepMeasureBinaries = "measure-binaries"
	StepOpenModel       = "open-model"
	StepGetKey          = "get-key"
	StepUnlock          = "unlock"
	StepDecrypt         = "decrypt"
	StepMeasureModel    = "measure-model"
	StepPublish         = "publish"
)

// Sentinel errors. Every *StepError also matches the class of its step (ErrMeasure for the
// measure steps, ErrKey for get-key, ErrSource for open-model) in addition to its cause,
// so a caller can map any failure to an exit code with errors.Is; the cause's own class
// (modelcrypt.ErrWrongKey, modelcrypt.ErrCorrupt, store.ErrNotTmpfs, kbc.ErrRefused,
// evidence.ErrQuote, …) is kept and should be checked first.
var (
	ErrConfig  = errors.New("agent: invalid configuration")
	ErrSource  = errors.New("agent: model source failed")
	ErrKey     = errors.New("agent: key broker failed")
	ErrMeasure = errors.New("agent: measurement failed")
)

// StepError is a failure of one step of the flow.
type StepError struct {
	Step string
	Err  error
}

func (e *StepError) Error() string { return e.Step + ": " + e.Err.Error() }

// Unwrap returns the cause and the step's class (see the sentinel errors).
func (e *StepError) Unwrap() []error {
	errs := []error{e.Err}
	switch e.Step {
	case StepMeasureBinaries, StepMeasureModel:
		errs = append(errs, ErrMeasure)
	case StepGetKey:
		errs = append(errs, ErrKey)
	case StepOpenModel:
		errs = append(errs, ErrSource)
	}
	return errs
}

// Evidence is what the agent needs from the TEE: it measures events into RTMR3 (and its
// event log). *evidence.Platform implements it. If it also has RTMRs() ([4][]byte, error),
// the result reports RTMR3.
type Evidence interface {
	evidence.Measurer
}

// measureOncer is implemented by *evidence.Platform: MeasureOnce extends RTMR3 only with an
// event its log does not hold yet.
type measureOncer interface {
	MeasureOnce(ctx context.Context, ev evidence.Event) (digest []byte, measured bool, err error)
}

// Config configures Run.
type Config struct {
	// Source reads the encrypted model: modelcrypt.DirSource(dir) or an *HTTPSource.
	Source modelcrypt.Source
	// Out is the output directory (an Ollama store for Ollama models); it must be on tmpfs
	// unless AllowNonTmpfs.
	Out string
	// Evidence measures into RTMR3. Required.
	Evidence Evidence
	// Broker releases the model key. Required.
	Broker kbc.Client
	// Resource is the key's resource URI; "" = the model's key hint.
	Resource string
	// MeasureBinaries are files measured (OpBinary) before the key is requested.
	MeasureBinaries []string
	// Kind, if set, is the model kind Out expects (modelcrypt.KindOllama for an Ollama store):
	// checked on the authenticated manifest, after Unlock and before anything is decrypted.
	Kind string
	// ModelName overrides the name measured for a plain-files model (default: the base name
	// of Out). For an Ollama model the measured name is always its Ollama name.
	ModelName string
	// AllowNonTmpfs, VerifyDigests and Workers are passed to store.Unpack.
	AllowNonTmpfs bool
	VerifyDigests bool
	Workers       int
	// Progress, if set, is called concurrently with (bytes done, total bytes) while decrypting.
	Progress func(done, total int64)
	// Logger receives the step log; nil = slog.Default().
	Logger *slog.Logger
}

// Measurement is one event this run measured.
type Measurement struct {
	Operation string `json:"operation"`
	Content   string `json:"content"`
	Digest    string `json:"digest"` // hex SHA-384 extended into RTMR3
	// AlreadyMeasured: RTMR3's log already held this event (a binary measured by an earlier
	// run of this boot), so nothing was extended again.
	AlreadyMeasured bool `json:"already_measured,omitempty"`
}

// Result summarizes a successful run.
type Result struct {
	Out              string        `json:"out"`
	Kind             string        `json:"kind"`
	Name             string        `json:"name,omitempty"`
	ManifestSHA256   string        `json:"manifest_sha256"`
	ModelSHA256      string        `json:"model_sha256"`
	Files            int           `json:"files"`
	Skipped          int           `json:"skipped"`
	Bytes            int64         `json:"bytes"`
	AlreadyPublished bool          `json:"already_published"`
	Seconds          float64       `json:"seconds"`
	DecryptSeconds   float64       `json:"decrypt_seconds"`
	ThroughputMBps   float64       `json:"throughput_mb_s"` // decrypted MB (10^6) per decrypt second
	Measurements     []Measurement `json:"measurements"`
	RTMR3            string        `json:"rtmr3,omitempty"`
}

// Run executes the flow. It honours ctx cancellation at every step (a cancelled run
// publishes nothing).
func Run(ctx context.Context, cfg Config) (*Result, error) {
	start := time.Now()
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	switch {
	case cfg.Source == nil:
		return nil, fmt.Errorf("%w: no source", ErrConfig)
	case cfg.Out == "":
		return nil, fmt.Errorf("%w: no output directory", ErrConfig)
	case cfg.Evidence == nil:
		return nil, fmt.Errorf("%w: no evidence provider", ErrConfig)
	case cfg.Broker == nil:
		return nil, fmt.Errorf("%w: no key broker", ErrConfig)
	}
	cfg.Source = errSource{cfg.Source}
	res := &Result{Out: cfg.Out, Measurements: []Measurement{}}
	// once: an event RTMR3's log already holds is not extended again (if the provider can
	// tell, see measureOncer), so retried runs do not grow the log.
	measure := func(ctx context.Context, ev evidence.Event, once bool) error {
		var (
			d        []byte
			measured = true
			err      error
		)
		if mo, ok := cfg.Evidence.(measureOncer); ok && once {
			d, measured, err = mo.MeasureOnce(ctx, ev)
		} else {
			d, err = cfg.Evidence.Measure(ctx, ev)
		}
		if err != nil {
			return err
		}
		res.Measurements = append(res.Measurements, Measurement{Operation: ev.Operation, Content: ev.Content, Digest: hex.EncodeToString(d), AlreadyMeasured: !measured})
		if measured {
			log.Debug("measured into RTMR3", "operation", ev.Operation, "content", ev.Content) // evidence.Platform logs it at info
		} else {
			log.Info("already measured into RTMR3 this boot; not extended again", "operation", ev.Operation, "content", ev.Content)
		}
		return nil
	}
	// The model is always measured, even if the log holds the same event: the last Model
	// event names the model served (an earlier run may have published another since).
	measureAlways := func(ctx context.Context, ev evidence.Event) error { return measure(ctx, ev, false) }

	// 0. An output directory that is not on tmpfs is refused before anything is measured or
	// a key requested (store.Unpack checks again, on the directory it opens).
	if !cfg.AllowNonTmpfs {
		if err := checkOutTmpfs(cfg.Out); err != nil {
			return nil, &StepError{StepDecrypt, err}
		}
	}

	// 1. The public header (no secret; nothing measured yet), so that an unreachable source or
	// a missing resource fails before RTMR3 is extended: a service manager retrying a broken
	// configuration must not grow the event log with every attempt.
	log.Info("opening encrypted model")
	m, err := modelcrypt.Open(ctx, cfg.Source)
	if err != nil {
		return nil, &StepError{StepOpenModel, err}
	}
	defer m.Lock()
	man := m.Manifest()
	log.Info("encrypted model", "kind", man.Kind, "ollama_model", man.OllamaModel, "files", len(man.Files), "bytes", man.TotalSize(), "key_hint", m.KeyHint())
	resource := cfg.Resource
	if resource == "" {
		resource = m.KeyHint()
	}
	if resource == "" {
		return nil, &StepError{StepGetKey, fmt.Errorf("%w: the model has no key hint; set the resource", ErrConfig)}
	}

	// 2. Binaries, before anything can release a key.
	for _, p := range cfg.MeasureBinaries {
		ev, err := BinaryEvent(p)
		if err == nil {
			err = measure(ctx, ev, true)
		}
		if err != nil {
			return nil, &StepError{StepMeasureBinaries, err}
		}
	}

	// 3. The key.
	log.Info("requesting model key", "resource", kbc.Sanitize(resource))
	key, err := cfg.Broker.GetResource(ctx, resource)
	if err != nil {
		return nil, &StepError{StepGetKey, err}
	}
	k, err := ParseKey(key)
	clear(key)
	if err != nil {
		return nil, &StepError{StepGetKey, err}
	}
	err = m.Unlock(k)
	clear(k)
	if err != nil {
		return nil, &StepError{StepUnlock, err}
	}
	log.Info("model key accepted; manifest authenticated")
	if cfg.Kind != "" && m.Manifest().Kind != cfg.Kind {
		return nil, &StepError{StepUnlock, fmt.Errorf("%w: the model is of kind %q, not %q", ErrConfig, m.Manifest().Kind, cfg.Kind)}
	}

	// 4. Decrypt, measure (before publish), publish.
	var modelErr error
	published := false // BeforePublish accepted: later failures are the publish step's
	var total = man.TotalSize()
	var done progressCounter
	opts := store.Options{
		AllowNonTmpfs: cfg.AllowNonTmpfs,
		VerifyDigests: cfg.VerifyDigests,
		Workers:       cfg.Workers,
		BeforePublish: func(ctx context.Context, r *store.Result) error {
			if err := measureModel(ctx, cfg, r, measureAlways); err != nil {
				modelErr = err
				return err
			}
			log.Info("publishing", "out", cfg.Out)
			published = true
			return nil
		},
	}
	if cfg.Progress != nil {
		opts.Progress = func(n int64) { cfg.Progress(done.add(n), total) }
	}
	log.Info("decrypting", "out", cfg.Out, "bytes", total)
	dstart := time.Now()
	r, err := store.Unpack(ctx, m, cfg.Source, cfg.Out, opts)
	dsecs := time.Since(dstart).Seconds()
	if err != nil {
		switch {
		case modelErr != nil:
			return nil, &StepError{StepMeasureModel, err}
		case published:
			return nil, &StepError{StepPublish, err}
		}
		return nil, &StepError{StepDecrypt, err}
	}
	if r.AlreadyPublished {
		log.Info("model already published and identical; nothing decrypted", "out", cfg.Out)
		if err := measureModel(ctx, cfg, r, measureAlways); err != nil {
			return nil, &StepError{StepMeasureModel, err}
		}
	}
	res.Kind, res.Name, res.ManifestSHA256, res.ModelSHA256 = r.Kind, r.Name, r.ManifestSHA256, r.ModelSHA256
	res.Files, res.Skipped, res.Bytes, res.AlreadyPublished = r.Files, r.Skipped, r.Bytes, r.AlreadyPublished
	res.DecryptSeconds = dsecs
	if dsecs > 0 {
		res.ThroughputMBps = float64(r.Bytes) / 1e6 / dsecs
	}
	if rt, ok := cfg.Evidence.(interface{ RTMRs() ([4][]byte, error) }); ok {
		if v, err := rt.RTMRs(); err == nil {
			res.RTMR3 = hex.EncodeToString(v[3])
		}
	}
	res.Seconds = time.Since(start).Seconds()
	log.Info("model published", "out", cfg.Out, "kind", r.Kind, "name", r.Name, "manifest_sha256", r.ManifestSHA256,
		"files", r.Files, "skipped", r.Skipped, "bytes", r.Bytes, "seconds", res.Seconds)
	return res, nil
}

// checkOutTmpfs checks the file system of out, or of its nearest existing parent when out
// does not exist yet (store.Unpack creates it there). Other errors are left to Unpack.
func checkOutTmpfs(out string) error {
	d := filepath.Clean(out)
	for {
		_, err := os.Stat(d)
		if err == nil {
			return store.CheckTmpfs(d)
		}
		parent := filepath.Dir(d)
		if !errors.Is(err, fs.ErrNotExist) || parent == d {
			return nil
		}
		d = parent
	}
}

func measureModel(ctx context.Context, cfg Config, r *store.Result, measure func(context.Context, evidence.Event) error) error {
	d, err := hex.DecodeString(r.ManifestSHA256)
	if err != nil || len(d) != 32 {
		return fmt.Errorf("bad manifest digest %q from the store", r.ManifestSHA256)
	}
	name := r.Name
	if name == "" {
		name = cfg.ModelName
	}
	if name == "" {
		name = filepath.Base(filepath.Clean(cfg.Out))
	}
	ev, err := evidence.ModelEvent(name, d)
	if err != nil {
		return err
	}
	return measure(ctx, ev)
}

// BinaryEvent streams SHA-384 over the regular file at path and returns its OpBinary event
// (content {"path": absolute path, "sha384": hex}).
func BinaryEvent(path string) (evidence.Event, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return evidence.Event{}, fmt.Errorf("measure %s: %w", path, err)
	}
	// O_NONBLOCK: a FIFO planted in place of the binary must not block the open; it is then
	// refused as not a regular file (the flag does not affect reading a regular file).
	f, err := os.OpenFile(abs, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return evidence.Event{}, fmt.Errorf("measure: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return evidence.Event{}, fmt.Errorf("measure: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return evidence.Event{}, fmt.Errorf("%w: measure: %s is not a regular file", ErrConfig, abs)
	}
	h := sha512.New384()
	if _, err := io.Copy(h, f); err != nil {
		return evidence.Event{}, fmt.Errorf("measure: read %s: %w", abs, err)
	}
	return evidence.BinaryEvent(abs, h.Sum(nil))
}

// ParseKey returns the 32-byte model key in a released secret: exactly 32 raw bytes, or
// standard base64 of 32 bytes (as `cai-agent keygen` writes it), surrounding whitespace
// ignored. The error never contains the secret. The caller should clear both.
func ParseKey(secret []byte) ([]byte, error) {
	if len(secret) == modelcrypt.KeySize {
		return bytes.Clone(secret), nil
	}
	t := bytes.TrimSpace(secret)
	k := make([]byte, base64.StdEncoding.DecodedLen(len(t)))
	n, err := base64.StdEncoding.Decode(k, t)
	if err != nil || n != modelcrypt.KeySize {
		clear(k)
		return nil, fmt.Errorf("%w: the released secret (%d bytes) is neither a 32-byte key nor standard base64 of one", ErrKey, len(secret))
	}
	return k[:n], nil
}
