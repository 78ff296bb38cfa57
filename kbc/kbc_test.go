package kbc

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestParseResourceURI(t *testing.T) {
	for in, want := range map[string]ResourcePath{
		"kbs:///default/key/1":                 {"default", "key", "1"},
		"kbs://kbs.example:8080/repo/type/tag": {"repo", "type", "tag"},
		"kbs:///my-repo/model_keys/llama.3-8b": {"my-repo", "model_keys", "llama.3-8b"},
	} {
		got, err := ParseResourceURI(in)
		require.NoError(t, err, in)
		require.Equal(t, want, got)
		require.Equal(t, "kbs:///"+want.Repo+"/"+want.Type+"/"+want.Tag, got.String())
	}
	for _, in := range []string{
		"", "default/key/1", "kbs:///", "kbs:///a/b", "kbs:///a/b/c/d", "kbs:///a//c", "kbs:///a/b/c/",
		"kbs:///a/./c", "kbs:///a/../c", "kbs:///a/b/c?version=1", "kbs:///a/b/c#f", "kbs+resource:///a/b/c",
		"kbs:///a/b%2Fx/c", "kbs:///a/b c/d", "kbs://user@host/a/b/c", "kbs:a/b/c", "https:///a/b/c",
		"kbs:///a/b/" + strings.Repeat("x", 256),
	} {
		_, err := ParseResourceURI(in)
		require.ErrorIs(t, err, ErrInvalidURI, in)
	}
}

func TestSanitize(t *testing.T) {
	require.Equal(t, "a?b?c", Sanitize("a\nb\x00c"))
	require.Equal(t, "caf?", Sanitize("café"))
	long := Sanitize(strings.Repeat("x", 1000))
	require.True(t, strings.HasSuffix(long, "…"))
	require.LessOrEqual(t, len(long), 300+len("…"))
}

func TestHTTPOptions(t *testing.T) {
	d := HTTPOptions{}.Defaults()
	require.Equal(t, 2, d.Retries)
	require.EqualValues(t, 4<<20, d.MaxResponseBytes)
	require.Equal(t, 0, HTTPOptions{Retries: -1}.Defaults().Retries)
	pool, err := HTTPOptions{}.CertPool()
	require.NoError(t, err)
	require.Nil(t, pool, "system roots")
	_, err = HTTPOptions{CAFile: filepath.Join(t.TempDir(), "missing.pem")}.CertPool()
	require.ErrorIs(t, err, ErrConfig)
	bad := filepath.Join(t.TempDir(), "bad.pem")
	require.NoError(t, os.WriteFile(bad, []byte("not a certificate"), 0o600))
	_, err = HTTPOptions{CAFile: bad}.CertPool()
	require.ErrorIs(t, err, ErrConfig)
}

// A CA file that is a FIFO or a device is refused at once (not a blocked open or an endless
// read), one over the size bound too.
func TestCAFileMustBeASmallRegularFile(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "ca.pem")
	require.NoError(t, syscall.Mkfifo(fifo, 0o600))
	big := filepath.Join(dir, "big.pem")
	require.NoError(t, os.WriteFile(big, make([]byte, maxCAFile+1), 0o600))
	for _, f := range []string{fifo, "/dev/zero", big} {
		done := make(chan error, 1)
		go func() { _, err := HTTPOptions{CAFile: f}.CertPool(); done <- err }()
		select {
		case err := <-done:
			require.ErrorIs(t, err, ErrConfig, f)
		case <-time.After(10 * time.Second):
			t.Fatalf("CertPool(%s) blocked", f)
		}
	}
}
