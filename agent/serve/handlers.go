package serve

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
	"github.com/cai-agent/cai-agent/evidence/verify"
)

// Paths served.
const (
	PathEvidence     = "/v1/evidence"
	PathQuote        = "/api/v1/tee/quote"
	PathMeasurements = "/v1/measurements"
)

// QuoteParseReserved is the constant "quote_parse" value of the Open WebUI quote response.
const QuoteParseReserved = "reserved"

// QuoteResponse is the body of GET /api/v1/tee/quote: the fields the Open WebUI TDX patch
// reads (quote as lowercase hex, quote_parse, timestamp, id, status) plus what a verifier needs
// to check the binding (tee, nonce, report_data, cc_eventlog).
type QuoteResponse struct {
	Quote      string `json:"quote"`
	QuoteParse string `json:"quote_parse"`
	// Timestamp is when the quote was produced (RFC 3339, UTC, milliseconds).
	Timestamp string `json:"timestamp"`
	// ID is a random UUID (version 4) naming this response.
	ID     string `json:"id"`
	Status bool   `json:"status"`
	TEE    string `json:"tee"`
	// Nonce is the caller's nonce, or the random one the server chose when none was given.
	Nonce string `json:"nonce"`
	// NonceGenerated is true when the server chose Nonce.
	NonceGenerated bool   `json:"nonce_generated"`
	ReportData     string `json:"report_data"`
	// CCEventLog is the cc_eventlog bound into REPORTDATA (std base64 in JSON), or null.
	CCEventLog []byte `json:"cc_eventlog"`
}

// MeasurementRequest is the body of POST /v1/measurements. All three fields are required
// (content may be the empty string).
type MeasurementRequest struct {
	Domain    *string `json:"domain"`
	Operation *string `json:"operation"`
	Content   *string `json:"content"`
}

// ErrorResponse is the body of every error response.
type ErrorResponse struct {
	Error string `json:"error"`
	// Status is false, for clients of the Open WebUI shape.
	Status bool `json:"status"`
}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc(PathEvidence, s.method(http.MethodGet, s.handleEvidence))
	mux.HandleFunc(PathQuote, s.method(http.MethodGet, s.handleQuote))
	mux.HandleFunc(PathMeasurements, s.method(http.MethodPost, s.handleMeasure))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no such endpoint %q (see %s, %s, %s)", r.URL.Path, PathEvidence, PathQuote, PathMeasurements))
	})
	return s.accessLog(noCache(mux))
}

// method refuses every method but m with 405 and an Allow header.
func (s *Server) method(m string, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != m {
			w.Header().Set("Allow", m)
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("method %s not allowed on %s (use %s)", r.Method, r.URL.Path, m))
			return
		}
		h(w, r)
	}
}

func noCache(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Cache-Control", "no-store, no-cache, must-revalidate, max-age=0")
		hd.Set("Pragma", "no-cache")
		hd.Set("Expires", "0")
		hd.Set("X-Content-Type-Options", "nosniff")
		h.ServeHTTP(w, r)
	})
}

type statusWriter struct {
	http.ResponseWriter
	status int
	n      int64
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(b)
	w.n += int64(n)
	return n, err
}

// accessLog logs method, path (never the query), status, size, duration and peer.
func (s *Server) accessLog(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w}
		h.ServeHTTP(sw, r)
		if sw.status == 0 {
			sw.status = http.StatusOK
		}
		attrs := append([]slog.Attr{slog.String("method", r.Method), slog.String("path", r.URL.Path), slog.Int("status", sw.status),
			slog.Int64("bytes", sw.n), slog.Duration("duration", time.Since(start))}, peerAttrs(r)...)
		s.log.LogAttrs(r.Context(), slog.LevelInfo, "http request", attrs...)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		status = http.StatusInternalServerError
		buf.Reset()
		buf.WriteString(`{"error":"cannot encode the response","status":false}` + "\n")
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, ErrorResponse{Error: msg})
}

