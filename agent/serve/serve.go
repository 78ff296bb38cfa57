// Package serve is `cai-agent serve`: an HTTP server that hands out fresh, nonce-bound TEE
// evidence to relying parties (chat UIs, gateways) and lets local components measure events
// into RTMR3 through the agent, so the agent stays RTMR3's single writer.
//
// Endpoints (see the README for examples):
//
//	GET  /v1/evidence?nonce=N      evidence.Bundle whose REPORTDATA is evidence.NonceReportData(N, cc_eventlog)
//	GET  /api/v1/tee/quote[?nonce=N]  the Open WebUI TDX patch's shape ({"quote":<hex>,…,"status":true})
//	POST /v1/measurements          {"domain","operation","content"} → extend RTMR3 (unix socket only)
//
// Guarantees:
//   - Quotes are generated one at a time (configfs-tsm report entries race). Requests wait in a
//     bounded queue: beyond Config.MaxQueue waiters a request is refused at once with 503 and
//     Retry-After; a request not served within Config.QuoteTimeout gets 504.
//   - Each response carries the binding of its own nonce: the REPORTDATA is computed from the
//     exact cc_eventlog returned beside the quote, under the platform's lock (no measurement can
//     slip in between), and the server re-reads the REPORTDATA from the quote it got and refuses
//     to answer (500) if it is not that binding.
//   - Measurements are accepted only on unix-socket listeners (403 on TCP).
//   - Nothing secret is reachable: the server holds no key and serves only quotes, event logs
//     and measurement digests.
package serve

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cai-agent/cai-agent/evidence"
)

// Sentinel errors (match with errors.Is).
var (
	// ErrConfig: the configuration is invalid (bad address, negative queue bound, no listener).
	ErrConfig = errors.New("invalid serve configuration")
	// ErrListen: a listener could not be created (socket path in use by a live server, not a
	// socket, permission denied, address in use).
	ErrListen = errors.New("cannot listen")
)

// Platform is what the server needs from the evidence runtime; *evidence.Platform implements
// it. AttestBound must compute REPORTDATA with bind from exactly the cc_eventlog it returns in
// the Evidence, and must not let a Measure run between bind and the quote.
type Platform interface {
	evidence.Measurer
	// TEE returns evidence.TEETDX or evidence.TEESample.
	TEE() string
	// AttestBound returns evidence whose REPORTDATA is bind(cc_eventlog).
	AttestBound(ctx context.Context, bind func(ccEventLog []byte) ([64]byte, error)) (*evidence.Evidence, error)
}

var _ Platform = (*evidence.Platform)(nil)

// Defaults and limits.
const (
	// DefaultSocket is the default unix socket path.
	DefaultSocket = "/run/cai-agent/agent.sock"
	// DefaultSocketMode is the unix socket's permission bits: owner and group may connect.
	DefaultSocketMode = 0o660
	// DefaultMaxQueue is the default number of quote requests that may wait while one is
	// being served.
	DefaultMaxQueue = 64
	// MaxMaxQueue bounds Config.MaxQueue: each waiting request holds a connection and a
	// goroutine.
	MaxMaxQueue = 1 << 20
	// DefaultQuoteTimeout bounds the time one evidence request may wait plus be served.
	DefaultQuoteTimeout = 30 * time.Second
	// MaxNonceLen is the longest nonce accepted, in bytes (after URL decoding).
	MaxNonceLen = 1024
	// MaxMeasurementBody is the largest POST /v1/measurements body accepted, in bytes.
	MaxMeasurementBody = 64 << 10
	// MaxContentLen is the longest measurement content accepted, in bytes.
	MaxContentLen = 16 << 10
	// MaxFieldLen is the longest measurement domain or operation accepted, in bytes.
	MaxFieldLen = 256
	// maxHeaderBytes bounds request headers (and so the URL).
	maxHeaderBytes = 16 << 10
)

// Config configures a Server and the listeners Listen creates.
type Config struct {
	// Platform attests and measures; required for New.
	Platform Platform
	// Socket is the unix socket path ("" = no unix socket). Listen creates its parent
	// directory (0750) if missing and removes a stale socket left by a dead server; it never
	// removes anything that is not a socket, nor the socket of a live server. It refuses a
	// directory that anyone but this user or root can write (unless sticky) and an abstract
	// socket ("@name").
	Socket string
	// SocketMode is the socket's permission bits; 0 = DefaultSocketMode (0660). Remember that
	// the parent directory's permissions also gate who can reach it.
	SocketMode uint32
	// Listen is a TCP address ("" = no TCP listener). A missing host ("":8080") means the
	// loopback address 127.0.0.1; any other host is used as given.
	Listen string
	// MaxQueue is how many evidence requests may wait while one is being served; beyond that
	// requests get 503 at once. 0 = DefaultMaxQueue; negative or over MaxMaxQueue is invalid.
	MaxQueue int
	// QuoteTimeout bounds waiting plus serving one evidence request (504 when exceeded), and
	// one measurement. 0 = DefaultQuoteTimeout.
	QuoteTimeout time.Duration
	// Logger receives access logs and errors; nil = slog.Default().
	Logger *slog.Logger
}

