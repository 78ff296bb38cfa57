package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// dev-kbs on port 0 publishes its address in --addr-file, serves get-resource with the sample
// TEE, and stops when its context is cancelled.
func TestDevKBSAddrFile(t *testing.T) {
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "secret")
	require.NoError(t, os.WriteFile(secretFile, []byte("s3cr3t-model-key"), 0o600))
	addr, stop := devKBS(t, "--resource", "kbs:///default/model/key="+"@"+secretFile)
	require.Regexp(t, `^127\.0\.0\.1:\d+$`, addr)

	out := filepath.Join(dir, "key")
	code, stdout, stderr := runCLI(t, "--tee", "sample", "--log-level", "debug", "get-resource", "--kbc", "trustee",
		"--kbs-url", "http://"+addr, "--insecure-http", "--resource", "kbs:///default/model/key", "--out", out)
	require.Equal(t, ExitOK, code, stderr)
	require.Empty(t, stdout)
	require.NotContains(t, stderr, "s3cr3t")
	got, err := os.ReadFile(out)
	require.NoError(t, err)
	require.Equal(t, "s3cr3t-model-key", string(got))
	fi, err := os.Stat(out)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	log := stop() // fails the test unless dev-kbs stops with exit 0 and wrote nothing on stdout
	require.Contains(t, log, "DEVELOPMENT ONLY")
	require.Contains(t, log, "path=/kbs/v0/resource/default/model/key status=200")
	require.NotContains(t, log, "s3cr3t")
}

// dev-kbs --addr-file never writes through a symlink planted next to the file (its directory
// may be shared): the address lands in FILE, a regular file, and nothing else changes.
func TestDevKBSAddrFileSymlink(t *testing.T) {
	dir, shared := t.TempDir(), t.TempDir()
	victim := filepath.Join(dir, "victim")
	require.NoError(t, os.WriteFile(victim, []byte("keep me\n"), 0o600))
	addrFile := filepath.Join(shared, "addr")
	require.NoError(t, os.Symlink(victim, filepath.Join(shared, ".addr.tmp")))
	secretFile := filepath.Join(dir, "secret")
	require.NoError(t, os.WriteFile(secretFile, []byte("k"), 0o600))

	ctx, cancel := context.WithCancel(context.Background())
	var kbsOut, kbsErr lockedBuffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"cai-agent", "dev-kbs", "--listen", "127.0.0.1:0", "--addr-file", addrFile,
			"--resource", "kbs:///a/b/c=@" + secretFile}, nil, &kbsOut, &kbsErr)
	}()
	var addr string
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(addrFile)
		addr = strings.TrimSpace(string(b))
		return err == nil && addr != ""
	}, 10*time.Second, 10*time.Millisecond, "dev-kbs did not start: %s", kbsErr.String())
	cancel()
	require.Equal(t, ExitOK, <-done, kbsErr.String())

	got, err := os.ReadFile(victim)
	require.NoError(t, err)
	assert.Equal(t, "keep me\n", string(got), "written through the planted symlink")
	fi, err := os.Lstat(addrFile)
	require.NoError(t, err)
	assert.True(t, fi.Mode().IsRegular(), "addr file is %v", fi.Mode())
	assert.Regexp(t, `^127\.0\.0\.1:\d+$`, addr)
	entries, err := os.ReadDir(shared)
	require.NoError(t, err)
	assert.Len(t, entries, 2, "only addr and the planted symlink") // no temporary file left behind
}

// get-resource: an --out that appears while the broker is being asked (after the early
// check) is still the documented "exists" usage error (exit 2), and is left alone.
func TestWriteSecretExisting(t *testing.T) {
	path := filepath.Join(t.TempDir(), "key")
	require.NoError(t, os.WriteFile(path, []byte("theirs"), 0o600))
	err := writeSecret(path, []byte("secret"))
	require.Error(t, err)
	assert.Equal(t, ExitUsage, exitCode(err), "%v", err)
	got, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "theirs", string(got))
}
