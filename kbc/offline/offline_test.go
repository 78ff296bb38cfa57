package offline

import (
	"encoding/base64"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/kbc"
)

func TestKeyFileAndEnv(t *testing.T) {
	dir := t.TempDir()
	kf := filepath.Join(dir, "key")
	require.NoError(t, os.WriteFile(kf, []byte("raw-secret"), 0o600))
	c, err := New(Options{KeyFile: kf})
	require.NoError(t, err)
	for _, uri := range []string{"kbs:///a/b/c", "6f9a5b3c-2e1d-4c8b-9a7f-0e1d2c3b4a59"} {
		got, err := c.GetResource(t.Context(), uri)
		require.NoError(t, err)
		require.Equal(t, []byte("raw-secret"), got)
	}
	_, err = c.GetResource(t.Context(), "")
	require.ErrorIs(t, err, kbc.ErrInvalidURI)

	t.Setenv("CAI_TEST_KEY", base64.StdEncoding.EncodeToString([]byte("env-secret")))
	c, err = New(Options{KeyEnv: "CAI_TEST_KEY"})
	require.NoError(t, err)
	got, err := c.GetResource(t.Context(), "kbs:///a/b/c")
	require.NoError(t, err)
	require.Equal(t, []byte("env-secret"), got)

	t.Setenv("CAI_TEST_BAD", "not base64!")
	_, err = New(Options{KeyEnv: "CAI_TEST_BAD"})
	require.ErrorIs(t, err, kbc.ErrConfig)
	require.NotContains(t, err.Error(), "not base64!")
	_, err = New(Options{KeyEnv: "CAI_TEST_UNSET_VARIABLE"})
	require.ErrorIs(t, err, kbc.ErrConfig)
	_, err = New(Options{})
	require.ErrorIs(t, err, kbc.ErrConfig)
	_, err = New(Options{KeyFile: kf, KeyEnv: "CAI_TEST_KEY"})
	require.ErrorIs(t, err, kbc.ErrConfig)
	require.NoError(t, os.WriteFile(kf, nil, 0o600))
	_, err = New(Options{KeyFile: kf})
	require.ErrorIs(t, err, kbc.ErrConfig)
}

func TestResourcesJSON(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "resources.json")
	// CoCo's offline_fs_kbc form (repo/type/tag), our URI form, and an ITA key id.
	require.NoError(t, os.WriteFile(p, []byte(`{"default/key/1":"a2V5MQ==","kbs:///m/k/2":"a2V5Mg==","6f9a5b3c-2e1d-4c8b-9a7f-0e1d2c3b4a59":"a2V5Mw=="}`), 0o600))
	c, err := New(Options{Resources: p})
	require.NoError(t, err)
	for uri, want := range map[string]string{
		"kbs:///default/key/1": "key1", "kbs://ignored-host:8080/default/key/1": "key1", "default/key/1": "key1",
		"kbs:///m/k/2": "key2", "6f9a5b3c-2e1d-4c8b-9a7f-0e1d2c3b4a59": "key3",
	} {
		got, err := c.GetResource(t.Context(), uri)
		require.NoError(t, err, uri)
		require.Equal(t, want, string(got), uri)
	}
	_, err = c.GetResource(t.Context(), "kbs:///default/key/2")
	require.ErrorIs(t, err, kbc.ErrNotFound)

	for name, body := range map[string]string{
		"dup":     `{"default/key/1":"a2V5MQ==","kbs:///default/key/1":"a2V5MQ=="}`,
		"badb64":  `{"a/b/c":"%%%"}`,
		"notjson": `["a"]`,
	} {
		require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
		_, err := New(Options{Resources: p})
		require.ErrorIs(t, err, kbc.ErrConfig, name)
	}
}

func TestResourcesDir(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "default", "key"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "default", "key", "1"), []byte("key1"), 0o600))
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "default", "dir", "sub"), 0o700))
	outside := filepath.Join(t.TempDir(), "outside")
	require.NoError(t, os.WriteFile(outside, []byte("outside"), 0o600))
	require.NoError(t, os.Symlink(outside, filepath.Join(dir, "default", "key", "escape")))
	c, err := New(Options{Resources: dir})
	require.NoError(t, err)
	got, err := c.GetResource(t.Context(), "kbs:///default/key/1")
	require.NoError(t, err)
	require.Equal(t, "key1", string(got))
	_, err = c.GetResource(t.Context(), "kbs:///default/key/2")
	require.ErrorIs(t, err, kbc.ErrNotFound)
	_, err = c.GetResource(t.Context(), "kbs:///default/dir/sub")
	require.ErrorIs(t, err, kbc.ErrNotFound)
	_, err = c.GetResource(t.Context(), "kbs:///default/key/escape")
	require.Error(t, err)
	require.NotContains(t, err.Error(), "outside\"")
	_, err = c.GetResource(t.Context(), "kbs:///default/../key")
	require.ErrorIs(t, err, kbc.ErrInvalidURI)

	// A FIFO where a secret should be is refused at once, not waited on.
	require.NoError(t, syscall.Mkfifo(filepath.Join(dir, "default", "key", "fifo"), 0o600))
	done := make(chan error, 1)
	go func() { _, err := c.GetResource(t.Context(), "kbs:///default/key/fifo"); done <- err }()
	select {
	case err := <-done:
		require.ErrorIs(t, err, kbc.ErrNotFound)
	case <-time.After(30 * time.Second): // a hang, not a timing assertion
		t.Fatal("GetResource blocked opening a FIFO")
	}
}
