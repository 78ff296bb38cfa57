package ccz

import (
	"bytes"
	"crypto/cipher"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

// ConfigName is the name of the metadata file crypto.py writes next to the .aes files.
const ConfigName = "encryption-config.json"

// Suffix is the file name suffix of encrypted files.
const Suffix = ".aes"

// KBSIntelTrustAuthority is the value of Config.KBS for which the peer loader fetches the key
// from Intel Trust Authority KBS (any other value makes the peer skip decryption).
const KBSIntelTrustAuthority = "ITA_KBS"

// maxConfigSize bounds encryption-config.json.
const maxConfigSize = 1 << 20

// Config is encryption-config.json. crypto.py writes the KBS fields empty; an operator sets
// KBS to "ITA_KBS", KBSURL to the full ITA KBS key-transfer URL and KeyID to the key's id.
// These fields are public and unauthenticated: they say where to get the key, nothing more.
type Config struct {
	KBS    string   `json:"kbs"`
	KBSURL string   `json:"kbs_url"`
	KeyID  string   `json:"key_id"`
	Files  []string `json:"files"`
}

// ITA reports whether the config names Intel Trust Authority KBS as the key broker.
func (c *Config) ITA() bool { return c != nil && c.KBS == KBSIntelTrustAuthority }

// Entry is one encrypted file of an Input.
type Entry struct {
	Name   string // output name: the file's base name without ".aes"
	Path   string // the encrypted file on disk
	Size   int64  // size of the encrypted file
	Header Header // its parsed header; Header.PlaintextSize() is the output size
}

// Input is a CCZoo-format encrypted model: a directory (Config set when it has
// encryption-config.json) or a single .aes file.
type Input struct {
	Path   string  // the directory or file given to Load
	Config *Config // nil when there is no encryption-config.json (or for a single file)
	Files  []Entry // sorted by Name
}

// Options bound what Load and Decrypt accept.
type Options struct {
	// MaxDataLen bounds each message's data_len, i.e. the memory one file needs while it is
	// decrypted; 0 means DefaultMaxDataLen (2 GiB − 1, the peer's own limit).
	MaxDataLen int64
}

// Detect reports whether path looks like CCZoo input: a regular file named *.aes, or a
// directory holding encryption-config.json or at least one *.aes file. It does not validate.
func Detect(path string) bool {
	st, err := os.Stat(path)
	if err != nil {
		return false
	}
	if st.Mode().IsRegular() {
		return strings.HasSuffix(path, Suffix)
	}
	if !st.IsDir() {
		return false
	}
	if _, err := os.Stat(filepath.Join(path, ConfigName)); err == nil {
		return true
	}
	ents, err := os.ReadDir(path)
	if err != nil {
		return false
	}
	for _, e := range ents {
		if e.Type().IsRegular() && strings.HasSuffix(e.Name(), Suffix) {
			return true
		}
	}
	return false
}

// Load reads the structure of CCZoo input at path (see Detect) without a key: the config,
// the list of files and each file's header, checking that every file's size equals what its
// header says (no truncation, no trailing bytes) and that data_len is within the bound.
//
// For a directory with encryption-config.json, the files are exactly those the config lists,
// resolved by base name inside the directory in any order (the peer writes builder paths such
// as "/abs/out/x.aes"); a listed file that is missing, a duplicate, a name without ".aes", or
// an unlisted *.aes file in the directory is ErrFormat. Without a config, the files are all
// *.aes files at the top level of the directory. Symlinks and non-regular files are refused.
func Load(path string, opts Options) (*Input, error) {
	st, err := os.Lstat(path)
	if err != nil {
		return nil, fmt.Errorf("ccz: %w", err)
	}
	in := &Input{Path: path}
	var names []string // base names of encrypted files
	dir := path
	switch {
	case st.Mode().IsRegular():
		dir = filepath.Dir(path)
		names = []string{filepath.Base(path)}
	case st.IsDir():
		listed, err := readConfig(filepath.Join(path, ConfigName))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		ents, err := os.ReadDir(path)
		if err != nil {
			return nil, fmt.Errorf("ccz: %w", err)
		}
		var present []string
		for _, e := range ents {
			if strings.HasSuffix(e.Name(), Suffix) {
				present = append(present, e.Name())
			}
		}
		if listed == nil {
			if len(present) == 0 {
				return nil, fmt.Errorf("%w: %s: no %s and no *%s files", ErrFormat, path, ConfigName, Suffix)
			}
			names = present
			break
		}
		in.Config = listed
		seen := make(map[string]bool, len(listed.Files)) // a set: a big config must not cost quadratic time
		for _, f := range listed.Files {
			// The peer joins its -o argument onto the name; accept either separator.
			b := baseName(f)
			if !strings.HasSuffix(b, Suffix) {
				return nil, fmt.Errorf("%w: %s: listed file %q does not end in %s", ErrFormat, ConfigName, f, Suffix)
			}
			if seen[b] {
				return nil, fmt.Errorf("%w: %s: file %q listed twice", ErrFormat, ConfigName, b)
			}
			seen[b] = true
			names = append(names, b)
		}
		if len(names) == 0 {
			return nil, fmt.Errorf("%w: %s lists no files", ErrFormat, ConfigName)
		}
		for _, p := range present {
			if !seen[p] {
				return nil, fmt.Errorf("%w: %s is not listed in %s", ErrFormat, p, ConfigName)
			}
		}
	default:
		return nil, fmt.Errorf("%w: %s is neither a regular file nor a directory", ErrFormat, path)
	}
	for _, n := range names {
		e, err := loadEntry(dir, n, opts)
		if err != nil {
			return nil, err
		}
		in.Files = append(in.Files, e)
	}
	slices.SortFunc(in.Files, func(a, b Entry) int { return strings.Compare(a.Name, b.Name) })
	return in, nil
}

func baseName(s string) string {
	return path.Base(strings.ReplaceAll(s, "\\", "/"))
}

func readConfig(name string) (*Config, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("ccz: read %s: %w", ConfigName, err)
	}
	if len(b) > maxConfigSize {
		return nil, fmt.Errorf("%w: %s larger than %d bytes", ErrFormat, ConfigName, maxConfigSize)
	}
	return ParseConfig(b)
}

