package serve

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Listen creates the listeners cfg asks for: the unix socket cfg.Socket (mode cfg.SocketMode,
// default 0660) and/or the TCP address cfg.Listen (loopback when no host is given). At least
// one is required. On error nothing is left listening.
//
// A path that already exists at cfg.Socket is removed only if it is a socket no server
// answers on (a stale socket from a dead server); a live server's socket, or anything that
// is not a socket, is an ErrListen error.
func Listen(cfg Config) ([]net.Listener, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if cfg.Socket == "" && cfg.Listen == "" {
		return nil, fmt.Errorf("%w: neither a unix socket nor a TCP address to listen on", ErrConfig)
	}
	if strings.HasPrefix(cfg.Socket, "@") {
		// Go would bind it in the abstract namespace, which has no file permissions.
		return nil, fmt.Errorf("%w: socket %q would be an abstract unix socket, which anyone may connect to; give a file path", ErrConfig, cfg.Socket)
	}
	var tcpAddr string
	if cfg.Listen != "" {
		tcpAddr, err = TCPAddr(cfg.Listen)
		if err != nil {
			return nil, err
		}
	}
	var ls []net.Listener
	if cfg.Socket != "" {
		l, err := listenUnix(cfg.Socket, os.FileMode(cfg.SocketMode))
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
	}
	if tcpAddr != "" {
		l, err := net.Listen("tcp", tcpAddr)
		if err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, fmt.Errorf("%w: tcp %s: %w", ErrListen, tcpAddr, err)
		}
		if ap, err := netip.ParseAddrPort(l.Addr().String()); err == nil && !ap.Addr().IsLoopback() {
			cfg.Logger.Warn("listening on a non-loopback address: anyone who can reach it can ask for quotes (measurements stay unix-socket only)",
				"addr", l.Addr().String())
		}
		ls = append(ls, l)
	}
	return ls, nil
}

// TCPAddr normalizes a --listen address: "host:port" is kept, ":port" (no host) becomes
// "127.0.0.1:port". It fails with ErrConfig on anything else.
func TCPAddr(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("%w: listen address %q: %v (want HOST:PORT or :PORT)", ErrConfig, addr, err)
	}
	if port == "" {
		return "", fmt.Errorf("%w: listen address %q has no port", ErrConfig, addr)
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}

func listenUnix(path string, mode os.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("%w: socket directory: %w", ErrListen, err)
	}
	if err := checkSocketDir(filepath.Dir(path)); err != nil {
		return nil, err
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	l, err := bindUnix(path, mode)
	if err != nil {
		return nil, fmt.Errorf("%w: unix socket %s: %w", ErrListen, path, err)
	}
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		return nil, fmt.Errorf("%w: unix socket %s: %w", ErrListen, path, err)
	}
	return l, nil
}

// checkSocketDir refuses a socket directory in which anyone but this user (or root) can
// rename or remove entries: they could swap the socket for a symlink before its chmod (which
// follows it) or for a socket of their own. A sticky directory (like /tmp) owned by this user
// or root protects each entry for its owner.
func checkSocketDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("%w: socket directory: %w", ErrListen, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	trustedOwner := int(st.Uid) == os.Geteuid() || st.Uid == 0
	if !trustedOwner || (fi.Mode().Perm()&0o022 != 0 && fi.Mode()&os.ModeSticky == 0) {
		return fmt.Errorf("%w: socket directory %s (mode %v, owner uid %d) is writable by others; use a directory only this user (uid %d) can write",
			ErrListen, dir, fi.Mode().Perm(), st.Uid, os.Geteuid())
	}
	return nil
}

// bindUnix listens on a new unix socket at path, created with at most mode's permissions. The
// socket is fchmod-ed before bind, because Linux creates the path with the socket's mode less
// the umask: a socket bound with the default 0777 would, under a permissive umask, let anyone
// connect before the caller's chmod and keep that connection (connect is the only check).
func bindUnix(path string, mode os.FileMode) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) { err = syscall.Fchmod(int(fd), uint32(mode.Perm())) }); cerr != nil {
			return cerr
		}
		return err
	}}
	return lc.Listen(context.Background(), "unix", path)
}

// removeStale removes path if it is a socket nobody listens on.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("%w: unix socket %s: %w", ErrListen, path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%w: %s exists and is not a socket; refusing to replace it", ErrListen, path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("%w: %s: another server is listening on it", ErrListen, path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %s: cannot tell whether the socket is stale: %w", ErrListen, path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: removing stale socket %s: %w", ErrListen, path, err)
	}
	return nil
}
