package evidence

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A symlink planted in the state directory (a directory others can write, such as a
// Kubernetes emptyDir, which is 0777) must never make the agent — running as root — write,
// truncate or create the file it points to. The measurement must also fail before RTMR3 is
// extended, so RTMR3 and the log still agree.
func TestStateDirSymlinksNotFollowed(t *testing.T) {
	victimDir := t.TempDir()
	victimContent := []byte("root:x:0:0:root:/root:/bin/bash\n")

	t.Run("event log", func(t *testing.T) {
		e := newEnv(t)
		p := e.open(t, TEETDX)
		victim := filepath.Join(victimDir, "passwd")
		require.NoError(t, os.WriteFile(victim, victimContent, 0o644))
		require.NoError(t, os.Symlink(victim, filepath.Join(e.state, EventLogFile)))
		before := e.k.RTMR(3)

		_, err := p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "x"})
		require.Error(t, err)
		got, err := os.ReadFile(victim)
		require.NoError(t, err)
		assert.Equal(t, victimContent, got, "the symlink target must not be written")
		assert.Equal(t, before, e.k.RTMR(3), "RTMR3 must not be extended when the log cannot be written")
		_, err = os.Stat(filepath.Join(e.state, WALFile))
		assert.True(t, os.IsNotExist(err), "no write-ahead record left behind")
	})

	t.Run("truncation by a planted write-ahead record", func(t *testing.T) {
		e := newEnv(t)
		crashAfterWAL(t, e)
		// The pending record says "cut the log back to offset 0"; the log is now a symlink.
		victim := filepath.Join(victimDir, "shadow")
		require.NoError(t, os.WriteFile(victim, victimContent, 0o644))
		logPath := filepath.Join(e.state, EventLogFile)
		os.Remove(logPath)
		require.NoError(t, os.Symlink(victim, logPath))

		_, err := Open(context.Background(), e.opts(TEETDX))
		require.Error(t, err)
		got, err := os.ReadFile(victim)
		require.NoError(t, err)
		assert.Equal(t, victimContent, got, "the symlink target must not be truncated")
	})

	t.Run("lock file", func(t *testing.T) {
		e := newEnv(t)
		require.NoError(t, os.MkdirAll(e.state, 0o755))
		target := filepath.Join(victimDir, "created-by-root")
		require.NoError(t, os.Symlink(target, filepath.Join(e.state, LockFile)))
		_, err := Open(context.Background(), e.opts(TEETDX))
		require.Error(t, err)
		_, err = os.Lstat(target)
		assert.True(t, os.IsNotExist(err), "no file may be created through the symlink")
	})
}

// An own log that starts with a Spec ID header redefining the SHA-384 digest size (a forged
// or corrupted state file) is reported, not a panic of Open.
func TestOpenForgedLogHeaderNoPanic(t *testing.T) {
	e := newEnv(t)
	e.open(t, TEETDX).Close()
	e.k.SetRTMR(3, [48]byte{1}) // non-zero: the log is checked for replay, not retired
	// Spec ID header: one algorithm, SHA-384 with a 32-byte digest.
	data := append([]byte("Spec ID Event03\x00"), 0, 0, 0, 0, 0, 2, 0, 2, 1, 0, 0, 0, 0x0c, 0, 32, 0, 0)
	hdr := append([]byte{0, 0, 0, 0, 3, 0, 0, 0}, make([]byte, 20)...)
	hdr = append(hdr, byte(len(data)), 0, 0, 0)
	hdr = append(hdr, data...)
	rec := []byte{4, 0, 0, 0, 6, 0, 0, 0, 1, 0, 0, 0, 0x0c, 0}
	rec = append(rec, make([]byte, 32)...)
	rec = append(rec, 0, 0, 0, 0)
	require.NoError(t, os.WriteFile(filepath.Join(e.state, EventLogFile), append(hdr, rec...), 0o600))
	assert.NotPanics(t, func() {
		p, err := Open(context.Background(), e.opts(TEETDX))
		if err == nil {
			p.Close()
		}
	})
}
