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
	addrFile := filepath.Join(dir, "addr")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var kbsOut, kbsErr lockedBuffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"cai-agent", "--log-level", "debug", "dev-kbs", "--listen", "127.0.0.1:0", "--addr-file", addrFile,
			"--resource", "kbs:///default/model/key=@" + secretFile}, nil, &kbsOut, &kbsErr)
	}()
	var addr string
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(addrFile)
		addr = strings.TrimSpace(string(b))
		return err == nil && addr != ""
	}, 10*time.Second, 10*time.Millisecond)
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

	cancel()
	select {
	case code := <-done:
		require.Equal(t, ExitOK, code, kbsErr.String())
	case <-time.After(10 * time.Second):
		t.Fatal("dev-kbs did not stop")
	}
	require.Contains(t, kbsErr.String(), "DEVELOPMENT ONLY")
	require.Contains(t, kbsErr.String(), "path=/kbs/v0/resource/default/model/key status=200")
	require.NotContains(t, kbsErr.String(), "s3cr3t")
	require.Empty(t, kbsOut.String())
}