func (c Config) withDefaults() (Config, error) {
	if c.MaxQueue < 0 || c.MaxQueue > MaxMaxQueue {
		return c, fmt.Errorf("%w: max queue %d is outside 0..%d", ErrConfig, c.MaxQueue, MaxMaxQueue)
	}
	if c.MaxQueue == 0 {
		c.MaxQueue = DefaultMaxQueue
	}
	if c.QuoteTimeout < 0 {
		return c, fmt.Errorf("%w: quote timeout %v is negative", ErrConfig, c.QuoteTimeout)
	}
	if c.QuoteTimeout == 0 {
		c.QuoteTimeout = DefaultQuoteTimeout
	}
	if c.SocketMode == 0 {
		c.SocketMode = DefaultSocketMode
	}
	if c.SocketMode&^0o777 != 0 {
		return c, fmt.Errorf("%w: socket mode %#o has bits beyond 0777", ErrConfig, c.SocketMode)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c, nil
}

// Server serves evidence and measurements for one Platform. Create it with New.
type Server struct {
	cfg Config
	p   Platform
	log *slog.Logger
	q   *queue
	h   http.Handler
	mu  sync.Mutex
	srv *http.Server
}

// New returns a Server for cfg.Platform. It does not listen: see Listen and Serve.
func New(cfg Config) (*Server, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if cfg.Platform == nil {
		return nil, fmt.Errorf("%w: no platform", ErrConfig)
	}
	s := &Server{cfg: cfg, p: cfg.Platform, log: cfg.Logger, q: newQueue(cfg.MaxQueue)}
	s.h = s.routes()
	return s, nil
}

// Handler returns the server's HTTP handler. Requests whose context does not carry a
// connection marked by Serve are treated as TCP (so POST /v1/measurements is refused).
func (s *Server) Handler() http.Handler { return s.h }

// Serve serves HTTP on the listeners until ctx is cancelled, then shuts down gracefully:
// it stops accepting, lets in-flight requests finish (at most QuoteTimeout plus 5 s) and
// closes the listeners (a unix socket created by Listen is removed). It returns nil after a
// shutdown caused by ctx, or the first listener error. Serve may be called once.
func (s *Server) Serve(ctx context.Context, listeners ...net.Listener) error {
	if len(listeners) == 0 {
		return fmt.Errorf("%w: no listener", ErrConfig)
	}
	srv := &http.Server{
		Handler:           s.h,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      s.cfg.QuoteTimeout + 30*time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if c.LocalAddr().Network() != "unix" {
				return ctx
			}
			ctx = context.WithValue(ctx, unixConnKey{}, true)
			if uc, ok := c.(*net.UnixConn); ok {
				if cred, err := peerCred(uc); err == nil {
					ctx = context.WithValue(ctx, peerCredKey{}, cred)
				}
			}
			return ctx
		},
	}
	s.mu.Lock()
	if s.srv != nil {
		s.mu.Unlock()
		return errors.New("serve: Serve called twice")
	}
	s.srv = srv
	s.mu.Unlock()

	errc := make(chan error, len(listeners))
	for _, l := range listeners {
		s.log.Info("serving evidence", "network", l.Addr().Network(), "addr", l.Addr().String(), "tee", s.p.TEE(),
			"max_queue", s.cfg.MaxQueue, "quote_timeout", s.cfg.QuoteTimeout)
		go func(l net.Listener) {
			err := srv.Serve(l)
			if errors.Is(err, http.ErrServerClosed) {
				err = nil
			}
			errc <- err
		}(l)
	}
	var first error
	select {
	case <-ctx.Done():
	case first = <-errc:
		if first != nil {
			first = fmt.Errorf("serve: %w", first)
		}
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.QuoteTimeout+5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		s.log.Warn("graceful shutdown incomplete; closing connections", "err", err)
		srv.Close()
	}
	// Listeners the http.Server never tracked (a Serve goroutine not yet started) are closed
	// here; closing twice is harmless.
	for _, l := range listeners {
		l.Close()
	}
	s.log.Info("server stopped")
	return first
}

// ListenAndServe is Listen followed by New and Serve: the entry point of `cai-agent serve`
// and `cai-agent fetch-and-decrypt --serve`.
func ListenAndServe(ctx context.Context, cfg Config) error {
	s, err := New(cfg)
	if err != nil {
		return err
	}
	ls, err := Listen(cfg)
	if err != nil {
		return err
	}
	return s.Serve(ctx, ls...)
}

type (
	unixConnKey struct{}
	peerCredKey struct{}
)

// peerCred returns the credentials of the process at the other end of a unix connection.
func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

// peerAttrs returns log attributes naming the peer: its address on TCP; "unix" with the
// peer's pid, uid and gid on the unix socket.
func peerAttrs(r *http.Request) []slog.Attr {
	if !isUnix(r) {
		return []slog.Attr{slog.String("peer", r.RemoteAddr)}
	}
	attrs := []slog.Attr{slog.String("peer", "unix")}
	if cred, ok := r.Context().Value(peerCredKey{}).(*unix.Ucred); ok {
		attrs = append(attrs, slog.Int("peer_pid", int(cred.Pid)), slog.Int("peer_uid", int(cred.Uid)), slog.Int("peer_gid", int(cred.Gid)))
	}
	return attrs
}

func isUnix(r *http.Request) bool {
	v, _ := r.Context().Value(unixConnKey{}).(bool)
	return v
}
