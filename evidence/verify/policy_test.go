package verify

import (
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/agent/ollama"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
)

func policyOf(t testing.TB, js string) *Policy {
	t.Helper()
	p, err := ParsePolicy(strings.NewReader(js))
	require.NoError(t, err, js)
	return p
}

func failures(t testing.TB, err error) []string {
	t.Helper()
	require.ErrorIs(t, err, ErrPolicy)
	var pe *PolicyError
	require.True(t, errors.As(err, &pe))
	return pe.Failures
}

// policyFor pins every value policies can pin to what q holds.
func policyFor(q *Quote) string {
	return `{"mr_td":["` + strings.Repeat("ab", 48) + `","` + q.MRTD.String() + `"],"mr_seam":"` + q.MRSEAM.String() +
		`","rtmr0":"` + q.RTMR0.String() + `","rtmr1":"` + q.RTMR1.String() + `","rtmr2":"` + q.RTMR2.String() + `","rtmr3":"` + q.RTMR3.String() +
		`","mr_config_id":"` + q.MRConfigID.String() + `","mr_owner":"` + q.MROwner.String() + `","mr_owner_config":"` + q.MROwnerConfig.String() +
		`","report_data":"` + q.ReportData.String() + `","min_tee_tcb_svn":"` + q.TEETCBSVN.String() +
		`","td_attributes":"` + q.TDAttributes.String() + `","xfam":"` + q.XFAM.String() +
		`","mr_signer_seam":"` + q.MRSignerSEAM.String() + `","seam_attributes":"` + q.SEAMAttributes.String() + `"}`
}

func TestPolicyQuoteV4V5(t *testing.T) {
	for _, file := range []string{"tdx_prod_quote_SPR_E4.dat", "quote_v5_sample.dat", "cos-113-tdx-quote.dat", "trustee-tdx_quote_5.dat"} {
		t.Run(file, func(t *testing.T) {
			q, err := ParseQuote(fixture(t, file))
			require.NoError(t, err)
			p := policyOf(t, policyFor(q))
			require.NoError(t, p.Check(q, nil))
			require.NoError(t, (*Policy)(nil).Check(q, nil))

			// Each pinned value changed is reported, all of them at once.
			bad := *p
			flip := func(h Hex) Hex { c := append(Hex{}, h...); c[0] ^= 0xff; return c }
			bad.MRTD = HexList{flip(q.MRTD)}
			bad.MRSEAM = HexList{flip(q.MRSEAM)}
			bad.RTMR0, bad.RTMR1, bad.RTMR2, bad.RTMR3 = flip(q.RTMR0), flip(q.RTMR1), flip(q.RTMR2), flip(q.RTMR3)
			bad.MRConfigID, bad.MROwner, bad.MROwnerConfig = flip(q.MRConfigID), flip(q.MROwner), flip(q.MROwnerConfig)
			bad.ReportData = flip(q.ReportData)
			bad.XFAM, bad.MRSignerSEAM, bad.SEAMAttributes = flip(q.XFAM), flip(q.MRSignerSEAM), flip(q.SEAMAttributes)
			bad.TDAttributes = append(Hex{}, q.TDAttributes...)
			bad.TDAttributes[3] ^= 0x10 // SEPT_VE_DISABLE (bit 28), not DEBUG
			f := failures(t, bad.Check(q, nil))
			assert.Len(t, f, 14, "%q", f)
			for _, name := range []string{"mr_td", "mr_seam ", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_config_id", "mr_owner ", "mr_owner_config", "report_data",
				"td_attributes", "xfam", "mr_signer_seam", "seam_attributes"} {
				assert.True(t, strings.Contains(strings.Join(f, "\n"), name), name)
			}
		})
	}
}

