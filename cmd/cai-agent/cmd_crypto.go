package main

import (
	"bytes"
	"crypto/rand"
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
	"sync/atomic"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/cai-agent/cai-agent/agent/ollama"
	"github.com/cai-agent/cai-agent/agent/store"
	"github.com/cai-agent/cai-agent/crypto/ccz"
	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
	"github.com/cai-agent/cai-agent/kbc"
)

// cryptoCommands returns keygen, encrypt, decrypt and inspect.
func cryptoCommands() []*cli.Command {
	keyFlags := []cli.Flag{
		&cli.StringFlag{Name: "key-file", Usage: "file holding the 256-bit model key: standard base64 (as written by keygen), or exactly 32 raw bytes"},
		&cli.StringFlag{Name: "key-env", Usage: "name of an environment variable holding the key in standard base64"},
	}
	return []*cli.Command{
		{
			Name:      "keygen",
			Usage:     "create a new random 256-bit model key (standard base64 + newline, mode 0600; never overwrites)",
			UsageText: "cai-agent keygen --out FILE",
			Flags:     []cli.Flag{&cli.StringFlag{Name: "out", Usage: "key file to create"}},
			Action:    cmdKeygen,
		},
		{
			Name:      "encrypt",
			Usage:     "encrypt a file, a directory or one Ollama model into an encrypted model directory",
			UsageText: "cai-agent encrypt --key-file FILE --in SRC --out DST [--chunk-size N] [--shard-size N] [--key-hint URI] [--ollama-model NAME[:TAG]]",
			Flags: append(append([]cli.Flag{}, keyFlags...),
				&cli.StringFlag{Name: "in", Usage: "file or directory to encrypt (with --ollama-model: the Ollama models directory, OLLAMA_MODELS)"},
				&cli.StringFlag{Name: "out", Usage: "encrypted model directory to create (must not exist or be empty)"},
				&cli.StringFlag{Name: "chunk-size", Usage: "plaintext bytes per chunk (e.g. 1MiB)", Value: "1MiB"},
				&cli.StringFlag{Name: "shard-size", Usage: "plaintext bytes per shard, a multiple of the chunk size (default: 2GiB rounded down to a multiple of it)"},
				&cli.StringFlag{Name: "key-hint", Usage: "public hint where the key lives, e.g. kbs:///default/model-key/tiny (not secret, not authenticated)"},
				&cli.StringFlag{Name: "ollama-model", Usage: "encrypt exactly this model (NAME[:TAG]) of the Ollama store given by --in"},
			),
			Action: cmdEncrypt,
		},
		{
			Name:      "decrypt",
			Usage:     "decrypt an encrypted model (or CCZoo *.aes input) into a tmpfs directory and publish it atomically",
			UsageText: "cai-agent decrypt (--key-file FILE | --key-env VAR) --in ENCRYPTED --out OUT [--allow-non-tmpfs] [--verify-digests] [--json]",
			Flags: append(append([]cli.Flag{}, keyFlags...),
				&cli.StringFlag{Name: "in", Usage: "encrypted model directory, or CCZoo input (a directory with encryption-config.json / *.aes files, or one .aes file)"},
				&cli.StringFlag{Name: "out", Usage: "output directory on tmpfs/ramfs (created if missing); for an Ollama model, the OLLAMA_MODELS directory"},
				&cli.BoolFlag{Name: "allow-non-tmpfs", Usage: "allow an output directory that is not on tmpfs/ramfs (plaintext may reach disk; development only)"},
				&cli.BoolFlag{Name: "verify-digests", Usage: "also re-hash every file's plaintext with SHA-256 against the manifest (AEAD already guarantees integrity)"},
				&cli.BoolFlag{Name: "json", Usage: "print the result as JSON"},
			),
			Action: cmdDecrypt,
		},
		{
			Name:      "inspect",
			Usage:     "show an encrypted model's public header: version, key hint, kind, files, sizes, SHA-256s, shards and chunk tables (no key needed; unauthenticated)",
			UsageText: "cai-agent inspect --in ENCRYPTED [--json]",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "in", Usage: "encrypted model directory or CCZoo input"},
				&cli.BoolFlag{Name: "json", Usage: "print JSON"},
			},
			Action: cmdInspect,
		},
	}
}

