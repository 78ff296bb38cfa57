package serve

import (
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The socket is never more open than its mode, not even between bind and chmod: under a
// permissive umask (0, as some init systems and containers set) a socket bound 0777 would let
// any local user connect in that window and keep the connection (the permission is checked
// only at connect) to POST measurements into RTMR3.
func TestSocketNeverMoreOpenThanMode(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	sock := filepath.Join(shortDir(t), "agent.sock")
	l, err := bindUnix(sock, 0o660)
	require.NoError(t, err)
	defer l.Close()
	fi, err := os.Lstat(sock)
	require.NoError(t, err)
	assert.Zero(t, fi.Mode().Perm()&^0o660, "socket bound with mode %v before its chmod", fi.Mode().Perm())
}

// A socket directory someone else can write is refused: whoever can rename entries there could
// swap the socket for a symlink between bind and chmod (making the agent, usually root, chmod
// the link's target) or for a socket of their own that answers the agent's clients.
func TestSocketDirWritableByOthers(t *testing.T) {
	for _, tc := range []struct {
		name  string
		mode  os.FileMode
		other bool // owned by another user
		ok    bool
	}{
		{"private", 0o750, false, true},
		{"world writable", 0o777, false, false},
		{"group writable", 0o770, false, false},
		{"sticky shared", 0o777 | os.ModeSticky, false, true},
		{"another user's", 0o755, true, false},
		{"another user's sticky", 0o777 | os.ModeSticky, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.other && os.Geteuid() != 0 {
				t.Skip("chown needs root")
			}
			dir := filepath.Join(shortDir(t), "d")
			require.NoError(t, os.Mkdir(dir, 0o700))
			require.NoError(t, os.Chmod(dir, tc.mode))
			if tc.other {
				require.NoError(t, os.Chown(dir, 65534, 65534))
			}
			sock := filepath.Join(dir, "agent.sock")
			ls, err := Listen(Config{Socket: sock, Logger: quietLogger()})
			if tc.ok {
				require.NoError(t, err)
				require.NoError(t, ls[0].Close())
				return
			}
			require.ErrorIs(t, err, ErrListen)
			assert.Contains(t, err.Error(), "writable by")
			assert.NoFileExists(t, sock)
		})
	}
}

// A socket path starting with "@" is refused: Go binds it in Linux's abstract namespace, where
// file permissions do not exist (any local process could POST measurements), and the stale
// check would probe the abstract name but remove the file of that name in the working
// directory, even a live server's socket.
func TestAbstractSocketRefused(t *testing.T) {
	t.Chdir(shortDir(t))
	live, err := net.Listen("unix", "./@cai-agent-test")
	require.NoError(t, err)
	defer live.Close()
	_, err = Listen(Config{Socket: "@cai-agent-test", Logger: quietLogger()})
	require.ErrorIs(t, err, ErrConfig)
	fi, err := os.Lstat("@cai-agent-test")
	require.NoError(t, err, "the live socket file was removed")
	assert.Equal(t, os.ModeSocket, fi.Mode().Type())
}