func TestPolicyMinTCBSVNIsPerComponent(t *testing.T) {
	q, err := ParseQuote(fixture(t, "tdx_prod_quote_SPR_E4.dat")) // tee_tcb_svn 03 00 04 00…
	require.NoError(t, err)
	for min, ok := range map[string]bool{
		"03000400000000000000000000000000": true,
		"00000000000000000000000000000000": true,
		"02000300000000000000000000000000": true,
		"03000500000000000000000000000000": false, // component 2: 4 < 5
		"02010000000000000000000000000000": false, // lexicographically smaller, but component 1: 0 < 1
		"04000000000000000000000000000000": false,
	} {
		err := policyOf(t, `{"min_tee_tcb_svn":"`+min+`"}`).Check(q, nil)
		if ok {
			assert.NoError(t, err, min)
		} else {
			assert.Contains(t, strings.Join(failures(t, err), ""), "min_tee_tcb_svn", min)
		}
	}
}

// TDX 1.5 fields: TEE_TCB_SVN2 judged per component, MR_SERVICETD exact; a quote without them
// (v4, or a v5 TDX 1.0 body) fails a policy that sets them.
func TestPolicyTDX15Fields(t *testing.T) {
	v5, err := ParseQuote(fixture(t, "quote_v5_sample.dat")) // tee_tcb_svn2 0d 01 04 00…, mr_servicetd zero
	require.NoError(t, err)
	withTD, err := ParseQuote(fixture(t, "trustee-tdx_quote_5.dat")) // mr_servicetd 383c87d3…
	require.NoError(t, err)
	v4, err := ParseQuote(fixture(t, "tdx_prod_quote_SPR_E4.dat"))
	require.NoError(t, err)
	zero := strings.Repeat("00", 48)
	for _, c := range []struct {
		q      *Quote
		policy string
		fail   string // "" = accepted
	}{
		{v5, `{"min_tee_tcb_svn2":"0d010400000000000000000000000000"}`, ""},
		{v5, `{"min_tee_tcb_svn2":"0c020000000000000000000000000000"}`, "tee_tcb_svn2 0d010400000000000000000000000000 is below min_tee_tcb_svn2"},
		{v5, `{"min_tee_tcb_svn2":"0d010500000000000000000000000000"}`, "component 2: 4 < 5"},
		{v4, `{"min_tee_tcb_svn2":"00000000000000000000000000000000"}`, "tee_tcb_svn2 is missing"},
		{v5, `{"mr_servicetd":"` + zero + `"}`, ""},
		{withTD, `{"mr_servicetd":"` + withTD.MRServiceTD.String() + `"}`, ""},
		{withTD, `{"mr_servicetd":"` + zero + `"}`, "mr_servicetd is " + withTD.MRServiceTD.String() + ", want " + zero},
		{v4, `{"mr_servicetd":"` + zero + `"}`, "mr_servicetd " + zero + " required but the quote has none"},
	} {
		p := policyOf(t, `{"allow_debug":true,`+c.policy[1:])
		err := p.Check(c.q, nil)
		if c.fail == "" {
			assert.NoError(t, err, c.policy)
			continue
		}
		f := failures(t, err)
		require.Len(t, f, 1, c.policy)
		assert.Contains(t, f[0], c.fail, c.policy)
	}
	_, err = ParsePolicy(strings.NewReader(`{"mr_servicetd":"00","min_tee_tcb_svn2":"01"}`))
	require.ErrorIs(t, err, ErrBadPolicy)
	assert.ErrorContains(t, err, "mr_servicetd is 1 bytes, want 48")
	assert.ErrorContains(t, err, "min_tee_tcb_svn2 is 1 bytes, want 16")
}

func TestPolicyDebug(t *testing.T) {
	q, err := ParseQuote(fixture(t, "trustee-tdx_quote_4.dat")) // a real quote of a debuggable TD
	require.NoError(t, err)
	require.True(t, q.Debug)
	assert.Contains(t, failures(t, (*Policy)(nil).Check(q, nil))[0], "debuggable")
	assert.Contains(t, failures(t, policyOf(t, `{}`).Check(q, nil))[0], "debuggable")
	assert.NoError(t, policyOf(t, `{"allow_debug":true}`).Check(q, nil))
}