// ParseConfig parses encryption-config.json: one JSON object with a "files" list (nothing
// after it). Unknown fields are ignored, as the peer ignores them.
func ParseConfig(b []byte) (*Config, error) {
	var c Config
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrFormat, ConfigName, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: %s: data after the JSON object", ErrFormat, ConfigName)
	}
	if c.Files == nil {
		return nil, fmt.Errorf("%w: %s has no \"files\" list", ErrFormat, ConfigName)
	}
	return &c, nil
}

func loadEntry(dir, base string, opts Options) (Entry, error) {
	name := strings.TrimSuffix(base, Suffix)
	if !strings.HasSuffix(base, Suffix) || name == "" || name == "." || name == ".." ||
		strings.ContainsAny(name, "/\\") || !filepath.IsLocal(name) {
		return Entry{}, fmt.Errorf("%w: %q is not a valid encrypted file name (want NAME%s)", ErrFormat, base, Suffix)
	}
	p := filepath.Join(dir, base)
	st, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return Entry{}, fmt.Errorf("%w: %s is missing", ErrFormat, p)
	}
	if err != nil {
		return Entry{}, fmt.Errorf("ccz: %w", err)
	}
	if !st.Mode().IsRegular() {
		return Entry{}, fmt.Errorf("%w: %s is not a regular file", ErrFormat, p)
	}
	f, err := os.Open(p)
	if err != nil {
		return Entry{}, fmt.Errorf("ccz: %w", err)
	}
	defer f.Close()
	var hb [HeaderSize + IVSize]byte
	if _, err := io.ReadFull(f, hb[:]); err != nil {
		return Entry{}, fmt.Errorf("%w: %s: %d bytes, shorter than the %d-byte header and IV", ErrFormat, p, st.Size(), len(hb))
	}
	h, err := ParseHeader(hb[:], opts.MaxDataLen)
	if err != nil {
		return Entry{}, fmt.Errorf("%s: %w", p, err)
	}
	if st.Size() != h.MessageSize() {
		if st.Size() < h.MessageSize() {
			return Entry{}, fmt.Errorf("%w: %s: truncated: data_len %d needs %d bytes, file has %d", ErrFormat, p, h.DataLen, h.MessageSize(), st.Size())
		}
		return Entry{}, fmt.Errorf("%w: %s: %d trailing bytes after data_len %d", ErrFormat, p, st.Size()-h.MessageSize(), h.DataLen)
	}
	return Entry{Name: name, Path: p, Size: st.Size(), Header: h}, nil
}

// Decryptor decrypts the files of an Input one at a time, reusing one buffer as large as the
// largest message (memory is bounded by Options.MaxDataLen). It is not safe for concurrent
// use. Call Close to wipe the buffer.
type Decryptor struct {
	aead cipher.AEAD
	buf  []byte
	max  int64
}

// NewDecryptor returns a Decryptor for key. The key is not retained beyond the AES key
// schedule inside the cipher.
func NewDecryptor(key []byte, opts Options) (*Decryptor, error) {
	aead, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	return &Decryptor{aead: aead, max: opts.MaxDataLen}, nil
}

// Decrypt reads e's file, checks it again against its header (the file may have changed since
// Load), authenticates and decrypts it in place, and returns the plaintext. The returned slice
// aliases the Decryptor's buffer: it is valid until the next call to Decrypt or Close. On
// failure (ErrFormat, ErrAuth, ErrTooLarge, I/O) the buffer is wiped.
func (d *Decryptor) Decrypt(e Entry) ([]byte, error) {
	f, err := os.Open(e.Path)
	if err != nil {
		return nil, fmt.Errorf("ccz: %w", err)
	}
	defer f.Close()
	var hb [HeaderSize + IVSize]byte
	if _, err := io.ReadFull(f, hb[:]); err != nil {
		return nil, fmt.Errorf("%w: %s: short header", ErrFormat, e.Path)
	}
	h, err := ParseHeader(hb[:], d.max)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", e.Path, err)
	}
	n := int(h.DataLen)
	if cap(d.buf) < n {
		d.wipe()
		d.buf = make([]byte, n)
	}
	ct := d.buf[:n]
	if _, err := io.ReadFull(f, ct); err != nil {
		d.wipe()
		return nil, fmt.Errorf("%w: %s: truncated: data_len %d", ErrFormat, e.Path, h.DataLen)
	}
	var one [1]byte
	if k, _ := f.Read(one[:]); k != 0 {
		d.wipe()
		return nil, fmt.Errorf("%w: %s: trailing bytes after data_len %d", ErrFormat, e.Path, h.DataLen)
	}
	pt, err := d.aead.Open(ct[:0], h.IV[:], ct, nil)
	if err != nil {
		d.wipe()
		return nil, fmt.Errorf("%s: %w", e.Path, ErrAuth)
	}
	if pt == nil {
		pt = ct[:0]
	}
	return pt, nil
}

func (d *Decryptor) wipe() { clear(d.buf[:cap(d.buf)]) }

// Close wipes and releases the buffer.
func (d *Decryptor) Close() {
	d.wipe()
	d.buf = nil
}
