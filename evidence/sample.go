package evidence

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"

	"github.com/cai-agent/cai-agent/evidence/rtmr"
)

// SampleWarning is embedded in every sample quote and sample state file.
const SampleWarning = "SAMPLE TEE: unsigned, simulated evidence for development; it proves nothing"

// SampleQuote is the quote of the sample TEE, a JSON document compatible with Confidential
// Containers' sample attester ({"svn":"1","report_data":"<std base64>"}, REPORTDATA's first
// 48 bytes when its last 16 are zero, else all 64 — see sampleReportData) plus
// fields cai-agent adds: the simulated RTMR0..3 (lowercase hex), "unsigned": true and a
// warning. Nothing in it is signed or hardware-backed: anyone can write one. TEE() is "sample"
// and verifiers refuse it unless explicitly told to accept sample evidence.
type SampleQuote struct {
	SVN        string    `json:"svn"`
	ReportData string    `json:"report_data"`
	RTMR       [4]string `json:"rtmrs"`
	Unsigned   bool      `json:"unsigned"`
	Warning    string    `json:"warning"`
}

// ParseSampleQuote parses and checks a sample quote: known fields only, svn "1",
// report_data 48 or 64 bytes of std base64, four 48-byte hex RTMRs and "unsigned": true.
func ParseSampleQuote(b []byte) (*SampleQuote, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var q SampleQuote
	if err := dec.Decode(&q); err != nil {
		return nil, fmt.Errorf("not a sample quote: %w", err)
	}
	if dec.More() {
		return nil, errors.New("not a sample quote: trailing data")
	}
	if q.SVN != "1" || !q.Unsigned {
		return nil, errors.New("not a sample quote: want svn \"1\" and \"unsigned\": true")
	}
	if _, err := q.ReportDataBytes(); err != nil {
		return nil, err
	}
	if _, err := q.RTMRs(); err != nil {
		return nil, err
	}
	return &q, nil
}

// sampleReportData is what report_data encodes: REPORTDATA, or only its first 48 bytes when
// the last 16 are zero (a SHA-384 binding). CoCo's sample attester encodes the runtime-data
// digest unpadded and Trustee's sample verifier compares it byte for byte, so a KBS binding
// (SHA-384 ‖ 16 zero bytes) must appear as its 48 digest bytes.
func sampleReportData(rd [64]byte) []byte {
	if [16]byte(rd[48:]) == [16]byte{} {
		return append([]byte{}, rd[:48]...)
	}
	return append([]byte{}, rd[:]...)
}

// ReportDataBytes decodes report_data (48 or 64 bytes) into the 64-byte REPORTDATA,
// zero-padding a 48-byte value.
func (q *SampleQuote) ReportDataBytes() ([64]byte, error) {
	var rd [64]byte
	b, err := base64.StdEncoding.DecodeString(q.ReportData)
	if err != nil || (len(b) != 64 && len(b) != 48) {
		return rd, errors.New("sample quote: report_data is not 48 or 64 bytes of std base64")
	}
	copy(rd[:], b)
	return rd, nil
}

// RTMRs decodes the simulated RTMRs.
func (q *SampleQuote) RTMRs() ([4][48]byte, error) {
	var out [4][48]byte
	for i, h := range q.RTMR {
		b, err := hex.DecodeString(h)
		if err != nil || len(b) != 48 {
			return out, fmt.Errorf("sample quote: rtmrs[%d] is not 48 bytes of hex", i)
		}
		copy(out[i][:], b)
	}
	return out, nil
}

// sampleTEE simulates a TEE: its RTMRs live in a JSON state file in the state directory,
// rewritten atomically on every extension; its quotes are unsigned SampleQuote documents.
type sampleTEE struct {
	path string
}

type sampleState struct {
	Warning string    `json:"warning"`
	RTMR    [4]string `json:"rtmrs"`
}

func (s *sampleTEE) load() ([4][48]byte, error) {
	var out [4][48]byte
	b, err := readStateFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return out, fmt.Errorf("%w: sample TEE state: %w", rtmr.ErrRead, err)
	}
	var st sampleState
	if err := json.Unmarshal(b, &st); err != nil {
		return out, fmt.Errorf("%w: sample TEE state %s: %w", rtmr.ErrRead, s.path, err)
	}
	for i, h := range st.RTMR {
		v, err := hex.DecodeString(h)
		if err != nil || len(v) != 48 {
			return out, fmt.Errorf("%w: sample TEE state %s: rtmrs[%d] is not 48 bytes of hex", rtmr.ErrRead, s.path, i)
		}
		copy(out[i][:], v)
	}
	return out, nil
}

// Interface implements rtmr.Registers.
func (s *sampleTEE) Interface() string { return "sample TEE state " + s.path }

// Read implements rtmr.Registers.
func (s *sampleTEE) Read(i int) ([48]byte, error) {
	if i < 0 || i > 3 {
		return [48]byte{}, fmt.Errorf("%w: no RTMR%d", rtmr.ErrRead, i)
	}
	v, err := s.load()
	return v[i], err
}

// Extend implements rtmr.Registers.
func (s *sampleTEE) Extend(i int, d [48]byte) error {
	if i < 0 || i > 3 {
		return fmt.Errorf("%w: no RTMR%d", rtmr.ErrExtend, i)
	}
	v, err := s.load()
	if err != nil {
		return fmt.Errorf("%w: %w", rtmr.ErrExtend, err)
	}
	v[i] = rtmr.ExtendValue(v[i], d)
	st := sampleState{Warning: SampleWarning}
	for j := range v {
		st.RTMR[j] = hex.EncodeToString(v[j][:])
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFileAtomic(s.path, append(b, '\n')); err != nil {
		return fmt.Errorf("%w: sample TEE state: %w", rtmr.ErrExtend, err)
	}
	return nil
}

func (s *sampleTEE) quote(ctx context.Context, rd [64]byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	v, err := s.load()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrQuote, err)
	}
	q := SampleQuote{SVN: "1", ReportData: base64.StdEncoding.EncodeToString(sampleReportData(rd)), Unsigned: true, Warning: SampleWarning}
	for i := range v {
		q.RTMR[i] = hex.EncodeToString(v[i][:])
	}
	return json.Marshal(q)
}

func (s *sampleTEE) rtmrs(context.Context) ([4][48]byte, error) { return s.load() }
