package main

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"testing"

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