var cryptoExitCodes = []exitMapping{
	{modelcrypt.ErrInvalidOptions, ExitUsage},
	{modelcrypt.ErrWrongKey, ExitWrongKey},
	{modelcrypt.ErrCorrupt, ExitCorrupt},
	{ccz.ErrAuth, ExitCorrupt},
	{ccz.ErrFormat, ExitCorrupt},
	{modelcrypt.ErrUnsupportedVersion, ExitUnsupported},
	{modelcrypt.ErrNotModel, ExitUnsupported},
	{ccz.ErrTooLarge, ExitUnsupported},
	{store.ErrNotTmpfs, ExitNotTmpfs},
	{store.ErrLocked, ExitLocked},
}

// requireFlags returns a usage error (exit 2) naming every flag of names that is missing or
// empty (a flag may also come from its environment variable). Commands call it after their
// positional arguments (noArgs, positionalArgs), so that flags after them count.
func requireFlags(c *cli.Context, names ...string) error {
	isSlice := map[string]bool{}
	for _, f := range c.Command.Flags {
		if _, ok := f.(*cli.StringSliceFlag); ok {
			isSlice[f.Names()[0]] = true
		}
	}
	var missing []string
	for _, n := range names {
		if isSlice[n] && len(c.StringSlice(n)) == 0 || !isSlice[n] && c.String(n) == "" {
			missing = append(missing, "--"+n)
		}
	}
	if len(missing) > 0 {
		return usagef("%s: missing required flag %s", cmdName(c), strings.Join(missing, ", "))
	}
	return nil
}

// maxKeyFileSize bounds a key file read (base64 of 32 bytes is 44 characters).
const maxKeyFileSize = 1024

// loadKey returns the key from --key-file or --key-env (exactly one). The key file holds the
// standard base64 of 32 bytes (surrounding whitespace ignored), or exactly 32 raw bytes (a
// 32-byte file can never be base64 of 32 bytes, which is 44 characters, so this is
// unambiguous). Errors never quote the key material.
func loadKey(c *cli.Context) ([]byte, error) {
	file, env := c.String("key-file"), c.String("key-env")
	switch {
	case file != "" && env != "":
		return nil, usagef("--key-file and --key-env are mutually exclusive")
	case file == "" && env == "":
		return nil, usagef("a key is required: --key-file FILE or --key-env VAR")
	}
	var raw []byte
	src := "key file " + file
	if file != "" {
		var err error
		raw, err = kbc.ReadSmallFile(file, maxKeyFileSize)
		if err != nil {
			return nil, fmt.Errorf("key file: %w (the path is not repeated: it may be a key pasted in its place)", kbc.WithoutPath(err))
		}
		if st, err := os.Stat(file); err == nil && st.Mode().Perm()&0o077 != 0 {
			slog.Warn("key file is readable by other users; use mode 0600", "file", file, "mode", st.Mode().Perm().String())
		}
		if len(raw) == modelcrypt.KeySize {
			return raw, nil
		}
	} else {
		v, ok := os.LookupEnv(env)
		if !ok || v == "" {
			return nil, fmt.Errorf("environment variable %s (--key-env) is not set or empty", env)
		}
		raw = []byte(v)
		src = "environment variable " + env
	}
	defer clear(raw)
	key := make([]byte, base64.StdEncoding.DecodedLen(len(raw)))
	n, err := base64.StdEncoding.Decode(key, bytes.TrimSpace(raw))
	if err != nil || n != modelcrypt.KeySize {
		clear(key)
		return nil, fmt.Errorf("%s: not a 256-bit key (want standard base64 of 32 bytes, e.g. from `cai-agent keygen`)", src)
	}
	return key[:n], nil
}