func replayOf(t testing.TB, evs ...evidence.Event) *Replay {
	t.Helper()
	r := &Replay{}
	var log []byte
	for _, ev := range evs {
		d := evidence.AAELDigest(ev)
		r.Measurements = append(r.Measurements, evidence.Measurement{Event: ev, Digest: hex.EncodeToString(d[:])})
		log = append(log, eventlog.EncodeAAEL(ev)...)
	}
	recs, err := eventlog.Parse(log)
	require.NoError(t, err)
	r.Model, err = eventlog.LastModel(recs)
	require.NoError(t, err)
	return r
}

func TestPolicyEvents(t *testing.T) {
	q, err := ParseQuote(fixture(t, "quote_v5_sample.dat"))
	require.NoError(t, err)
	ollama := sha(0x01)
	runner := sha(0x02)
	binO, _ := evidence.BinaryEvent("/usr/bin/ollama", ollama)
	binR, _ := evidence.BinaryEvent("/usr/lib/ollama/runner", runner)
	binX, _ := evidence.BinaryEvent("/tmp/evil", sha(0x03))
	manifest := make([]byte, 32)
	manifest[0] = 0xaa
	model, _ := evidence.ModelEvent("llama3.1:8b", manifest)
	other := evidence.Event{Domain: "coco.com", Operation: "op", Content: "x"}
	p := policyOf(t, `{
		"allowed_binaries": [{"sha384":"`+hex.EncodeToString(ollama)+`","path":"/usr/bin/ollama"},{"sha384":"`+hex.EncodeToString(runner)+`"}],
		"model": {"name":"llama3.1:8b","manifest_sha256":"`+hex.EncodeToString(manifest)+`"},
		"required_measurements": [{"domain":"coco.com","operation":"op","content":"x"}]}`)

	require.NoError(t, p.Check(q, replayOf(t, binO, binR, other, model)))

	f := failures(t, p.Check(q, replayOf(t, binO, binX, other, model)))
	assert.Equal(t, []string{"binary /tmp/evil (sha384 " + hex.EncodeToString(sha(0x03)) + ") is not in allowed_binaries"}, f)

	// The right digest under another path than the entry names.
	moved, _ := evidence.BinaryEvent("/tmp/ollama", ollama)
	assert.Len(t, failures(t, p.Check(q, replayOf(t, moved, other, model))), 1)

	other2, _ := evidence.ModelEvent("llama3.1:70b", manifest)
	f = failures(t, p.Check(q, replayOf(t, binO, other, model, other2)))
	assert.Contains(t, f[0], "model is llama3.1:70b")
	sameNameOtherManifest, _ := evidence.ModelEvent("llama3.1:8b", make([]byte, 32))
	assert.Len(t, failures(t, p.Check(q, replayOf(t, binO, other, sameNameOtherManifest))), 1)
	f = failures(t, p.Check(q, replayOf(t, binO, other)))
	assert.Contains(t, f[0], "no model was measured")
	f = failures(t, p.Check(q, replayOf(t, binO, model)))
	assert.Contains(t, f[0], "required measurement")
	f = failures(t, p.Check(q, nil))
	assert.Contains(t, f[0], "no event log was given")

	// An empty allow-list allows no binary; a binary event with a malformed content fails.
	none := policyOf(t, `{"allowed_binaries":[]}`)
	require.NoError(t, none.Check(q, replayOf(t, other)))
	assert.Len(t, failures(t, none.Check(q, replayOf(t, binO))), 1)
	badBin := evidence.Event{Domain: evidence.Domain, Operation: evidence.OpBinary, Content: `{"path":"/x","sha384":"00"}`}
	assert.Len(t, failures(t, none.Check(q, replayOf(t, badBin))), 1)

	// only_known_events: other domains' events fail unless required.
	strict := policyOf(t, `{"only_known_events":true}`)
	require.NoError(t, strict.Check(q, replayOf(t, binO, model)))
	assert.Contains(t, failures(t, strict.Check(q, replayOf(t, binO, other)))[0], "unexpected RTMR3 event")
	r := replayOf(t, binO)
	r.OtherRTMR3Records = 1
	assert.Len(t, failures(t, strict.Check(q, r)), 1)
	p.OnlyKnownEvents = true
	require.NoError(t, p.Check(q, replayOf(t, binO, binR, other, model)))
}

