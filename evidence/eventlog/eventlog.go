// Package eventlog reads TDX event logs — the firmware CCEL, cai-agent's own RTMR3 records,
// and the cc_eventlog that joins them — and replays them into RTMR values.
//
// The format is the TCG2 crypto-agile log (TCG PC Client PFP §10) with CC measurement register
// indexes (UEFI §38): MR index 1..4 is RTMR0..3. Runtime measurements are attestation-agent
// (AAEL) events, wire-compatible with Confidential Containers: type EV_EVENT_TAG, MR index 4,
// a TCG_PCClientTaggedEvent u32le 0x4141454C ‖ u32le len ‖ "domain operation content", and one
// SHA-384 digest over that tagged event. Replay folds digests exactly as Trustee does.
package eventlog

import (
	"bytes"
	"crypto/sha512"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/internal/tcg"
)

// Event types and algorithm IDs callers commonly need.
const (
	EvNoAction = tcg.EvNoAction
	EvEventTag = tcg.EvEventTag
	AlgSHA384  = tcg.AlgSHA384
	// MRIndexRTMR3 is the CC-MR index of RTMR3.
	MRIndexRTMR3 = tcg.MRIndexRTMR3
	// MaxRecords is the most records a log may hold (firmware and agent records together);
	// a longer one is ErrMalformed.
	MaxRecords = tcg.MaxRecords
)

var (
	// ErrMalformed: the bytes are not a well-formed TCG2 crypto-agile log.
	ErrMalformed = tcg.ErrMalformed
	// ErrDigestMismatch: an AAEL event's SHA-384 digest is not the hash of its tagged event,
	// i.e. the text shown for the event is not what was measured.
	ErrDigestMismatch = errors.New("event digest does not match the event")
	// ErrNoDigest: a record for RTMR0..3 carries no SHA-384 digest, so it cannot be replayed.
	ErrNoDigest = errors.New("record has no SHA-384 digest")
)

// Record is one measured event of a log (the Spec ID header is not a Record).
type Record struct {
	// MRIndex is the CC measurement register index: 0 MRTD, 1..4 RTMR0..3.
	MRIndex uint32
	// Type is the TCG event type, e.g. EV_EVENT_TAG (6).
	Type uint32
	// Digests maps a TPM_ALG_ID (0x000C = SHA-384) to the digest extended.
	Digests map[uint16][]byte
	// Data is the event data.
	Data []byte
	// AAEL is the decoded attestation-agent event for EV_EVENT_TAG records tagged 0x4141454C
	// whose text has the form "domain operation content"; nil otherwise. When non-nil, Parse
	// has checked that the SHA-384 digest is the hash of the tagged event.
	AAEL *evidence.Event
}

// SHA384 returns the record's SHA-384 digest, or nil.
func (r Record) SHA384() []byte { return r.Digests[tcg.AlgSHA384] }

// Parse parses a TCG2 crypto-agile log: a CCEL, the agent's own records, or both joined.
// It accepts an optional Spec ID EV_NO_ACTION header (whose algorithm table sets the digest
// sizes; without it the standard sizes apply) and stops at an 8-byte all-0xFF or all-0x00 end
// marker, after which only 0xFF/0x00 padding may follow. Parsing is bounded by len(b); every
// length field is checked. AAEL records whose digest does not match their text are rejected
// with ErrDigestMismatch.
func Parse(b []byte) ([]Record, error) {
	l, err := tcg.Walk(b)
	if err != nil {
		return nil, err
	}
	recs := make([]Record, 0, len(l.Records))
	for _, raw := range l.Records {
		r := Record{MRIndex: raw.MRIndex, Type: raw.Type, Data: raw.Data, Digests: make(map[uint16][]byte, len(raw.Digests))}
		for _, d := range raw.Digests {
			if _, dup := r.Digests[d.Alg]; dup {
				return nil, fmt.Errorf("%w: record at offset %d: two digests of algorithm %#04x", ErrMalformed, raw.Offset, d.Alg)
			}
			r.Digests[d.Alg] = d.Sum
		}
		if raw.Type == tcg.EvEventTag && len(raw.Data) >= 8 && binary.LittleEndian.Uint32(raw.Data) == tcg.AAELTag {
			ev, err := decodeAAEL(raw.Data)
			if err != nil {
				return nil, fmt.Errorf("%w: AAEL record at offset %d: %v", ErrMalformed, raw.Offset, err)
			}
			if d := r.Digests[tcg.AlgSHA384]; d != nil {
				want := sha512.Sum384(raw.Data)
				if !bytes.Equal(d, want[:]) {
					return nil, fmt.Errorf("%w: AAEL record at offset %d (%q)", ErrDigestMismatch, raw.Offset, ev.Domain+" "+ev.Operation)
				}
			}
			r.AAEL = ev
		}
		recs = append(recs, r)
	}
	return recs, nil
}