func cmdKeygen(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	if err := requireFlags(c, "out"); err != nil {
		return err
	}
	out := c.String("out")
	key := make([]byte, modelcrypt.KeySize)
	defer clear(key)
	if _, err := rand.Read(key); err != nil {
		return err
	}
	enc := []byte(base64.StdEncoding.EncodeToString(key) + "\n")
	defer clear(enc)
	err := createExclusive(out, 0o600, func(w io.Writer) error { _, err := w.Write(enc); return err })
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("keygen: %s already exists; refusing to overwrite a key", out)
	}
	if err != nil {
		return fmt.Errorf("keygen: %w", err)
	}
	fmt.Fprintf(c.App.Writer, "wrote a new 256-bit key to %s (mode 0600)\n", out)
	return nil
}

// parseSize parses a byte count: plain bytes, or with a suffix KiB, MiB, GiB, TiB (powers of
// 1024) or kB, MB, GB, TB (powers of 1000); K, M, G, T alone mean KiB, MiB, GiB, TiB.
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	units := []struct {
		suf string
		mul int64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
		{"kB", 1e3}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
		{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40}, {"B", 1},
	}
	mul := int64(1)
	for _, u := range units {
		if v, ok := strings.CutSuffix(s, u.suf); ok {
			s, mul = strings.TrimSpace(v), u.mul
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mul {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	return n * mul, nil
}

// inputFiles lists SRC: a single file, or every regular file under a directory (sorted,
// slash-separated relative names). Symlinks and special files are refused.
func inputFiles(src string) ([]modelcrypt.InputFile, error) {
	st, err := os.Lstat(src)
	if err != nil {
		return nil, err
	}
	if st.Mode()&fs.ModeSymlink != 0 {
		return nil, fmt.Errorf("%s is a symlink; refusing (pass the real path)", src)
	}
	if st.Mode().IsRegular() {
		return []modelcrypt.InputFile{{Name: filepath.Base(src), Path: src}}, nil
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("%s is neither a regular file nor a directory", src)
	}
	var files []modelcrypt.InputFile
	err = filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			return fmt.Errorf("%s is a symlink; symlinks are refused (copy the target in instead)", p)
		case d.IsDir():
			return nil
		case !d.Type().IsRegular():
			return fmt.Errorf("%s is not a regular file", p)
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		files = append(files, modelcrypt.InputFile{Name: filepath.ToSlash(rel), Path: p})
		return nil
	})
	if err != nil {
		return nil, err
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("%s holds no regular files", src)
	}
	return files, nil
}

func cmdEncrypt(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	if err := requireFlags(c, "in", "out"); err != nil {
		return err
	}
	chunk, err := parseSize(c.String("chunk-size"))
	if err != nil {
		return usagef("--chunk-size: %v", err)
	}
	if chunk > modelcrypt.MaxChunkSize || chunk < modelcrypt.MinChunkSize {
		return usagef("--chunk-size must be between %d and %d bytes", modelcrypt.MinChunkSize, modelcrypt.MaxChunkSize)
	}
	// Unset: the library's default (2 GiB, rounded down to a multiple of the chunk size).
	var shard int64
	if c.IsSet("shard-size") {
		if shard, err = parseSize(c.String("shard-size")); err != nil {
			return usagef("--shard-size: %v", err)
		}
		if shard < chunk || shard%chunk != 0 || shard/chunk > modelcrypt.MaxChunksPerShard {
			return usagef("--shard-size (%d) must be a multiple of --chunk-size (%d), at most %d chunks", shard, chunk, int64(modelcrypt.MaxChunksPerShard))
		}
	}
	key, err := loadKey(c)
	if err != nil {
		return err
	}
	defer clear(key)
	opts := modelcrypt.EncryptOptions{ChunkSize: int(chunk), ShardSize: shard, KeyHint: c.String("key-hint")}
	in := c.String("in")
	var files []modelcrypt.InputFile
	if name := c.String("ollama-model"); name != "" {
		n, err := ollama.ParseName(name)
		if err != nil {
			return usagef("--ollama-model: %v", err)
		}
		if files, err = ollama.ModelFiles(in, name); err != nil {
			return fmt.Errorf("encrypt: %w", err)
		}
		opts.Kind, opts.OllamaModel = modelcrypt.KindOllama, n.String()
	} else if files, err = inputFiles(in); err != nil {
		return fmt.Errorf("encrypt: %w", err)
	}
	start := time.Now()
	man, err := modelcrypt.Encrypt(c.Context, key, files, c.String("out"), opts)
	if err != nil {
		return fmt.Errorf("encrypt: %w", err)
	}
	m, err := modelcrypt.Open(c.Context, modelcrypt.DirSource(c.String("out")))
	if err != nil {
		return fmt.Errorf("encrypt: reopen: %w", err)
	}
	sum := m.ManifestSHA256()
	d := time.Since(start)
	fmt.Fprintf(c.App.Writer, "encrypted %d files (%d bytes) into %s in %s (%s)\nmanifest sha256 %x\n",
		len(man.Files), man.TotalSize(), c.String("out"), d.Round(time.Millisecond), rate(man.TotalSize(), d), sum)
	return nil
}

