// Package tcg reads and writes the byte layouts of TCG2 crypto-agile event logs as TDX uses
// them (the CCEL of TCG PC Client PFP §10 and UEFI §38, plus attestation-agent AAEL records).
// It is internal: evidence/eventlog is the public reader, the evidence package the writer.
package tcg

import (
	"bytes"
	"crypto/sha512"
	"encoding/binary"
	"errors"
	"fmt"
)

// Event types (TCG PC Client PFP, table 9).
const (
	EvNoAction = 0x00000003
	EvEventTag = 0x00000006
)

// TPM_ALG_ID values of the digests a TDX log carries.
const (
	AlgSHA1   = 0x0004
	AlgSHA256 = 0x000B
	AlgSHA384 = 0x000C
	AlgSHA512 = 0x000D
	AlgSM3    = 0x0012
)

// AAELTag is the TCG_PCClientTaggedEvent eventID of an attestation-agent event log entry:
// the bytes "LEAA" read as u32le.
const AAELTag = 0x4141454C

// MRIndexRTMR3 is the CC measurement register index of RTMR3 (CC-MR i = RTMR i-1).
const MRIndexRTMR3 = 4

// specIDSignature opens the TCG_EfiSpecIDEvent of a crypto-agile log.
var specIDSignature = []byte("Spec ID Event03\x00")

// ErrMalformed is returned (wrapped, with the offset) for any log that is not a well-formed
// TCG2 crypto-agile log.
var ErrMalformed = errors.New("malformed TCG2 event log")

// Limits that bound parsing of hostile input.
const (
	maxDigestsPerRecord = 8
	maxAlgorithms       = 16
	// MaxRecords bounds the records of one log: real firmware logs hold tens to hundreds,
	// and a log of tiny records must not cost a verifier gigabytes of memory.
	MaxRecords = 1 << 16
)

// defaultDigestSizes is used when a log carries no Spec ID header (the agent's own records).
var defaultDigestSizes = map[uint16]int{AlgSHA1: 20, AlgSHA256: 32, AlgSHA384: 48, AlgSHA512: 64, AlgSM3: 32}

// TaggedEvent returns the AAEL TCG_PCClientTaggedEvent: u32le AAELTag ‖ u32le len ‖ text.
func TaggedEvent(text string) []byte {
	b := make([]byte, 8+len(text))
	binary.LittleEndian.PutUint32(b[0:], AAELTag)
	binary.LittleEndian.PutUint32(b[4:], uint32(len(text)))
	copy(b[8:], text)
	return b
}

// AAELDigest is SHA-384 over the tagged event of text.
func AAELDigest(text string) [48]byte { return sha512.Sum384(TaggedEvent(text)) }

// AAELRecord returns one TCG_PCR_EVENT2 record (MR index 4, EV_EVENT_TAG, one SHA-384 digest)
// for text, and the digest it carries.
func AAELRecord(text string) ([]byte, [48]byte) {
	ev := TaggedEvent(text)
	d := sha512.Sum384(ev)
	b := make([]byte, 0, 4+4+4+2+48+4+len(ev))
	b = binary.LittleEndian.AppendUint32(b, MRIndexRTMR3)
	b = binary.LittleEndian.AppendUint32(b, EvEventTag)
	b = binary.LittleEndian.AppendUint32(b, 1)
	b = binary.LittleEndian.AppendUint16(b, AlgSHA384)
	b = append(b, d[:]...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(ev)))
	b = append(b, ev...)
	return b, d
}