// nonceParam returns the "nonce" query parameter: ok=false when absent. A nonce must be
// given once, be non-empty valid UTF-8 and at most MaxNonceLen bytes.
func nonceParam(r *http.Request) (nonce string, present bool, err error) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return "", false, fmt.Errorf("malformed query string: %v", err)
	}
	vs, ok := q["nonce"]
	switch {
	case !ok:
		return "", false, nil
	case len(vs) != 1:
		return "", true, fmt.Errorf("nonce given %d times; give it once", len(vs))
	case vs[0] == "":
		return "", true, errors.New("empty nonce; send a fresh random value (e.g. 32 random bytes as hex)")
	case len(vs[0]) > MaxNonceLen:
		return "", true, fmt.Errorf("nonce is %d bytes; at most %d allowed", len(vs[0]), MaxNonceLen)
	case !utf8.ValidString(vs[0]):
		return "", true, errors.New("nonce is not valid UTF-8")
	}
	return vs[0], true, nil
}

// httpError carries the status an attestation failure maps to.
type httpError struct {
	status     int
	retryAfter int // seconds; 0 = no header
	msg        string
}

func (e *httpError) Error() string { return e.msg }

func (e *httpError) write(w http.ResponseWriter) {
	if e.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(e.retryAfter))
	}
	writeError(w, e.status, e.msg)
}

// attest produces evidence bound to nonce through the queue: it waits for the quote slot
// (bounded, time-limited), attests, checks the result, and returns it with its REPORTDATA.
func (s *Server) attest(ctx context.Context, nonce string) (*evidence.Evidence, [64]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.QuoteTimeout)
	defer cancel()
	if err := s.q.acquire(ctx); err != nil {
		if errors.Is(err, errBusy) {
			return nil, [64]byte{}, &httpError{status: http.StatusServiceUnavailable, retryAfter: 1,
				msg: fmt.Sprintf("busy: %d evidence requests are already queued; retry later", s.cfg.MaxQueue)}
		}
		return nil, [64]byte{}, s.ctxError(ctx, err)
	}
	type result struct {
		ev  *evidence.Evidence
		rd  [64]byte
		err error
	}
	// The attestation runs in its own goroutine holding the slot until the platform returns,
	// even if this request gives up: the next quote never starts while one is in flight.
	done := make(chan result, 1)
	go func() {
		defer s.q.release()
		ev, rd, err := s.attestOnce(ctx, nonce)
		if errors.Is(err, errLogRace) {
			ev, rd, err = s.attestOnce(ctx, nonce)
		}
		done <- result{ev, rd, err}
	}()
	select {
	case r := <-done:
		if r.err != nil {
			if ctx.Err() != nil {
				return nil, r.rd, s.ctxError(ctx, r.err)
			}
			s.log.Error("attestation failed", "err", r.err)
			var he *httpError
			if errors.As(r.err, &he) {
				return nil, r.rd, he
			}
			return nil, r.rd, &httpError{status: http.StatusServiceUnavailable, retryAfter: 1, msg: "attestation failed: " + r.err.Error()}
		}
		return r.ev, r.rd, nil
	case <-ctx.Done():
		return nil, [64]byte{}, s.ctxError(ctx, ctx.Err())
	}
}

func (s *Server) ctxError(ctx context.Context, err error) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return &httpError{status: http.StatusGatewayTimeout,
			msg: fmt.Sprintf("no evidence within %v (quote queue or TEE too slow)", s.cfg.QuoteTimeout)}
	}
	// The client went away; nobody reads this.
	return &httpError{status: 499, msg: "request cancelled: " + err.Error()}
}

// errLogRace: the evidence's cc_eventlog is not the one REPORTDATA was computed from.
var errLogRace = errors.New("the cc_eventlog changed between binding and quote")

// attestOnce attests once and checks that the evidence carries exactly the cc_eventlog bound
// and a quote whose REPORTDATA is that binding.
func (s *Server) attestOnce(ctx context.Context, nonce string) (*evidence.Evidence, [64]byte, error) {
	var bound []byte
	var rd [64]byte
	called := false
	ev, err := s.p.AttestBound(ctx, func(cc []byte) ([64]byte, error) {
		called = true
		bound = bytes.Clone(cc)
		var err error
		rd, err = evidence.NonceReportData(nonce, cc)
		return rd, err
	})
	if err != nil {
		return nil, rd, err
	}
	if !called || ev == nil {
		return nil, rd, errors.New("platform returned evidence without binding the event log")
	}
	if !bytes.Equal(bound, ev.CCEventLog) {
		return nil, rd, errLogRace
	}
	if ev.TEE != s.p.TEE() {
		return nil, rd, fmt.Errorf("platform returned %q evidence, want %q", ev.TEE, s.p.TEE())
	}
	got, err := quoteReportData(ev)
	if err != nil {
		return nil, rd, err
	}
	if got != rd {
		return nil, rd, &httpError{status: http.StatusInternalServerError,
			msg: fmt.Sprintf("the TEE returned a quote with REPORTDATA %x, not this request's binding %x; refusing to serve it", got, rd)}
	}
	return ev, rd, nil
}