func rate(n int64, d time.Duration) string {
	if d <= 0 {
		return "- GB/s"
	}
	return fmt.Sprintf("%.2f GB/s", float64(n)/d.Seconds()/1e9)
}

// openInput opens in as a cai-agent encrypted model (a directory with model.cai), or reports
// CCZoo input (a *.aes file, or a directory with encryption-config.json or *.aes files and
// no model.cai).
func openInput(c *cli.Context, in string) (*modelcrypt.Model, bool, error) {
	st, err := os.Stat(in)
	if err != nil {
		return nil, false, err
	}
	if st.Mode().IsRegular() {
		if ccz.Detect(in) {
			return nil, true, nil
		}
		return nil, false, fmt.Errorf("%w: %s is a file (a cai-agent encrypted model is a directory; CCZoo files end in %s)", modelcrypt.ErrNotModel, in, ccz.Suffix)
	}
	m, err := modelcrypt.Open(c.Context, modelcrypt.DirSource(in))
	if errors.Is(err, modelcrypt.ErrNotModel) && ccz.Detect(in) {
		return nil, true, nil
	}
	return m, false, err
}

func cmdDecrypt(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	if err := requireFlags(c, "in", "out"); err != nil {
		return err
	}
	in, out := c.String("in"), c.String("out")
	opts := store.Options{AllowNonTmpfs: c.Bool("allow-non-tmpfs"), VerifyDigests: c.Bool("verify-digests")}
	key, err := loadKey(c)
	if err != nil {
		return err
	}
	defer clear(key)
	var res *store.Result
	src := modelcrypt.DirSource(in)
	m, isCCZ, err := openInput(c, in)
	switch {
	case err == nil && !isCCZ:
		if err := m.Unlock(key); err != nil {
			return fmt.Errorf("decrypt %s: %w", in, err)
		}
		defer m.Lock()
		defer showProgress(c, &opts, m.Manifest().TotalSize())()
		if res, err = store.Unpack(c.Context, m, src, out, opts); err != nil {
			return fmt.Errorf("decrypt %s: %w", in, err)
		}
	case err == nil:
		input, err := ccz.Load(in, ccz.Options{})
		if err != nil {
			return fmt.Errorf("decrypt %s (CCZoo format): %w", in, err)
		}
		if opts.VerifyDigests {
			slog.Info("--verify-digests has no effect on CCZoo input (whole-file GCM authenticates each file)")
		}
		var total int64
		for _, e := range input.Files {
			total += e.Header.PlaintextSize()
		}
		defer showProgress(c, &opts, total)()
		if res, err = store.UnpackCCZ(c.Context, key, input, out, opts, ccz.Options{}); err != nil {
			return fmt.Errorf("decrypt %s (CCZoo format): %w", in, err)
		}
	default:
		return fmt.Errorf("decrypt %s: %w", in, err)
	}
	if c.Bool("json") {
		return writeCryptoJSON(c.App.Writer, decryptJSON(res, out))
	}
	w := c.App.Writer
	what := res.Kind + " model"
	if res.Name != "" {
		what += " " + res.Name
	}
	if res.AlreadyPublished {
		fmt.Fprintf(w, "%s already published in %s (%d files); nothing to do\n", what, out, res.Skipped)
	} else {
		fmt.Fprintf(w, "published %s in %s: %d files decrypted (%d bytes, %s, %s), %d already present\n",
			what, out, res.Files, res.Bytes, res.Duration.Round(time.Millisecond), rate(res.Bytes, res.Duration), res.Skipped)
	}
	fmt.Fprintf(w, "manifest sha256 %s\n", res.ManifestSHA256)
	return nil
}

