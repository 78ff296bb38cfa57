package kbstest

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"

	"github.com/cai-agent/cai-agent/evidence"
)

// SampleAttester is a fake evidence.Attester for the sample TEE: its quote is the sample
// evidence document {"svn":"1","report_data":…} in cai-agent's SampleQuote form (the 48-byte
// digest when the last 16 bytes of REPORTDATA are zero, as CoCo's sample attester encodes a
// SHA-384 binding).
type SampleAttester struct {
	// Err, if set, is returned by Attest.
	Err error
}

// TEE implements evidence.Attester.
func (SampleAttester) TEE() string { return evidence.TEESample }

// Attest implements evidence.Attester.
func (a SampleAttester) Attest(ctx context.Context, rd [64]byte) (*evidence.Evidence, error) {
	if a.Err != nil {
		return nil, a.Err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	b := rd[:]
	if [16]byte(rd[48:]) == [16]byte{} {
		b = rd[:48]
	}
	zero := "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
	q, err := json.Marshal(evidence.SampleQuote{SVN: "1", ReportData: base64.StdEncoding.EncodeToString(b),
		RTMR: [4]string{zero, zero, zero, zero}, Unsigned: true, Warning: evidence.SampleWarning})
	if err != nil {
		return nil, err
	}
	return &evidence.Evidence{TEE: evidence.TEESample, Quote: q}, nil
}

// TDXAttester is a fake evidence.Attester for TDX: it returns Quote (typically a REAL fixture
// quote, v4 or v5) with its REPORTDATA field replaced — a fake whose signature no longer
// verifies but whose REPORTDATA binds what was asked — and CCEventLog unchanged.
type TDXAttester struct {
	Quote      []byte
	CCEventLog []byte
}

// TEE implements evidence.Attester.
func (TDXAttester) TEE() string { return evidence.TEETDX }

// Attest implements evidence.Attester.
func (a TDXAttester) Attest(ctx context.Context, rd [64]byte) (*evidence.Evidence, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	q := append([]byte{}, a.Quote...)
	off := 48 + 520
	if len(q) > 0 && q[0] == 5 {
		off = 54 + 520
	}
	if len(q) < off+64 {
		return nil, errors.New("kbstest: fixture quote too short")
	}
	copy(q[off:], rd[:])
	return &evidence.Evidence{TEE: evidence.TEETDX, Quote: q, CCEventLog: a.CCEventLog}, nil
}