// SpecIDHeader returns a minimal, valid crypto-agile log header: a TCG_PCClientPCREvent of
// type EV_NO_ACTION whose data is a TCG_EfiSpecIDEvent ("Spec ID Event03", spec 2.0 errata 0,
// UINTN size 2, one algorithm SHA-384/48, no vendor info) — the same shape TDVF writes at the
// start of the CCEL. cai-agent puts it in front of its records when there is no firmware CCEL,
// because Trustee (and every TCG2 parser) reads the first event as this header.
func SpecIDHeader() []byte {
	data := make([]byte, 0, 33)
	data = append(data, specIDSignature...)
	data = binary.LittleEndian.AppendUint32(data, 0) // platformClass
	data = append(data, 0, 2, 0, 2)                  // specVersionMinor, Major, errata, uintnSize
	data = binary.LittleEndian.AppendUint32(data, 1) // numberOfAlgorithms
	data = binary.LittleEndian.AppendUint16(data, AlgSHA384)
	data = binary.LittleEndian.AppendUint16(data, 48)
	data = append(data, 0) // vendorInfoSize
	b := make([]byte, 0, 32+len(data))
	b = binary.LittleEndian.AppendUint32(b, 0) // PCRIndex
	b = binary.LittleEndian.AppendUint32(b, EvNoAction)
	b = append(b, make([]byte, 20)...) // SHA-1 digest, zero
	b = binary.LittleEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// EndMarker terminates a cc_eventlog, as attestation-agent writes it.
var EndMarker = bytes.Repeat([]byte{0xFF}, 8)

// Digest is one digest of a record.
type Digest struct {
	Alg uint16
	Sum []byte
}

// RawRecord is one TCG_PCR_EVENT2 record as it appears in the log.
type RawRecord struct {
	Offset  int // where the record starts in the log
	MRIndex uint32
	Type    uint32
	Digests []Digest
	Data    []byte // aliases the input
}

// Log is the result of Walk.
type Log struct {
	// HeaderEnd is the offset after the Spec ID header (0 when the log has none).
	HeaderEnd int
	// End is the offset of the end marker (8 bytes all 0xFF or all 0x00), or len(b) when the
	// log runs to the end of its buffer. b[:End] is the trimmed log.
	End     int
	Records []RawRecord
}

// Walk parses b as a crypto-agile log: an optional Spec ID header (a first event of type
// EV_NO_ACTION in the SHA-1 TCG_PCClientPCREvent format; its algorithm table defines the
// digest sizes), then TCG_PCR_EVENT2 records, until the end of b or an 8-byte end marker of
// all 0xFF or all 0x00 bytes. Everything after the marker must be 0xFF/0x00 padding. Without a
// header the standard digest sizes are used. Every length is bounds-checked.
func Walk(b []byte) (*Log, error) {
	l := &Log{}
	sizes := defaultDigestSizes
	off := 0
	if isHeader(b) {
		dataLen := int(binary.LittleEndian.Uint32(b[28:32]))
		if dataLen > len(b)-32 {
			return nil, fmt.Errorf("%w: Spec ID header at offset 0: event size %d exceeds the log", ErrMalformed, dataLen)
		}
		s, err := parseSpecID(b[32 : 32+dataLen])
		if err != nil {
			return nil, fmt.Errorf("%w: Spec ID header at offset 0: %v", ErrMalformed, err)
		}
		sizes = s
		off = 32 + dataLen
		l.HeaderEnd = off
	}
	for {
		if off == len(b) {
			l.End = off
			return l, nil
		}
		if rest := b[off:]; len(rest) < 8 || isMarker(rest[:8]) {
			if !isPadding(rest) {
				if len(rest) < 8 {
					return nil, fmt.Errorf("%w: truncated record at offset %d", ErrMalformed, off)
				}
				return nil, fmt.Errorf("%w: data after the end marker at offset %d", ErrMalformed, off)
			}
			l.End = off
			return l, nil
		}
		if len(l.Records) == MaxRecords {
			return nil, fmt.Errorf("%w: more than %d records", ErrMalformed, MaxRecords)
		}
		r, n, err := parseRecord(b, off, sizes)
		if err != nil {
			return nil, err
		}
		l.Records = append(l.Records, r)
		off += n
	}
}

func isHeader(b []byte) bool {
	if len(b) < 32 || binary.LittleEndian.Uint32(b[4:8]) != EvNoAction {
		return false
	}
	for _, c := range b[8:28] {
		if c != 0 {
			return false
		}
	}
	return true
}

// parseSpecID reads the algorithm table of a TCG_EfiSpecIDEvent. The signature is not
// required: attestation-agent's header carries an all-zero one.
func parseSpecID(d []byte) (map[uint16]int, error) {
	if len(d) < 28 {
		return nil, fmt.Errorf("TCG_EfiSpecIDEvent is %d bytes, want at least 28", len(d))
	}
	n := binary.LittleEndian.Uint32(d[24:28])
	if n == 0 || n > maxAlgorithms {
		return nil, fmt.Errorf("numberOfAlgorithms %d out of range 1..%d", n, maxAlgorithms)
	}
	p := 28
	if len(d) < p+int(n)*4+1 {
		return nil, fmt.Errorf("algorithm table truncated")
	}
	sizes := make(map[uint16]int, n)
	for i := 0; i < int(n); i++ {
		alg := binary.LittleEndian.Uint16(d[p:])
		sz := int(binary.LittleEndian.Uint16(d[p+2:]))
		if sz == 0 || sz > 64 {
			return nil, fmt.Errorf("algorithm %#04x digest size %d out of range", alg, sz)
		}
		sizes[alg] = sz
		p += 4
	}
	vendor := int(d[p])
	if p+1+vendor != len(d) {
		return nil, fmt.Errorf("event size %d does not match its contents (%d)", len(d), p+1+vendor)
	}
	return sizes, nil
}

func parseRecord(b []byte, off int, sizes map[uint16]int) (RawRecord, int, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: record at offset %d: %s", ErrMalformed, off, fmt.Sprintf(format, args...))
	}
	p := off
	need := func(n int) bool { return n >= 0 && len(b)-p >= n }
	if !need(12) {
		return RawRecord{}, 0, bad("truncated header")
	}
	r := RawRecord{Offset: off, MRIndex: binary.LittleEndian.Uint32(b[p:]), Type: binary.LittleEndian.Uint32(b[p+4:])}
	count := binary.LittleEndian.Uint32(b[p+8:])
	p += 12
	if count > maxDigestsPerRecord {
		return RawRecord{}, 0, bad("%d digests (at most %d)", count, maxDigestsPerRecord)
	}
	for i := 0; i < int(count); i++ {
		if !need(2) {
			return RawRecord{}, 0, bad("truncated digest %d", i)
		}
		alg := binary.LittleEndian.Uint16(b[p:])
		sz, ok := sizes[alg]
		if !ok {
			return RawRecord{}, 0, bad("digest algorithm %#04x not declared by the log", alg)
		}
		p += 2
		if !need(sz) {
			return RawRecord{}, 0, bad("truncated digest %d", i)
		}
		r.Digests = append(r.Digests, Digest{Alg: alg, Sum: b[p : p+sz]})
		p += sz
	}
	if !need(4) {
		return RawRecord{}, 0, bad("truncated event size")
	}
	size := int64(binary.LittleEndian.Uint32(b[p:]))
	p += 4
	if size > int64(len(b)-p) {
		return RawRecord{}, 0, bad("event size %d exceeds the log", size)
	}
	r.Data = b[p : p+int(size)]
	p += int(size)
	return r, p - off, nil
}

func isMarker(b []byte) bool {
	return bytes.Equal(b, EndMarker) || bytes.Equal(b, make([]byte, 8))
}

func isPadding(b []byte) bool {
	for _, c := range b {
		if c != 0xFF && c != 0x00 {
			return false
		}
	}
	return true
}

// Trim returns b up to its end marker (the whole of b if it has none), after checking that
// b is a well-formed log.
func Trim(b []byte) ([]byte, error) {
	l, err := Walk(b)
	if err != nil {
		return nil, err
	}
	return b[:l.End], nil
}