func decodeAAEL(data []byte) (*evidence.Event, error) {
	n := binary.LittleEndian.Uint32(data[4:8])
	if uint64(n) != uint64(len(data)-8) {
		return nil, fmt.Errorf("tagged event length %d does not match its %d data bytes", n, len(data)-8)
	}
	text := string(data[8:])
	domain, rest, ok1 := strings.Cut(text, " ")
	op, content, ok2 := strings.Cut(rest, " ")
	if !ok1 || !ok2 || domain == "" || op == "" {
		return nil, fmt.Errorf("text %q is not \"domain operation content\"", truncate(text, 80))
	}
	return &evidence.Event{Domain: domain, Operation: op, Content: content}, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// Replay folds the SHA-384 digests of recs into RTMR0..3, as the TDX module extends them and
// as Trustee replays a cc_eventlog: for CC-MR i = 1..4, start from 48 zero bytes and set
// acc = SHA-384(acc ‖ digest) for every record with MRIndex i, in order. EV_NO_ACTION records
// are informational and never extended (TCG PFP), so they are skipped; MR index 0 (MRTD) is
// not replayable and skipped. A record for an MR index above 4, or one for RTMR0..3 without a
// SHA-384 digest, is an error.
func Replay(recs []Record) ([4][48]byte, error) {
	var mr [4][48]byte
	for i, r := range recs {
		if r.Type == tcg.EvNoAction || r.MRIndex == 0 {
			continue
		}
		if r.MRIndex > 4 {
			return [4][48]byte{}, fmt.Errorf("%w: event %d has MR index %d (only 0..4 exist on TDX)", ErrMalformed, i, r.MRIndex)
		}
		d := r.SHA384()
		if len(d) != 48 {
			return [4][48]byte{}, fmt.Errorf("%w: event %d (MR index %d)", ErrNoDigest, i, r.MRIndex)
		}
		h := sha512.New384()
		h.Write(mr[r.MRIndex-1][:])
		h.Write(d)
		h.Sum(mr[r.MRIndex-1][:0])
	}
	return mr, nil
}

// EncodeAAEL returns one TCG_PCR_EVENT2 record for ev: MR index 4 (RTMR3), type EV_EVENT_TAG,
// one SHA-384 digest (evidence.AAELDigest(ev)), and the tagged event u32le 0x4141454C ‖ u32le
// len ‖ "domain operation content". It does not validate ev (see evidence.Event.Validate).
func EncodeAAEL(ev evidence.Event) []byte {
	rec, _ := tcg.AAELRecord(ev.Text())
	return rec
}

// Trim returns a log up to its end marker, after checking that it is well-formed.
func Trim(b []byte) ([]byte, error) { return tcg.Trim(b) }

// ErrMismatch: a replayed RTMR differs from the expected value (a quote's, or the live one).
var ErrMismatch = errors.New("event log replay does not match")

// Match compares replayed RTMRs with expected ones, for the RTMR indexes given (all four when
// none are given). The error (ErrMismatch) names the first RTMR that differs and both values.
func Match(replayed, want [4][48]byte, rtmrs ...int) error {
	if len(rtmrs) == 0 {
		rtmrs = []int{0, 1, 2, 3}
	}
	for _, i := range rtmrs {
		if i < 0 || i > 3 {
			return fmt.Errorf("%w: no RTMR%d", ErrMismatch, i)
		}
		if replayed[i] != want[i] {
			return fmt.Errorf("%w: RTMR%d replays to %x, expected %x", ErrMismatch, i, replayed[i], want[i])
		}
	}
	return nil
}

// CoversBoot reports whether recs contain events for RTMR0..2 (a firmware CCEL), as opposed
// to only runtime RTMR3 events (an agent's own log).
func CoversBoot(recs []Record) bool {
	for _, r := range recs {
		if r.MRIndex >= 1 && r.MRIndex <= 3 && r.Type != tcg.EvNoAction {
			return true
		}
	}
	return false
}

// Measurements returns the RTMR3 AAEL events of recs, in order, with their SHA-384 digests
// (hex), and the model LastModel names (nil if none or if its event is malformed) — the
// convenience fields of evidence.Bundle. Only records Parse has checked are trusted here, and
// only as far as the log itself is: callers must replay the log against a verified quote.
func Measurements(recs []Record) ([]evidence.Measurement, *evidence.ModelInfo) {
	ms := []evidence.Measurement{}
	for _, r := range recs {
		if r.AAEL == nil || r.MRIndex != MRIndexRTMR3 {
			continue
		}
		ms = append(ms, evidence.Measurement{Event: *r.AAEL, Digest: fmt.Sprintf("%x", r.SHA384())})
	}
	model, _ := LastModel(recs)
	return ms, model
}

// LastModel returns the model named by the last cai-agent Model event among the RTMR3
// records. It is nil when there is none, and also when an RTMR3 record that is not an AAEL
// event follows it: nothing ties such a record's data to its digest, so it may be a Model
// event in disguise. The last Model event is parsed strictly — exactly
// {"manifest_sha256","name"} with a non-empty name, in the canonical form cai-agent measures,
// so that no reader can parse it differently — and a malformed one is an error (wrapping
// ErrMalformed), never skipped in favour of an earlier one.
func LastModel(recs []Record) (*evidence.ModelInfo, error) {
	for i := len(recs) - 1; i >= 0; i-- {
		r := recs[i]
		if r.MRIndex != MRIndexRTMR3 || r.Type == EvNoAction {
			continue
		}
		if r.AAEL == nil {
			return nil, nil
		}
		if r.AAEL.Domain != evidence.Domain || r.AAEL.Operation != evidence.OpModel {
			continue
		}
		mi, err := parseModel(r.AAEL.Content)
		if err != nil {
			return nil, fmt.Errorf("%w: last model event %q: %v", ErrMalformed, truncate(r.AAEL.Content, 120), err)
		}
		return mi, nil
	}
	return nil, nil
}

func parseModel(content string) (*evidence.ModelInfo, error) {
	var mi evidence.ModelInfo
	dec := json.NewDecoder(strings.NewReader(content))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&mi); err != nil || dec.More() {
		return nil, errors.New(`content is not {"manifest_sha256","name"} JSON`)
	}
	if mi.Name == "" {
		return nil, errors.New("empty model name")
	}
	if c, err := evidence.CanonicalJSON(mi); err != nil || string(c) != content {
		return nil, errors.New("content is not canonical JSON")
	}
	return &mi, nil
}