func sha(b byte) []byte {
	s := make([]byte, 48)
	for i := range s {
		s[i] = b
	}
	return s
}

func TestParsePolicy(t *testing.T) {
	// null is the same as absent.
	null := policyOf(t, `{"mr_td":null,"rtmr0":null,"model":null,"allowed_binaries":null}`)
	assert.Equal(t, &Policy{}, null)
	p := policyOf(t, `{"mr_td":"`+strings.Repeat("AB", 48)+`"}`)
	require.Len(t, p.MRTD, 1)
	assert.Equal(t, strings.Repeat("ab", 48), p.MRTD[0].String())
	for name, js := range map[string]string{
		"unknown field":   `{"mrtd":"00"}`,
		"short mr_td":     `{"mr_td":"00"}`,
		"short in list":   `{"mr_td":["` + strings.Repeat("00", 48) + `","00"]}`,
		"not hex":         `{"rtmr3":"zz"}`,
		"report_data 48":  `{"report_data":"` + strings.Repeat("00", 48) + `"}`,
		"tcb svn 15":      `{"min_tee_tcb_svn":"` + strings.Repeat("00", 15) + `"}`,
		"binary sha256":   `{"allowed_binaries":[{"sha384":"` + strings.Repeat("00", 32) + `"}]}`,
		"empty model":     `{"model":{}}`,
		"model sha384":    `{"model":{"manifest_sha256":"` + strings.Repeat("00", 48) + `"}}`,
		"bad event":       `{"required_measurements":[{"domain":"a b","operation":"o","content":""}]}`,
		"trailing":        `{} {}`,
		"not an object":   `[]`,
		"unknown nested":  `{"model":{"name":"x","digest":"y"}}`,
		"debug as string": `{"allow_debug":"yes"}`,
		"empty rtmr":      `{"rtmr0":""}`,
	} {
		_, err := ParsePolicy(strings.NewReader(js))
		assert.ErrorIs(t, err, ErrBadPolicy, name)
	}
}

// The documented Ollama example (testdata/policy-ollama.json, also in the README) parses.
func TestOllamaExamplePolicy(t *testing.T) {
	p, err := LoadPolicy("testdata/policy-ollama.json")
	require.NoError(t, err)
	require.NotNil(t, p.Model)
	// Names are compared exactly, and the agent measures an Ollama model under its full name
	// (what ollama.ParseName gives), so the example must use that form.
	n, err := ollama.ParseName(p.Model.Name)
	require.NoError(t, err)
	assert.Equal(t, n.String(), p.Model.Name, "the example's model name is the full Ollama name")
	assert.NotEmpty(t, p.AllowedBinaries)
	assert.NotEmpty(t, p.MRTD)
	y, err := LoadPolicy("testdata/policy-ollama.yaml")
	require.NoError(t, err)
	assert.Equal(t, p, y, "the YAML example is the same policy")
	for name, doc := range map[string]string{
		"unknown field":   "mrtd: \"00\"\n",
		"unquoted digits": "min_tee_tcb_svn: 03000400000000000000000000000000\n",
		"a list":          "- a\n",
		"two documents":   "allow_debug: true\n---\nallow_debug: false\n",
	} {
		_, err := ParsePolicyYAML(strings.NewReader(doc))
		assert.ErrorIs(t, err, ErrBadPolicy, name)
	}
	_, err = LoadPolicy("testdata/missing.json")
	require.ErrorIs(t, err, ErrBadPolicy)
}
