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
	"path/filepath"
)

// Layer is the content of one layer for WriteModel: exactly one of Path (a file to copy) or
// Data.
type Layer struct {
	MediaType string // e.g. MediaTypeModel for the GGUF, MediaTypeTemplate, MediaTypeParams
	Path      string
	Data      []byte
}

// config is the config blob, as `ollama create` writes it (only /api/show and /api/tags read it).
type config struct {
	ModelFormat   string   `json:"model_format"`
	ModelFamily   string   `json:"model_family"`
	ModelFamilies []string `json:"model_families"`
	ModelType     string   `json:"model_type"`
	FileType      string   `json:"file_type"`
	Architecture  string   `json:"architecture"`
	OS            string   `json:"os"`
	RootFS        struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

// WriteModel creates model name in storeDir (created if missing) from layers, the way
// `ollama create` lays it out: every layer, then a config blob, is streamed into a temporary
// file in storeDir (outside blobs/, where Ollama deletes unknown files at startup) while being
// hashed, fsynced and renamed to blobs/sha256-<hex>; the manifest is written last, by
// temporary file and rename, so the model never looks complete before all blobs are there.
// It returns the hex SHA-256 of the manifest file (the ID `ollama list` shows).
func WriteModel(storeDir, name string, layers []Layer) (string, error) {
	n, err := ParseName(name)
	if err != nil {
		return "", err
	}
	if len(layers) == 0 {
		return "", errors.New("ollama: a model needs at least one layer")
	}
	for _, d := range []string{storeDir, filepath.Join(storeDir, BlobsDir)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", fmt.Errorf("ollama: %w", err)
		}
	}
	m := Manifest{SchemaVersion: 2, MediaType: MediaTypeManifest}
	var cfg config
	cfg.ModelFormat, cfg.Architecture, cfg.OS, cfg.RootFS.Type = "gguf", "amd64", "linux", "layers"
	cfg.RootFS.DiffIDs = []string{}
	for i, l := range layers {
		if l.MediaType == "" || (l.Path == "") == (l.Data == nil) {
			return "", fmt.Errorf("ollama: layer %d: need a mediaType and exactly one of Path or Data", i)
		}
		var r io.Reader = bytes.NewReader(l.Data)
		if l.Path != "" {
			f, err := os.Open(l.Path)
			if err != nil {
				return "", fmt.Errorf("ollama: layer %d: %w", i, err)
			}
			r = f
			defer f.Close()
		}
		d, size, err := writeBlob(storeDir, r)
		if err != nil {
			return "", fmt.Errorf("ollama: layer %d: %w", i, err)
		}
		m.Layers = append(m.Layers, Descriptor{MediaType: l.MediaType, Digest: d, Size: size})
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, d)
	}
	cb, err := json.Marshal(cfg)
	if err != nil {
		return "", err
	}
	d, size, err := writeBlob(storeDir, bytes.NewReader(cb))
	if err != nil {
		return "", fmt.Errorf("ollama: config: %w", err)
	}
	m.Config = Descriptor{MediaType: MediaTypeConfig, Digest: d, Size: size}
	mb, err := json.Marshal(m)
	if err != nil {
		return "", err
	}
	dst := filepath.Join(storeDir, filepath.FromSlash(n.ManifestPath()))
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return "", fmt.Errorf("ollama: %w", err)
	}
	if err := writeAtomic(storeDir, dst, bytes.NewReader(mb), nil); err != nil {
		return "", fmt.Errorf("ollama: manifest: %w", err)
	}
	s := sha256.Sum256(mb)
	return hex.EncodeToString(s[:]), nil
}

// writeBlob streams r into blobs/ under its digest.
func writeBlob(storeDir string, r io.Reader) (digest string, size int64, err error) {
	h := sha256.New()
	var dst string
	err = writeAtomic(storeDir, "", r, func(tmp string, n int64) string {
		digest = "sha256:" + hex.EncodeToString(h.Sum(nil))
		size = n
		rel, _ := BlobPath(digest)
		dst = filepath.Join(storeDir, filepath.FromSlash(rel))
		return dst
	}, h)
	return digest, size, err
}

// writeAtomic copies r (also into the extra writers) to a temporary file in storeDir, fsyncs
// it and renames it to dst (or to name(tmp, size) when dst is "").
func writeAtomic(storeDir, dst string, r io.Reader, name func(tmp string, n int64) string, extra ...io.Writer) (err error) {
	f, err := os.CreateTemp(storeDir, ".cai-tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	w := io.MultiWriter(append([]io.Writer{f}, extra...)...)
	n, err := io.Copy(w, r)
	if err != nil {
		return err
	}
	if err = f.Chmod(0o644); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if dst == "" {
		dst = name(tmp, n)
	}
	if err = os.Rename(tmp, dst); err != nil {
		return err
	}
	return syncDir(filepath.Dir(dst))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