// quoteReportData reads REPORTDATA back from the quote.
func quoteReportData(ev *evidence.Evidence) ([64]byte, error) {
	switch ev.TEE {
	case evidence.TEETDX:
		q, err := verify.ParseQuote(ev.Quote)
		if err != nil {
			return [64]byte{}, fmt.Errorf("the TEE returned an unparsable quote: %w", err)
		}
		return [64]byte(q.ReportData), nil
	case evidence.TEESample:
		q, err := evidence.ParseSampleQuote(ev.Quote)
		if err != nil {
			return [64]byte{}, fmt.Errorf("the sample TEE returned an unparsable quote: %w", err)
		}
		return q.ReportDataBytes()
	}
	return [64]byte{}, fmt.Errorf("unknown TEE %q", ev.TEE)
}

// Bundle returns fresh evidence for nonce as GET /v1/evidence serves it, through the same
// queue and checks. nonce must satisfy the endpoint's rules (non-empty, ≤ MaxNonceLen bytes,
// valid UTF-8).
func (s *Server) Bundle(ctx context.Context, nonce string) (*evidence.Bundle, error) {
	if nonce == "" || len(nonce) > MaxNonceLen || !utf8.ValidString(nonce) {
		return nil, fmt.Errorf("serve: invalid nonce (empty, longer than %d bytes, or not UTF-8)", MaxNonceLen)
	}
	ev, rd, err := s.attest(ctx, nonce)
	if err != nil {
		return nil, err
	}
	return bundle(ev, rd)
}

func bundle(ev *evidence.Evidence, rd [64]byte) (*evidence.Bundle, error) {
	b := &evidence.Bundle{TEE: ev.TEE, Quote: ev.Quote, CCEventLog: ev.CCEventLog, ReportData: hex.EncodeToString(rd[:]),
		Measurements: []evidence.Measurement{}}
	if len(ev.CCEventLog) > 0 {
		recs, err := eventlog.Parse(ev.CCEventLog)
		if err != nil {
			return nil, fmt.Errorf("the platform's cc_eventlog does not parse: %w", err)
		}
		b.Measurements, b.Model = eventlog.Measurements(recs)
	}
	return b, nil
}

func (s *Server) handleEvidence(w http.ResponseWriter, r *http.Request) {
	nonce, present, err := nonceParam(r)
	switch {
	case err != nil:
		writeError(w, http.StatusBadRequest, err.Error())
		return
	case !present:
		writeError(w, http.StatusBadRequest, "missing nonce: GET /v1/evidence?nonce=<fresh random string, at most 1024 bytes>")
		return
	}
	ev, rd, err := s.attest(r.Context(), nonce)
	if err != nil {
		writeAttestError(w, err)
		return
	}
	b, err := bundle(ev, rd)
	if err != nil {
		s.log.Error("evidence", "err", err)
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, b)
}

func writeAttestError(w http.ResponseWriter, err error) {
	var he *httpError
	if errors.As(err, &he) {
		he.write(w)
		return
	}
	writeError(w, http.StatusInternalServerError, err.Error())
}