// showProgress makes opts report progress like fetch-and-decrypt (a bar on a terminal, a log
// line every 5 s otherwise); call the returned function when done.
func showProgress(c *cli.Context, opts *store.Options, total int64) (finish func()) {
	var done atomic.Int64
	pr := newProgress(c.App.ErrWriter)
	opts.Progress = func(n int64) { pr.update(done.Add(n), total) }
	return pr.finish
}

type decryptResultJSON struct {
	Out              string  `json:"out"`
	Kind             string  `json:"kind"`
	Name             string  `json:"name,omitempty"`
	ManifestSHA256   string  `json:"manifest_sha256"`
	ModelSHA256      string  `json:"model_sha256"`
	Files            int     `json:"files"`
	Skipped          int     `json:"skipped"`
	Bytes            int64   `json:"bytes"`
	AlreadyPublished bool    `json:"already_published"`
	Seconds          float64 `json:"seconds"`
}

func decryptJSON(r *store.Result, out string) decryptResultJSON {
	return decryptResultJSON{Out: out, Kind: r.Kind, Name: r.Name, ManifestSHA256: r.ManifestSHA256, ModelSHA256: r.ModelSHA256,
		Files: r.Files, Skipped: r.Skipped, Bytes: r.Bytes, AlreadyPublished: r.AlreadyPublished, Seconds: r.Duration.Seconds()}
}

func writeCryptoJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// inspect output.
type inspectJSON struct {
	Format         string        `json:"format"` // "cai-agent" or "ccz"
	Version        int           `json:"version,omitempty"`
	KeyHint        string        `json:"key_hint,omitempty"`
	Kind           string        `json:"kind,omitempty"`
	OllamaModel    string        `json:"ollama_model,omitempty"`
	ChunkSize      int           `json:"chunk_size,omitempty"`
	ShardSize      int64         `json:"shard_size,omitempty"`
	ManifestSHA256 string        `json:"manifest_sha256,omitempty"`
	TotalSize      int64         `json:"total_size"`
	Authenticated  bool          `json:"authenticated"`
	CCZ            *cczJSON      `json:"ccz,omitempty"`
	Files          []inspectFile `json:"files"`
}

type cczJSON struct {
	KBS    string `json:"kbs"`
	KBSURL string `json:"kbs_url"`
	KeyID  string `json:"key_id"`
	Config bool   `json:"config"`
}

type inspectFile struct {
	Path   string         `json:"path"`
	Size   int64          `json:"size"`
	SHA256 string         `json:"sha256,omitempty"`
	Shards []inspectShard `json:"shards,omitempty"`
	// CCZoo: the encrypted file and its header.
	Encrypted string `json:"encrypted,omitempty"`
	DataLen   uint32 `json:"data_len,omitempty"`
	IV        string `json:"iv,omitempty"`
}

// inspectShard is one shard and its chunk table: chunk i (0-based) holds plaintext bytes
// [offset+i*chunk_size, ...) and sits at object offset i*(chunk_size+16); every chunk is
// chunk_size bytes except the last (last_chunk_size), each followed by a 16-byte GCM tag.
type inspectShard struct {
	Object        string `json:"object"`
	Offset        int64  `json:"offset"`
	Size          int64  `json:"size"`
	Chunks        int64  `json:"chunks"`
	LastChunkSize int64  `json:"last_chunk_size"`
	EncryptedSize int64  `json:"encrypted_size"`
}

