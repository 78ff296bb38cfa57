// Package ollama reads and writes Ollama's on-disk model store ($OLLAMA_MODELS): model names,
// manifests (manifests/<host>/<namespace>/<model>/<tag>) and content-addressed blobs
// (blobs/sha256-<hex>), as Ollama v0.5.7 … v0.3x lay them out.
//
// Ollama checks nothing when it loads a model: it opens blobs by name and never re-hashes
// them. This package is therefore strict where Ollama is not: names are validated with
// Ollama's own part rules, digests must be "sha256:" and 64 hex digits, every referenced blob
// must exist, and WriteModel hashes what it writes.
package ollama

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
)

// Name defaults, as Ollama fills them in.
const (
	DefaultHost      = "registry.ollama.ai"
	DefaultNamespace = "library"
	DefaultTag       = "latest"
)

// Media types of a manifest and its layers.
const (
	MediaTypeManifest = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeConfig   = "application/vnd.docker.container.image.v1+json"
	MediaTypeModel    = "application/vnd.ollama.image.model"
	MediaTypeTemplate = "application/vnd.ollama.image.template"
	MediaTypeParams   = "application/vnd.ollama.image.params"
	MediaTypeSystem   = "application/vnd.ollama.image.system"
	MediaTypeLicense  = "application/vnd.ollama.image.license"
	MediaTypeMessages = "application/vnd.ollama.image.messages"
	MediaTypeAdapter  = "application/vnd.ollama.image.adapter"
	MediaTypeProject  = "application/vnd.ollama.image.projector"
)

// Store layout.
const (
	ManifestsDir = "manifests"
	BlobsDir     = "blobs"
)

// maxManifestSize bounds a manifest file (real ones are well under 4 KiB).
const maxManifestSize = 1 << 20

var (
	// ErrInvalidName means a model name does not follow Ollama's rules.
	ErrInvalidName = errors.New("ollama: invalid model name")
	// ErrInvalidManifest means a manifest is not valid JSON of the expected shape or holds
	// an invalid digest.
	ErrInvalidManifest = errors.New("ollama: invalid manifest")
	// ErrNotFound means the model's manifest or one of its blobs is missing from the store.
	ErrNotFound = errors.New("ollama: not found")
)

// Name is a fully qualified model name: host/namespace/model:tag.
type Name struct {
	Host, Namespace, Model, Tag string
}

// ParseName parses NAME[:TAG] in Ollama's forms ("tiny", "tiny:v1", "user/tiny",
// "host:port/ns/tiny:tag", optionally with an http(s):// scheme), fills the defaults
// (registry.ollama.ai, library, latest) and validates every part with Ollama's rules
// (types/model/name.go): each part starts with a letter, digit or '_' and continues with
// letters, digits, '_', '-' and '.', except that the namespace has no '.', only the host may
// hold ':'; host 1–350 bytes, other parts 1–80. Case is kept (Ollama v0.5.7 keeps it in paths).
func ParseName(s string) (Name, error) {
	orig := s
	var n Name
	if strings.LastIndex(s, ":") > strings.LastIndex(s, "/") {
		i := strings.LastIndex(s, ":")
		s, n.Tag = s[:i], s[i+1:]
		if n.Tag == "" {
			return Name{}, fmt.Errorf("%w: %q: empty tag", ErrInvalidName, orig)
		}
	}
	parts := strings.Split(s, "/")
	switch len(parts) {
	case 1:
		n.Model = parts[0]
	case 2:
		n.Namespace, n.Model = parts[0], parts[1]
	default:
		host := strings.Join(parts[:len(parts)-2], "/")
		if _, h, ok := strings.Cut(host, "://"); ok {
			host = h
		}
		n.Host, n.Namespace, n.Model = host, parts[len(parts)-2], parts[len(parts)-1]
	}
	if n.Host == "" && len(parts) <= 2 {
		n.Host = DefaultHost
	}
	if n.Namespace == "" && len(parts) == 1 {
		n.Namespace = DefaultNamespace
	}
	if n.Tag == "" {
		n.Tag = DefaultTag
	}
	if err := n.Validate(); err != nil {
		return Name{}, fmt.Errorf("%w (in %q)", err, orig)
	}
	return n, nil
}

