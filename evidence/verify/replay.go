package verify

import (
	"fmt"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
)

// Replay is an event log replayed against a quote's RTMRs.
type Replay struct {
	// RTMRs are the replayed values.
	RTMRs [4]Hex `json:"rtmrs"`
	// Compared lists the RTMR indexes compared with the quote (always including 3).
	Compared []int `json:"compared"`
	// Measurements are the AAEL events of RTMR3, in order, with their digests (in JSON, the
	// Result's top-level measurements).
	Measurements []evidence.Measurement `json:"-"`
	// Model is the model of the last cai-agent Model event in RTMR3, or nil (in JSON, the
	// Result's model); also nil when an RTMR3 record that is not an AAEL event follows that
	// event, since such a record may be a Model event in disguise.
	Model *evidence.ModelInfo `json:"-"`
	// OtherRTMR3Records counts RTMR3 records that are not AAEL events.
	OtherRTMR3Records int `json:"other_rtmr3_records"`
}

// ReplayLog parses an event log (a firmware CCEL, an agent log, or a cc_eventlog joining
// them; nil or empty is a log without events), replays it into RTMR0..3 and compares them
// with rtmrs, the values of a verified quote:
//
//   - RTMR3 is ALWAYS compared, even when the log has no RTMR3 event (a log that omits
//     events replays to a different value, so a quote whose RTMR3 is non-zero cannot be
//     passed off with an empty or truncated log);
//   - RTMR0..2 are all compared when the log has any RTMR0..2 event (it covers boot), or when
//     requireBoot is set; otherwise (an agent-only log) they are not, and a Policy can pin
//     them by value instead.
//
// Only after a successful comparison are the RTMR3 events — returned as Measurements and
// Model — as trustworthy as the quote. Errors wrap ErrFormat (unparseable log, malformed
// model event) or ErrReplay (naming the first RTMR that differs).
func ReplayLog(log []byte, rtmrs [4][48]byte, requireBoot bool) (*Replay, error) {
	var recs []eventlog.Record
	if len(log) > 0 {
		var err error
		if recs, err = eventlog.Parse(log); err != nil {
			return nil, fmt.Errorf("%w: event log: %v", ErrFormat, err)
		}
	}
	got, err := eventlog.Replay(recs)
	if err != nil {
		return nil, fmt.Errorf("%w: event log: %v", ErrFormat, err)
	}
	cmp := []int{3}
	if requireBoot || eventlog.CoversBoot(recs) {
		cmp = []int{0, 1, 2, 3}
	}
	if err := eventlog.Match(got, rtmrs, cmp...); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrReplay, err)
	}
	r := &Replay{Compared: cmp}
	for i := range got {
		r.RTMRs[i] = Hex(got[i][:])
	}
	r.Measurements, _ = eventlog.Measurements(recs)
	for _, rec := range recs {
		if rec.MRIndex == eventlog.MRIndexRTMR3 && rec.Type != eventlog.EvNoAction && rec.AAEL == nil {
			r.OtherRTMR3Records++
		}
	}
	if r.Model, err = eventlog.LastModel(recs); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrFormat, err)
	}
	return r, nil
}
