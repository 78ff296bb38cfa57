// Package offline is a key broker without a broker, for development and air-gapped tests:
// secrets come from local files or the environment, and no evidence is produced or checked.
// Nothing here is attested; use it only where the key store itself is trusted.
//
// Sources (exactly one):
//
//   - Key file: the file's bytes are THE secret, returned for every resource name.
//   - Key environment variable: std base64 of the secret, returned for every resource name.
//   - Resources JSON file, the format of Confidential Containers' offline_fs_kbc
//     (/etc/aa-offline_fs_kbc-resources.json): {"<name>": "<std base64>", …}, where a name is
//     a resource path repo/type/tag (as CoCo writes it), a kbs:///repo/type/tag URI (same
//     resource), or any other exact string (e.g. an ITA key id).
//   - Resources directory: the secret of kbs:///repo/type/tag is the regular file
//     <dir>/<repo>/<type>/<tag> (opened with os.Root, so it cannot escape the directory).
package offline

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"strings"
	"syscall"

	"github.com/cai-agent/cai-agent/kbc"
)

// MaxSecret bounds a secret read from a file; MaxResources bounds a resources JSON file.
const (
	MaxSecret    = 1 << 20
	MaxResources = 16 << 20
)

// Options selects the source; set exactly one field.
type Options struct {
	KeyFile   string // file holding the secret (raw bytes), served for every name
	KeyEnv    string // name of an environment variable holding std base64 of the secret
	Resources string // a resources JSON file or a resources directory
}

// Client serves secrets from local sources.
type Client struct {
	single []byte            // key file / env mode
	byName map[string][]byte // JSON mode
	dir    string            // directory mode
}

var _ kbc.Client = (*Client)(nil)

// New loads the source. Errors wrap kbc.ErrConfig (nothing or several sources, unreadable or
// malformed source) and never contain secret bytes.
func New(o Options) (*Client, error) {
	n := 0
	for _, s := range []string{o.KeyFile, o.KeyEnv, o.Resources} {
		if s != "" {
			n++
		}
	}
	if n != 1 {
		return nil, fmt.Errorf("%w: offline: give exactly one of a key file, a key environment variable or a resources file/directory", kbc.ErrConfig)
	}
	switch {
	case o.KeyFile != "":
		// The path is not repeated in errors: it may be a secret pasted in its place.
		b, err := kbc.ReadSmallFile(o.KeyFile, MaxSecret)
		if err != nil {
			return nil, fmt.Errorf("%w: offline: key file: %w", kbc.ErrConfig, kbc.WithoutPath(err))
		}
		if len(b) == 0 {
			return nil, fmt.Errorf("%w: offline: the key file is empty", kbc.ErrConfig)
		}
		return &Client{single: b}, nil
	case o.KeyEnv != "":
		v, ok := os.LookupEnv(o.KeyEnv)
		if !ok || v == "" {
			return nil, fmt.Errorf("%w: offline: environment variable %s is not set", kbc.ErrConfig, o.KeyEnv)
		}
		b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(v))
		if err != nil || len(b) == 0 {
			return nil, fmt.Errorf("%w: offline: environment variable %s is not std base64 of a secret", kbc.ErrConfig, o.KeyEnv)
		}
		return &Client{single: b}, nil
	}
	fi, err := os.Stat(o.Resources)
	if err != nil {
		return nil, fmt.Errorf("%w: offline: resources: %w", kbc.ErrConfig, err)
	}
	if fi.IsDir() {
		return &Client{dir: o.Resources}, nil
	}
	b, err := kbc.ReadSmallFile(o.Resources, MaxResources)
	if err != nil {
		return nil, fmt.Errorf("%w: offline: resources file: %w", kbc.ErrConfig, err)
	}
	var m map[string]string
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%w: offline: resources file %s: want a JSON object {\"repo/type/tag\": \"<std base64>\"}: %v", kbc.ErrConfig, o.Resources, err)
	}
	c := &Client{byName: map[string][]byte{}}
	for name, v := range m {
		secret, err := base64.StdEncoding.DecodeString(v)
		if err != nil {
			return nil, fmt.Errorf("%w: offline: resources file %s: value of %q is not std base64", kbc.ErrConfig, o.Resources, kbc.Sanitize(name))
		}
		key := normalize(name)
		if _, dup := c.byName[key]; dup {
			return nil, fmt.Errorf("%w: offline: resources file %s: %q is defined twice", kbc.ErrConfig, o.Resources, kbc.Sanitize(name))
		}
		c.byName[key] = secret
	}
	return c, nil
}

// normalize maps kbs:///repo/type/tag and repo/type/tag to "repo/type/tag"; other names are
// kept as they are.
func normalize(name string) string {
	if rp, err := kbc.ParseResourceURI(name); err == nil {
		return rp.Repo + "/" + rp.Type + "/" + rp.Tag
	}
	if rp, err := kbc.ParseResourceURI("kbs:///" + name); err == nil {
		return rp.Repo + "/" + rp.Type + "/" + rp.Tag
	}
	return name
}

// GetResource implements kbc.Client. Unknown names wrap kbc.ErrNotFound.
func (c *Client) GetResource(ctx context.Context, uri string) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if uri == "" {
		return nil, fmt.Errorf("%w: empty resource name", kbc.ErrInvalidURI)
	}
	switch {
	case c.single != nil:
		slog.Debug("offline: serving the configured key", "resource", kbc.Sanitize(uri))
		return append([]byte{}, c.single...), nil
	case c.byName != nil:
		s, ok := c.byName[normalize(uri)]
		if !ok {
			return nil, fmt.Errorf("%w: offline: %q is not in the resources file", kbc.ErrNotFound, kbc.Sanitize(uri))
		}
		return append([]byte{}, s...), nil
	}
	rp, err := kbc.ParseResourceURI(uri)
	if err != nil {
		return nil, err
	}
	root, err := os.OpenRoot(c.dir)
	if err != nil {
		return nil, fmt.Errorf("%w: offline: resources directory: %w", kbc.ErrConfig, err)
	}
	defer root.Close()
	// O_NONBLOCK: opening a FIFO planted in the directory must not block forever (it is then
	// refused as not a regular file); it has no effect on a regular file's reads.
	f, err := root.OpenFile(rp.Repo+"/"+rp.Type+"/"+rp.Tag, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: offline: %s is not in %s", kbc.ErrNotFound, rp, c.dir)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: offline: %s: %w", kbc.ErrConfig, rp, err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: offline: %s is not a regular file in %s", kbc.ErrNotFound, rp, c.dir)
	}
	b, err := io.ReadAll(io.LimitReader(f, MaxSecret+1))
	if err != nil {
		return nil, fmt.Errorf("%w: offline: %s: %w", kbc.ErrConfig, rp, err)
	}
	if len(b) > MaxSecret {
		return nil, fmt.Errorf("%w: offline: %s is larger than %d bytes", kbc.ErrConfig, rp, MaxSecret)
	}
	return b, nil
}