type partKind int

const (
	kindHost partKind = iota
	kindNamespace
	kindModel
	kindTag
)

var kindNames = [...]string{"host", "namespace", "model", "tag"}

// Validate checks every part against Ollama's rules (see ParseName).
func (n Name) Validate() error {
	for k, p := range []string{n.Host, n.Namespace, n.Model, n.Tag} {
		if err := validPart(partKind(k), p); err != nil {
			return fmt.Errorf("%w: %s %q: %s", ErrInvalidName, kindNames[k], p, err)
		}
	}
	return nil
}

func validPart(kind partKind, s string) error {
	maxLen := 80
	if kind == kindHost {
		maxLen = 350
	}
	if len(s) < 1 || len(s) > maxLen {
		return fmt.Errorf("length must be 1-%d", maxLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_'
		if i == 0 {
			if !alnum {
				return errors.New("must start with a letter, digit or '_'")
			}
			continue
		}
		switch {
		case alnum, c == '-':
		case c == '.' && kind != kindNamespace:
		case c == ':' && kind == kindHost:
		default:
			return fmt.Errorf("character %q not allowed", c)
		}
	}
	return nil
}

// String returns host/namespace/model:tag.
func (n Name) String() string {
	return n.Host + "/" + n.Namespace + "/" + n.Model + ":" + n.Tag
}

// ManifestPath returns the manifest's slash-separated path relative to the store root:
// manifests/<host>/<namespace>/<model>/<tag>.
func (n Name) ManifestPath() string {
	return path.Join(ManifestsDir, n.Host, n.Namespace, n.Model, n.Tag)
}

// Descriptor is a manifest's reference to a blob.
type Descriptor struct {
	MediaType string `json:"mediaType"`
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
	From      string `json:"from,omitempty"`
	Name      string `json:"name,omitempty"`
}

// Manifest is an Ollama manifest (schemaVersion 2).
type Manifest struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Config        Descriptor   `json:"config"`
	Layers        []Descriptor `json:"layers"`
}

// ValidDigest checks that d is "sha256:" followed by 64 hex digits (Ollama also accepts
// "sha256-" in file names; manifests use ':').
func ValidDigest(d string) error {
	h, ok := strings.CutPrefix(d, "sha256:")
	if !ok || len(h) != 64 {
		return fmt.Errorf("%w: digest %q is not sha256:<64 hex>", ErrInvalidManifest, d)
	}
	if _, err := hex.DecodeString(h); err != nil {
		return fmt.Errorf("%w: digest %q is not sha256:<64 hex>", ErrInvalidManifest, d)
	}
	return nil
}

// BlobPath returns the slash-separated store-relative path of the blob with digest d:
// blobs/sha256-<hex>.
func BlobPath(d string) (string, error) {
	if err := ValidDigest(d); err != nil {
		return "", err
	}
	return BlobsDir + "/sha256-" + strings.TrimPrefix(d, "sha256:"), nil
}

// ParseManifest parses and checks a manifest: schemaVersion 2, at least one layer, every
// digest valid, sizes non-negative. An empty config digest is allowed (Ollama loads such
// models); a config with a digest is a blob like the layers.
func ParseManifest(b []byte) (*Manifest, error) {
	var m Manifest
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidManifest, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: data after the JSON object", ErrInvalidManifest)
	}
	if m.SchemaVersion != 2 {
		return nil, fmt.Errorf("%w: schemaVersion %d, want 2", ErrInvalidManifest, m.SchemaVersion)
	}
	if len(m.Layers) == 0 {
		return nil, fmt.Errorf("%w: no layers", ErrInvalidManifest)
	}
	if m.Config.Digest != "" {
		if err := ValidDigest(m.Config.Digest); err != nil {
			return nil, fmt.Errorf("config: %w", err)
		}
	}
	for i, l := range append([]Descriptor{m.Config}, m.Layers...) {
		if l.Size < 0 {
			return nil, fmt.Errorf("%w: negative size", ErrInvalidManifest)
		}
		if i > 0 {
			if err := ValidDigest(l.Digest); err != nil {
				return nil, fmt.Errorf("layer %d: %w", i-1, err)
			}
			if l.MediaType == "" {
				return nil, fmt.Errorf("%w: layer %d has no mediaType", ErrInvalidManifest, i-1)
			}
		}
	}
	return &m, nil
}

