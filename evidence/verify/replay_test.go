package verify

import (
	"crypto/sha512"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
)

func eventlogFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "testdata", "eventlogs", name))
	require.NoError(t, err)
	return b
}

// extend folds digests into an RTMR value as the TDX module does.
func extend(v [48]byte, ds ...[48]byte) [48]byte {
	for _, d := range ds {
		v = sha512.Sum384(append(v[:], d[:]...))
	}
	return v
}

func TestReplayCOS113(t *testing.T) {
	q, err := ParseQuote(fixture(t, "cos-113-tdx-quote.dat"))
	require.NoError(t, err)
	ccel := fixture(t, "cos-113-ccel_data.dat")
	r, err := ReplayLog(ccel, q.RTMRs(), false)
	require.NoError(t, err)
	assert.Equal(t, []int{0, 1, 2, 3}, r.Compared, "a CCEL covers boot: all RTMRs compared")
	for i := range 3 {
		assert.Equal(t, q.rtmr(i), r.RTMRs[i], "RTMR%d", i)
		assert.NotEqual(t, zero48, r.RTMRs[i].String())
	}
	assert.Empty(t, r.Measurements)
	assert.Nil(t, r.Model)

	// The log cut before its last event no longer replays.
	recs, err := eventlog.Parse(ccel)
	require.NoError(t, err)
	trimmed, err := eventlog.Trim(ccel)
	require.NoError(t, err)
	last := recs[len(recs)-1]
	require.NotZero(t, last.MRIndex)
	cut := trimmed[:len(trimmed)-recordSize(last)]
	_, err = ReplayLog(cut, q.RTMRs(), false)
	require.ErrorIs(t, err, ErrReplay)

	// One bit of a digest flipped: a replay mismatch (or, inside an AAEL event, a parse error).
	b := append([]byte{}, ccel...)
	b[len(cut)+8+2+5] ^= 1 // inside the last record's first digest
	_, err = ReplayLog(b, q.RTMRs(), false)
	require.ErrorIs(t, err, ErrReplay)

	// Against another quote's RTMRs.
	other, err := ParseQuote(fixture(t, "tdx_prod_quote_SPR_E4.dat"))
	require.NoError(t, err)
	_, err = ReplayLog(ccel, other.RTMRs(), false)
	require.ErrorIs(t, err, ErrReplay)

	_, err = ReplayLog([]byte("not an event log at all, but long enough to look like one"), q.RTMRs(), false)
	require.ErrorIs(t, err, ErrFormat)
}

// recordSize is the encoded size of a TCG_PCR_EVENT2 record with only a SHA-384 digest.
func recordSize(r eventlog.Record) int { return 4 + 4 + 4 + 2 + 48 + 4 + len(r.Data) }

// RTMR3 is always compared: a log missing RTMR3 events cannot pass for a quote whose RTMR3 is
// not zero, and an agent-only log leaves RTMR0..2 to the policy unless require_boot_log.
func TestReplayRTMR3Rules(t *testing.T) {
	bin, err := evidence.BinaryEvent("/usr/bin/ollama", make([]byte, 48))
	require.NoError(t, err)
	var rt [4][48]byte
	rt[0][0] = 1 // boot RTMRs the agent-only log says nothing about
	rt[3] = extend(rt[3], evidence.AAELDigest(bin))
	agentLog := eventlog.EncodeAAEL(bin)

	r, err := ReplayLog(agentLog, rt, false)
	require.NoError(t, err)
	assert.Equal(t, []int{3}, r.Compared)
	require.Len(t, r.Measurements, 1)
	assert.Equal(t, bin, r.Measurements[0].Event)

	_, err = ReplayLog(agentLog, rt, true)
	require.ErrorIs(t, err, ErrReplay, "require_boot_log compares RTMR0 too")

	for name, log := range map[string][]byte{"nil": nil, "empty": {}} {
		_, err = ReplayLog(log, rt, false)
		require.ErrorIs(t, err, ErrReplay, name)
	}
	var zero [4][48]byte
	_, err = ReplayLog(nil, zero, false)
	require.NoError(t, err, "no log and nothing measured is consistent")

	// A CCEL without our events against a quote with RTMR3 set: mismatch.
	q, err := ParseQuote(fixture(t, "cos-113-tdx-quote.dat"))
	require.NoError(t, err)
	qr := q.RTMRs()
	qr[3] = rt[3]
	_, err = ReplayLog(fixture(t, "cos-113-ccel_data.dat"), qr, false)
	require.ErrorIs(t, err, ErrReplay)
}

// Trustee's CCEL with two attestation-agent events: their content is surfaced.
func TestReplayTrusteeAAEL(t *testing.T) {
	log := eventlogFixture(t, "trustee-CCEL_AAEL_alibabacloud")
	recs, err := eventlog.Parse(log)
	require.NoError(t, err)
	want, err := eventlog.Replay(recs)
	require.NoError(t, err)
	r, err := ReplayLog(log, want, false)
	require.NoError(t, err)
	require.Len(t, r.Measurements, 2)
	assert.Equal(t, evidence.Event{Domain: "coco.com", Operation: "some-operation", Content: "some-content"}, r.Measurements[0].Event)
}

func TestReplayModelIsLastAndStrict(t *testing.T) {
	m1, _ := evidence.ModelEvent("llama3:8b", make([]byte, 32))
	m2, _ := evidence.ModelEvent("qwen3:32b", []byte("0123456789abcdef0123456789abcdef"))
	bad := evidence.Event{Domain: evidence.Domain, Operation: evidence.OpModel, Content: `{"name":"x","extra":1}`}
	build := func(evs ...evidence.Event) ([]byte, [4][48]byte) {
		var log []byte
		var rt [4][48]byte
		for _, ev := range evs {
			log = append(log, eventlog.EncodeAAEL(ev)...)
			rt[3] = extend(rt[3], evidence.AAELDigest(ev))
		}
		return log, rt
	}
	log, rt := build(m1, m2)
	r, err := ReplayLog(log, rt, false)
	require.NoError(t, err)
	require.NotNil(t, r.Model)
	assert.Equal(t, "qwen3:32b", r.Model.Name)

	log, rt = build(m1, bad)
	_, err = ReplayLog(log, rt, false)
	require.ErrorIs(t, err, ErrFormat, "a malformed last model event is not skipped in favour of an earlier one")
}