func (s *Server) handleQuote(w http.ResponseWriter, r *http.Request) {
	nonce, present, err := nonceParam(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if !present {
		// No caller nonce: bind a random one, so REPORTDATA is never all-zero and the quote is
		// at least unique; it proves freshness only as far as the timestamp is trusted.
		var b [32]byte
		rand.Read(b[:])
		nonce = hex.EncodeToString(b[:])
	}
	ev, rd, err := s.attest(r.Context(), nonce)
	if err != nil {
		writeAttestError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, QuoteResponse{
		Quote:          hex.EncodeToString(ev.Quote),
		QuoteParse:     QuoteParseReserved,
		Timestamp:      time.Now().UTC().Format("2006-01-02T15:04:05.000Z07:00"),
		ID:             uuid4(),
		Status:         true,
		TEE:            ev.TEE,
		Nonce:          nonce,
		NonceGenerated: !present,
		ReportData:     hex.EncodeToString(rd[:]),
		CCEventLog:     ev.CCEventLog,
	})
}

func uuid4() string {
	var u [16]byte
	rand.Read(u[:])
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func (s *Server) handleMeasure(w http.ResponseWriter, r *http.Request) {
	if !isUnix(r) {
		writeError(w, http.StatusForbidden, "measurements are accepted only on the unix socket")
		return
	}
	ev, status, err := decodeMeasurement(w, r)
	if err != nil {
		writeError(w, status, err.Error())
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.QuoteTimeout)
	defer cancel()
	d, err := s.p.Measure(ctx, ev)
	if err != nil {
		s.log.Error("measurement failed", "domain", ev.Domain, "operation", ev.Operation, "err", err)
		status := http.StatusInternalServerError
		switch {
		case errors.Is(err, evidence.ErrInvalidEvent):
			status = http.StatusBadRequest
		case errors.Is(err, evidence.ErrInconsistent):
			status = http.StatusConflict
		case errors.Is(err, evidence.ErrLogFull):
			status = http.StatusInsufficientStorage
		case errors.Is(ctx.Err(), context.DeadlineExceeded):
			status = http.StatusGatewayTimeout
		}
		msg := err.Error()
		if !errors.Is(err, evidence.ErrMeasure) { // its text already says so
			msg = "measurement failed: " + msg
		}
		writeError(w, status, msg)
		return
	}
	attrs := append([]slog.Attr{slog.String("domain", ev.Domain), slog.String("operation", ev.Operation),
		slog.String("content", truncate(ev.Content, 256)), slog.String("digest", hex.EncodeToString(d))}, peerAttrs(r)...)
	s.log.LogAttrs(r.Context(), slog.LevelInfo, "measured through the API", attrs...)
	writeJSON(w, http.StatusOK, evidence.Measurement{Event: ev, Digest: hex.EncodeToString(d)})
}

// decodeMeasurement reads and validates a MeasurementRequest: JSON only, one object, no
// unknown or missing fields, size limits, no whitespace in domain/operation, no newline in
// content, and not the agent's own domain. JSON content is stored in RFC 8785 canonical form,
// as `cai-agent measure` does.
func decodeMeasurement(w http.ResponseWriter, r *http.Request) (evidence.Event, int, error) {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "application/json" {
		return evidence.Event{}, http.StatusUnsupportedMediaType, errors.New("Content-Type must be application/json")
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxMeasurementBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return evidence.Event{}, http.StatusRequestEntityTooLarge, fmt.Errorf("body larger than %d bytes", MaxMeasurementBody)
		}
		return evidence.Event{}, http.StatusBadRequest, fmt.Errorf("reading body: %v", err)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	var req MeasurementRequest
	if err := dec.Decode(&req); err != nil {
		return evidence.Event{}, http.StatusBadRequest, fmt.Errorf("body is not a measurement object: %v", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return evidence.Event{}, http.StatusBadRequest, errors.New("trailing data after the JSON object")
	}
	for _, f := range []struct {
		name string
		v    *string
		max  int
	}{{"domain", req.Domain, MaxFieldLen}, {"operation", req.Operation, MaxFieldLen}, {"content", req.Content, MaxContentLen}} {
		if f.v == nil {
			return evidence.Event{}, http.StatusBadRequest, fmt.Errorf("missing field %q", f.name)
		}
		if len(*f.v) > f.max {
			return evidence.Event{}, http.StatusBadRequest, fmt.Errorf("%s is %d bytes; at most %d allowed", f.name, len(*f.v), f.max)
		}
	}
	if *req.Domain == evidence.Domain {
		return evidence.Event{}, http.StatusForbidden, fmt.Errorf("domain %q is reserved for cai-agent's own measurements", evidence.Domain)
	}
	content := *req.Content
	if json.Valid([]byte(content)) {
		canon, err := evidence.CanonicalJSON(json.RawMessage(content))
		if err != nil {
			return evidence.Event{}, http.StatusBadRequest, fmt.Errorf("content: %v", err)
		}
		content = string(canon)
		if len(content) > MaxContentLen {
			return evidence.Event{}, http.StatusBadRequest, fmt.Errorf("content is %d bytes in canonical form; at most %d allowed", len(content), MaxContentLen)
		}
	}
	ev := evidence.Event{Domain: *req.Domain, Operation: *req.Operation, Content: content}
	if err := ev.Validate(); err != nil {
		return evidence.Event{}, http.StatusBadRequest, err
	}
	return ev, 0, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