// Blobs returns the distinct digests the manifest references (config first if set, then the
// layers in order).
func (m *Manifest) Blobs() []string {
	var out []string
	seen := map[string]bool{}
	for _, d := range append([]Descriptor{m.Config}, m.Layers...) {
		if d.Digest != "" && !seen[d.Digest] {
			seen[d.Digest] = true
			out = append(out, d.Digest)
		}
	}
	return out
}

// ReadManifest reads and parses the manifest of model name in storeDir, returning it and its
// exact bytes.
func ReadManifest(storeDir, name string) (*Manifest, []byte, Name, error) {
	n, err := ParseName(name)
	if err != nil {
		return nil, nil, Name{}, err
	}
	p := filepath.Join(storeDir, filepath.FromSlash(n.ManifestPath()))
	b, err := readSmallRegular(p, maxManifestSize)
	if err != nil {
		return nil, nil, n, err
	}
	m, err := ParseManifest(b)
	if err != nil {
		return nil, nil, n, fmt.Errorf("%s: %w", p, err)
	}
	return m, b, n, nil
}

func readSmallRegular(p string, limit int64) ([]byte, error) {
	st, err := os.Lstat(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, p)
	}
	if err != nil {
		return nil, fmt.Errorf("ollama: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("ollama: %s is not a regular file", p)
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("ollama: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("ollama: %w", err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%w: %s larger than %d bytes", ErrInvalidManifest, p, limit)
	}
	return b, nil
}

// ManifestDigest returns the hex SHA-256 of model name's manifest file: the ID `ollama list`
// shows (its first 12 digits) and the digest Ollama reports for the model.
func ManifestDigest(storeDir, name string) (string, error) {
	_, b, _, err := ReadManifest(storeDir, name)
	if err != nil {
		return "", err
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:]), nil
}

// ModelFiles returns exactly the files that make up model name in storeDir: its manifest
// (first), then the config blob (if the manifest names one) and every distinct layer blob.
// Every blob must exist as a regular file (not a symlink) whose size matches the manifest.
// Name is the store-relative slash path (the path inside the encrypted model), Path the file.
func ModelFiles(storeDir, name string) ([]modelcrypt.InputFile, error) {
	m, _, n, err := ReadManifest(storeDir, name)
	if err != nil {
		return nil, err
	}
	files := []modelcrypt.InputFile{{Name: n.ManifestPath(), Path: filepath.Join(storeDir, filepath.FromSlash(n.ManifestPath()))}}
	sizes := map[string]int64{}
	for _, d := range append([]Descriptor{m.Config}, m.Layers...) {
		if d.Digest != "" {
			sizes[d.Digest] = d.Size
		}
	}
	for _, d := range m.Blobs() {
		rel, err := BlobPath(d)
		if err != nil {
			return nil, err
		}
		p := filepath.Join(storeDir, filepath.FromSlash(rel))
		st, err := os.Lstat(p)
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w: blob %s of %s", ErrNotFound, p, n)
		}
		if err != nil {
			return nil, fmt.Errorf("ollama: %w", err)
		}
		if !st.Mode().IsRegular() {
			return nil, fmt.Errorf("ollama: blob %s is not a regular file", p)
		}
		if st.Size() != sizes[d] {
			return nil, fmt.Errorf("%w: blob %s is %d bytes, manifest says %d", ErrInvalidManifest, p, st.Size(), sizes[d])
		}
		files = append(files, modelcrypt.InputFile{Name: rel, Path: p})
	}
	return files, nil
}