func cmdInspect(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	if err := requireFlags(c, "in"); err != nil {
		return err
	}
	in := c.String("in")
	var out inspectJSON
	m, isCCZ, err := openInput(c, in)
	switch {
	case err == nil && !isCCZ:
		man := m.Manifest()
		sum := m.ManifestSHA256()
		out = inspectJSON{Format: "cai-agent", Version: m.Version(), KeyHint: m.KeyHint(), Kind: man.Kind, OllamaModel: man.OllamaModel,
			ChunkSize: man.ChunkSize, ShardSize: man.ShardSize, ManifestSHA256: hex.EncodeToString(sum[:]), TotalSize: man.TotalSize()}
		for _, f := range man.Files {
			fj := inspectFile{Path: f.Path, Size: f.Size, SHA256: hex.EncodeToString(f.SHA256[:])}
			for _, s := range f.Shards {
				last := s.Size - (s.Chunks-1)*int64(man.ChunkSize)
				fj.Shards = append(fj.Shards, inspectShard{Object: s.Object, Offset: s.Offset, Size: s.Size, Chunks: s.Chunks,
					LastChunkSize: last, EncryptedSize: s.EncryptedSize()})
			}
			out.Files = append(out.Files, fj)
		}
	case err == nil:
		input, err := ccz.Load(in, ccz.Options{})
		if err != nil {
			return fmt.Errorf("inspect %s (CCZoo format): %w", in, err)
		}
		out = inspectJSON{Format: "ccz", CCZ: &cczJSON{}}
		if input.Config != nil {
			out.CCZ = &cczJSON{KBS: input.Config.KBS, KBSURL: input.Config.KBSURL, KeyID: input.Config.KeyID, Config: true}
		}
		for _, e := range input.Files {
			out.TotalSize += e.Header.PlaintextSize()
			out.Files = append(out.Files, inspectFile{Path: e.Name, Size: e.Header.PlaintextSize(), Encrypted: filepath.Base(e.Path),
				DataLen: e.Header.DataLen, IV: hex.EncodeToString(e.Header.IV[:])})
		}
	default:
		return fmt.Errorf("inspect %s: %w", in, err)
	}
	if c.Bool("json") {
		return writeCryptoJSON(c.App.Writer, out)
	}
	w := c.App.Writer
	if out.Format == "ccz" {
		fmt.Fprintf(w, "format: CCZoo confidential-ai-loader (whole-file AES-256-GCM, 12-byte header)\n")
		if out.CCZ.Config {
			fmt.Fprintf(w, "kbs: %q\nkbs_url: %q\nkey_id: %q\n", out.CCZ.KBS, out.CCZ.KBSURL, out.CCZ.KeyID)
		}
		fmt.Fprintf(w, "files: %d, %d bytes\n", len(out.Files), out.TotalSize)
		for _, f := range out.Files {
			fmt.Fprintf(w, "  %s  %d bytes  (from %s, data_len %d, iv %s)\n", f.Path, f.Size, f.Encrypted, f.DataLen, f.IV)
		}
		return nil
	}
	fmt.Fprintf(w, "format: cai-agent encrypted model, version %d\n", out.Version)
	fmt.Fprintf(w, "key hint: %q (public, unauthenticated)\n", out.KeyHint)
	fmt.Fprintf(w, "kind: %s\n", out.Kind)
	if out.OllamaModel != "" {
		fmt.Fprintf(w, "ollama model: %s\n", out.OllamaModel)
	}
	fmt.Fprintf(w, "chunk size: %d\nshard size: %d\nmanifest sha256: %s (not yet authenticated: no key)\n", out.ChunkSize, out.ShardSize, out.ManifestSHA256)
	fmt.Fprintf(w, "files: %d, %d bytes\n", len(out.Files), out.TotalSize)
	for _, f := range out.Files {
		fmt.Fprintf(w, "  %s  %d bytes  sha256 %s\n", f.Path, f.Size, f.SHA256)
		for _, s := range f.Shards {
			fmt.Fprintf(w, "    shard %s  offset %d  size %d  chunks %d (last %d)  encrypted %d\n", s.Object, s.Offset, s.Size, s.Chunks, s.LastChunkSize, s.EncryptedSize)
		}
	}
	return nil
}
