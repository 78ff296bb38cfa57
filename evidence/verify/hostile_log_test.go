package verify

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
)

// disguisedRecord is an RTMR3 record (EV_EVENT_TAG) carrying digest d but data that is not an
// AAEL tagged event: nothing ties its data to its digest, so replay accepts it whatever d
// measured. A host handing a verifier a raw quote and a log of its choosing can rewrite any
// measured event into this form without changing RTMR3.
func disguisedRecord(d [48]byte) []byte {
	data := []byte("not an attestation-agent event")
	b := binary.LittleEndian.AppendUint32(nil, eventlog.MRIndexRTMR3)
	b = binary.LittleEndian.AppendUint32(b, eventlog.EvEventTag)
	b = binary.LittleEndian.AppendUint32(b, 1)
	b = binary.LittleEndian.AppendUint16(b, eventlog.AlgSHA384)
	b = append(b, d[:]...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// rawWithLog returns the cos-113 quote with RTMR3 set to the fold of measured, and the cos-113
// CCEL followed by the records given (so RTMR0..2 replay too).
func rawWithLog(t *testing.T, measured []evidence.Event, records ...[]byte) (quote, log []byte) {
	t.Helper()
	quote = append([]byte{}, fixture(t, cosQuote)...)
	var r3 [48]byte
	for _, ev := range measured {
		r3 = extend(r3, evidence.AAELDigest(ev))
	}
	copy(quote[offRTMR3:], r3[:])
	ccel, err := eventlog.Trim(fixture(t, cosCCEL))
	require.NoError(t, err)
	log = append([]byte{}, ccel...)
	for _, r := range records {
		log = append(log, r...)
	}
	return quote, log
}

// The last Model event and the Binary events a policy judges cannot be hidden by rewriting
// their records into non-AAEL records with the same digest (verify --quote --eventlog, where
// the log is not bound to the quote).
func TestHiddenEventsInNonAAELRecords(t *testing.T) {
	ctx := context.Background()
	bin, model, otherModel := events(t)
	evil, _ := evidence.BinaryEvent("/tmp/evil", sha(0x66))
	opts := patchedSignature(t, fixture(t, cosQuote))
	pol := ollamaPolicy(t)
	pol.OnlyKnownEvents = false

	// Measured: bin, model, then another model; the last one is disguised.
	quote, log := rawWithLog(t, []evidence.Event{bin, model, otherModel},
		eventlog.EncodeAAEL(bin), eventlog.EncodeAAEL(model), disguisedRecord(evidence.AAELDigest(otherModel)))
	_, err := Verify(ctx, quote, log, pol, opts)
	require.ErrorIs(t, err, ErrPolicy, "a later model hidden in a non-AAEL record")
	res, err := Verify(ctx, quote, log, nil, opts)
	require.NoError(t, err)
	assert.Nil(t, res.Model, "the model is unknown when a non-AAEL RTMR3 record follows the last Model event")

	// Measured: an unexpected binary, disguised.
	quote, log = rawWithLog(t, []evidence.Event{bin, evil, model},
		eventlog.EncodeAAEL(bin), disguisedRecord(evidence.AAELDigest(evil)), eventlog.EncodeAAEL(model))
	_, err = Verify(ctx, quote, log, pol, opts)
	require.ErrorIs(t, err, ErrPolicy, "an unexpected binary hidden in a non-AAEL record")

	// A non-AAEL record before the last Model event does not make the model unknown, and a
	// policy that judges neither binaries nor the model still accepts it.
	foreign := evidence.Event{Domain: "example.com", Operation: "x", Content: "y"}
	quote, log = rawWithLog(t, []evidence.Event{foreign, model},
		disguisedRecord(evidence.AAELDigest(foreign)), eventlog.EncodeAAEL(model))
	res, err = Verify(ctx, quote, log, &Policy{Model: pol.Model}, opts)
	require.NoError(t, err)
	require.NotNil(t, res.Model)
	assert.Equal(t, "llama3.1:8b", res.Model.Name)
}

// Model and Binary contents are RFC 8785 canonical JSON when cai-agent measures them; a
// content another JSON reader could read differently (duplicate or case-variant keys,
// trailing data, whitespace, a missing field) is not taken for a measured model or binary.
func TestModelAndBinaryContentMustBeCanonical(t *testing.T) {
	manifest := strings.Repeat("22", 32)
	for name, content := range map[string]string{
		"case-variant key": `{"NAME":"llama3.1:8b","manifest_sha256":"` + manifest + `"}`,
		"duplicate key":    `{"manifest_sha256":"` + manifest + `","name":"llama3.1:70b","name":"llama3.1:8b"}`,
		"trailing brace":   `{"manifest_sha256":"` + manifest + `","name":"llama3.1:8b"}}`,
		"whitespace":       `{"manifest_sha256": "` + manifest + `", "name": "llama3.1:8b"}`,
		"unsorted":         `{"name":"llama3.1:8b","manifest_sha256":"` + manifest + `"}`,
		"no manifest":      `{"name":"llama3.1:8b"}`,
	} {
		ev := evidence.Event{Domain: evidence.Domain, Operation: evidence.OpModel, Content: content}
		var rt [4][48]byte
		rt[3] = extend(rt[3], evidence.AAELDigest(ev))
		_, err := ReplayLog(eventlog.EncodeAAEL(ev), rt, false)
		assert.ErrorIs(t, err, ErrFormat, name)
	}
	good, _ := evidence.ModelEvent("llama3.1:8b", make([]byte, 32))
	var rt [4][48]byte
	rt[3] = extend(rt[3], evidence.AAELDigest(good))
	r, err := ReplayLog(eventlog.EncodeAAEL(good), rt, false)
	require.NoError(t, err)
	require.NotNil(t, r.Model)

	q, err := ParseQuote(fixture(t, "quote_v5_sample.dat"))
	require.NoError(t, err)
	allowed, evil := hex.EncodeToString(sha(0xab)), hex.EncodeToString(sha(0x66))
	p := policyOf(t, `{"allowed_binaries":[{"sha384":"`+allowed+`","path":"/usr/bin/ollama"}]}`)
	ok, _ := evidence.BinaryEvent("/usr/bin/ollama", sha(0xab))
	require.NoError(t, p.Check(q, replayOf(t, ok)))
	for name, content := range map[string]string{
		"duplicate key":    `{"path":"/usr/bin/ollama","sha384":"` + evil + `","sha384":"` + allowed + `"}`,
		"case-variant key": `{"SHA384":"` + allowed + `","path":"/usr/bin/ollama"}`,
		"uppercase hex":    `{"path":"/usr/bin/ollama","sha384":"` + strings.ToUpper(allowed) + `"}`,
		"trailing bracket": `{"path":"/usr/bin/ollama","sha384":"` + allowed + `"}]`,
	} {
		ev := evidence.Event{Domain: evidence.Domain, Operation: evidence.OpBinary, Content: content}
		err := p.Check(q, replayOf(t, ev))
		require.Error(t, err, name)
		assert.Len(t, failures(t, err), 1, name)
	}
}

// require_boot_log refuses evidence without the firmware CCEL, including a raw quote checked
// without any event log.
func TestRequireBootLogNeedsALog(t *testing.T) {
	ctx := context.Background()
	raw := fixture(t, cosQuote)
	pol := &Policy{RequireBootLog: true}
	_, err := Verify(ctx, raw, nil, pol, Options{Now: cosAt})
	assert.Contains(t, strings.Join(failures(t, err), ""), "no event log was given")
	res, err := Verify(ctx, raw, fixture(t, cosCCEL), pol, Options{Now: cosAt})
	require.NoError(t, err)
	assert.Equal(t, []int{0, 1, 2, 3}, res.Replay.Compared)
}
