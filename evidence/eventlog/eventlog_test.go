package eventlog_test

import (
	"bytes"
	"crypto/sha512"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-eventlog/register"
	gotcg "github.com/google/go-eventlog/tcg"
	"github.com/google/go-tdx-guest/abi"
	pb "github.com/google/go-tdx-guest/proto/tdx"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/eventlog"
	"github.com/cai-agent/cai-agent/evidence/internal/tcg"
)

func fixture(t testing.TB, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "testdata", rel))
	require.NoError(t, err)
	return b
}

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	require.NoError(t, err)
	return b
}

// The attestation-agent vector (guest-components eventlog test_event_digest).
func TestAAELDigestVector(t *testing.T) {
	ev := evidence.Event{Domain: "domain", Operation: "operation", Content: "content"}
	d := evidence.AAELDigest(ev)
	assert.Equal(t, "dad5f0e226318ffa9839b75a472c6aa7fdb5834949d0a0a22990cf04d5692440fb00f3aa0609db7e49cd8d793f670d02", hex.EncodeToString(d[:]))

	rec := eventlog.EncodeAAEL(ev)
	recs, err := eventlog.Parse(rec)
	require.NoError(t, err)
	require.Len(t, recs, 1)
	assert.EqualValues(t, 4, recs[0].MRIndex)
	assert.EqualValues(t, 6, recs[0].Type)
	assert.Equal(t, d[:], recs[0].SHA384())
	assert.Equal(t, &ev, recs[0].AAEL)
	// Byte layout: MR index ‖ type ‖ count ‖ alg ‖ digest ‖ size ‖ "LEAA" ‖ len ‖ text.
	want := unhex(t, "04000000"+"06000000"+"01000000"+"0c00"+hex.EncodeToString(d[:])+"20000000"+"4c454141"+"18000000")
	want = append(want, "domain operation content"...)
	assert.Equal(t, want, rec)
}

func quoteRTMRs(t *testing.T, raw []byte) [][]byte {
	t.Helper()
	q, err := abi.QuoteToProto(raw)
	require.NoError(t, err)
	switch q := q.(type) {
	case *pb.QuoteV4:
		return q.GetTdQuoteBody().GetRtmrs()
	case *pb.QuoteV5:
		return q.GetTdQuoteBodyDescriptor().GetTdQuoteBodyV5().GetRtmrs()
	}
	t.Fatalf("unexpected quote type %T", q)
	return nil
}

// The COS-113 CCEL replays to its quote's RTMR0..2 (RTMR3 unused, zero).
func TestReplayCOS113AgainstQuote(t *testing.T) {
	recs, err := eventlog.Parse(fixture(t, "tdx/cos-113-ccel_data.dat"))
	require.NoError(t, err)
	mr, err := eventlog.Replay(recs)
	require.NoError(t, err)
	rtmrs := quoteRTMRs(t, fixture(t, "tdx/cos-113-tdx-quote.dat"))
	for i := 0; i < 4; i++ {
		assert.Equal(t, hex.EncodeToString(rtmrs[i]), hex.EncodeToString(mr[i][:]), "RTMR%d", i)
	}
	assert.Equal(t, make([]byte, 48), mr[3][:])
}

// Trustee's CCEL fixtures replay to the values in Trustee's own test (deps/eventlog/src/lib.rs
// test_rtmr_integrity), including GKE's log with an EV_NO_ACTION event in RTMR0.
func TestReplayTrusteeFixtures(t *testing.T) {
	zero := strings.Repeat("0", 96)
	for name, want := range map[string][4]string{
		"trustee-CCEL_data": {"2dc712306a963eadb894ad47dbaa17df44814151555aee11cbb843becca88950ffd079664902e6f22c66f7c8213543f4",
			"0fa3be56af61208bbd179dc7b124988eb929319154663c539d6f46445ecac2fec287075047ff7bd1922829fec28cd3cf", zero, zero},
		"trustee-CCEL_data_ovmf": {"8566f998798db09443b244c62de9a3041fb02e2e6936c4396d784bba2e90177329ec5aba3bb484404f2ab9cc90abe193",
			"775b9f6bfe99f8a31396f0d0218e67ffa796d3b96ccf961cbb0deba48c79c00f082cda1a5567c1c16305f1fc210c13c6",
			"94eaf7a7bf398ed8d888c91057ae0261802e4f3df084213a76ca7f0b5055ac9d2241de43cd58d9e8b49c503bbf25f34a", zero},
		"trustee-CCEL_data_grub": {"cec0a104f691f60da2387fea3c2de00c4ac035e2bb479ff02edcce69039d9e9907f0b3e55031da3dc7038f423adebd79",
			"6c289e0c62182d41ebe97bdbc9872d10998a08eaa86adcdc684001a363207ee72942c7522cdf00a4bbc3d784bed7b670",
			"08919d017ba0e52cd6d966351c7de16fe76c1d3d3d3da4554239e4c7d16cb8b82a94e7eaea3a0e6e18eb690b999fd31e", zero},
		"trustee-CCEL_data_gcp": {"3300980705adf09d28b707b79699d9874892164280832be2c386a715b6e204e0897fb564a064f810659207ba862b304f",
			"204d49f78d29918fe7b2f694e76653861a0c2a018987d2c3a54266eff737232524cf0af68c4d180e2f8c2c0937f21967", zero, zero},
		"trustee-CCEL_data_grub_gke": {"bc9945139042cf2cc75caf920aa57f14884ecfd7e893bccc51250c8ce90eb53ce72741e6adaa18183eb1331a87d4544a",
			"c17cb288a4dee302bb9ed8d27257a168f3264ad68cab53757f37eeaa7039657fa887cad65cf910e0fdc435ff110f8a7b",
			"334aeba2c985f8886cea97d1ecffbd512769d528b9a94009583db667ad7d2faa7d37fa145d75b192ceee2d2f10b2eb6d", zero},
	} {
		t.Run(name, func(t *testing.T) {
			recs, err := eventlog.Parse(fixture(t, "eventlogs/"+name))
			require.NoError(t, err)
			mr, err := eventlog.Replay(recs)
			require.NoError(t, err)
			for i := range want {
				assert.Equal(t, want[i], hex.EncodeToString(mr[i][:]), "RTMR%d", i)
			}
		})
	}
}

type trusteeOut struct {
	Logs []struct {
		Details struct {
			Data *struct {
				Domain    string          `json:"domain"`
				Operation string          `json:"operation"`
				Content   json.RawMessage `json:"content"`
			} `json:"data"`
			String *string `json:"string"`
		} `json:"details"`
		Digests []struct {
			Alg    string `json:"alg"`
			Digest string `json:"digest"`
		} `json:"digests"`
		Event    string `json:"event"`
		Index    uint32 `json:"index"`
		TypeName string `json:"type_name"`
	} `json:"uefi_event_logs"`
}

// Every event of Trustee's CCEL_AAEL fixture parses as Trustee parses it (index, digests,
// event bytes), and its two AAEL events carry their domain/operation/content.
func TestParseTrusteeAAELFixture(t *testing.T) {
	for _, name := range []string{"trustee-CCEL_AAEL_alibabacloud", "trustee-CCEL_data", "trustee-CCEL_data_ovmf",
		"trustee-CCEL_data_grub", "trustee-CCEL_data_grub_gke"} {
		t.Run(name, func(t *testing.T) {
			recs, err := eventlog.Parse(fixture(t, "eventlogs/"+name))
			require.NoError(t, err)
			var want trusteeOut
			require.NoError(t, json.Unmarshal(fixture(t, "eventlogs/"+name+"_out.json"), &want))
			require.Len(t, recs, len(want.Logs))
			var aael []*evidence.Event
			for i, w := range want.Logs {
				r := recs[i]
				assert.Equal(t, w.Index, r.MRIndex, "event %d", i)
				assert.Equal(t, w.Event, base64.StdEncoding.EncodeToString(r.Data), "event %d", i)
				require.Len(t, r.Digests, len(w.Digests), "event %d", i)
				for _, d := range w.Digests {
					require.Equal(t, "SHA-384", d.Alg)
					assert.Equal(t, d.Digest, hex.EncodeToString(r.SHA384()), "event %d", i)
				}
				if w.Details.Data != nil {
					require.NotNil(t, r.AAEL, "event %d", i)
					assert.Equal(t, "EV_EVENT_TAG", w.TypeName)
					assert.EqualValues(t, eventlog.EvEventTag, r.Type)
					assert.Equal(t, w.Details.Data.Domain, r.AAEL.Domain)
					assert.Equal(t, w.Details.Data.Operation, r.AAEL.Operation)
					assert.Equal(t, *w.Details.String, r.AAEL.Text())
					d := evidence.AAELDigest(*r.AAEL)
					assert.Equal(t, d[:], r.SHA384(), "AAEL digest is the tagged-event hash")
					aael = append(aael, r.AAEL)
				} else {
					assert.Nil(t, r.AAEL, "event %d", i)
				}
			}
			if name == "trustee-CCEL_AAEL_alibabacloud" {
				require.Len(t, aael, 2)
				assert.Equal(t, evidence.Event{Domain: "coco.com", Operation: "some-operation", Content: "some-content"}, *aael[0])
				assert.Equal(t, evidence.Event{Domain: "coco.com", Operation: "some-operation",
					Content: `{"key": "value", "nested-key": {"sub-key": "value"}}`}, *aael[1])
				d := aael[0]
				dg := evidence.AAELDigest(*d)
				assert.Equal(t, "2330183d89750c6a374a", hex.EncodeToString(dg[:10]))
			}
		})
	}
}

// A log built as cai-agent builds cc_eventlog (CCEL trimmed ‖ our records ‖ 8×FF) parses, and
// its RTMR3 replay equals the fold of our digests.
func TestJoinedLog(t *testing.T) {
	ccel, err := eventlog.Trim(fixture(t, "tdx/cos-113-ccel_data.dat"))
	require.NoError(t, err)
	base, err := eventlog.Parse(ccel)
	require.NoError(t, err)
	evs := []evidence.Event{
		{Domain: evidence.Domain, Operation: evidence.OpBinary, Content: `{"path":"/usr/bin/ollama","sha384":"00"}`},
		{Domain: evidence.Domain, Operation: evidence.OpModel, Content: `{"manifest_sha256":"ab","name":"tinyllama"}`},
	}
	joined := append([]byte{}, ccel...)
	var rtmr3 [48]byte
	for _, ev := range evs {
		joined = append(joined, eventlog.EncodeAAEL(ev)...)
		d := evidence.AAELDigest(ev)
		rtmr3 = sha512.Sum384(append(rtmr3[:], d[:]...))
	}
	joined = append(joined, bytes.Repeat([]byte{0xFF}, 8)...)
	recs, err := eventlog.Parse(joined)
	require.NoError(t, err)
	require.Len(t, recs, len(base)+2)
	assert.Equal(t, evs[1], *recs[len(recs)-1].AAEL)
	mr, err := eventlog.Replay(recs)
	require.NoError(t, err)
	assert.Equal(t, rtmr3, mr[3])
	rtmrs := quoteRTMRs(t, fixture(t, "tdx/cos-113-tdx-quote.dat"))
	assert.Equal(t, rtmrs[0], mr[0][:])

	// Without a CCEL: the minimal Spec ID header in front.
	own := append(tcg.SpecIDHeader(), eventlog.EncodeAAEL(evs[0])...)
	own = append(own, tcg.EndMarker...)
	recs, err = eventlog.Parse(own)
	require.NoError(t, err)
	require.Len(t, recs, 1)
	assert.Equal(t, evs[0], *recs[0].AAEL)
}

func TestParseRejects(t *testing.T) {
	ev := evidence.Event{Domain: "d", Operation: "o", Content: "c"}
	rec := eventlog.EncodeAAEL(ev)

	for _, tc := range []struct {
		name string
		b    []byte
		want error
	}{
		{"truncated", rec[:len(rec)-1], eventlog.ErrMalformed},
		{"truncated digest", rec[:30], eventlog.ErrMalformed},
		{"short tail", append(append([]byte{}, rec...), 1, 2, 3), eventlog.ErrMalformed},
		{"data after marker", append(append(append([]byte{}, rec...), tcg.EndMarker...), rec...), eventlog.ErrMalformed},
		{"digest mismatch", func() []byte { b := append([]byte{}, rec...); b[20] ^= 1; return b }(), eventlog.ErrDigestMismatch},
		{"text mismatch", func() []byte { b := append([]byte{}, rec...); b[len(b)-1] = 'x'; return b }(), eventlog.ErrDigestMismatch},
		{"huge size", func() []byte {
			b := append([]byte{}, rec...)
			b[62] = 0xFF
			b[63] = 0xFF
			b[64] = 0xFF
			b[65] = 0x7F
			return b
		}(), eventlog.ErrMalformed},
		{"unknown alg", func() []byte { b := append([]byte{}, rec...); b[12] = 0x99; return b }(), eventlog.ErrMalformed},
		{"too many digests", func() []byte { b := append([]byte{}, rec...); b[8] = 200; return b }(), eventlog.ErrMalformed},
		{"bad tagged length", func() []byte {
			b := append([]byte{}, rec...)
			b[70]++
			return b
		}(), eventlog.ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := eventlog.Parse(tc.b)
			require.ErrorIs(t, err, tc.want)
		})
	}

	// Padding after the marker, and an empty log, are fine.
	recs, err := eventlog.Parse(append(append(append([]byte{}, rec...), tcg.EndMarker...), 0, 0, 0xFF))
	require.NoError(t, err)
	assert.Len(t, recs, 1)
	recs, err = eventlog.Parse(nil)
	require.NoError(t, err)
	assert.Empty(t, recs)

	// Replay refuses MR indexes beyond RTMR3.
	b := append([]byte{}, rec...)
	b[0] = 5
	recs, err = eventlog.Parse(b)
	require.NoError(t, err)
	_, err = eventlog.Replay(recs)
	require.ErrorIs(t, err, eventlog.ErrMalformed)
}

func FuzzParse(f *testing.F) {
	f.Add(eventlog.EncodeAAEL(evidence.Event{Domain: "d", Operation: "o", Content: "c"}))
	f.Add(append(tcg.SpecIDHeader(), tcg.EndMarker...))
	f.Fuzz(func(t *testing.T, b []byte) {
		recs, err := eventlog.Parse(b)
		if err != nil {
			return
		}
		_, _ = eventlog.Replay(recs)
		for _, r := range recs {
			if r.AAEL != nil {
				d := evidence.AAELDigest(*r.AAEL)
				if s := r.SHA384(); s != nil && !bytes.Equal(s, d[:]) {
					t.Fatalf("AAEL digest accepted but does not match")
				}
			}
		}
	})
}

// Our encoding of the fixture's AAEL events reproduces the fixture's records byte for byte
// (attestation-agent wire compatibility), and the fixture's last record is followed by 8×FF.
func TestEncodeAAELMatchesTrusteeFixture(t *testing.T) {
	raw := fixture(t, "eventlogs/trustee-CCEL_AAEL_alibabacloud")
	recs, err := eventlog.Parse(raw)
	require.NoError(t, err)
	var tail []byte
	for _, r := range recs {
		if r.AAEL != nil {
			enc := eventlog.EncodeAAEL(*r.AAEL)
			require.True(t, bytes.Contains(raw, enc))
			tail = append(tail, enc...)
		}
	}
	tail = append(tail, tcg.EndMarker...)
	assert.True(t, bytes.HasSuffix(raw, tail), "CCEL ‖ AAEL records ‖ 8×FF")
}

func TestMatch(t *testing.T) {
	var a, b [4][48]byte
	b[3][0] = 1
	require.NoError(t, eventlog.Match(a, a))
	require.NoError(t, eventlog.Match(a, b, 0, 1, 2))
	err := eventlog.Match(a, b)
	require.ErrorIs(t, err, eventlog.ErrMismatch)
	assert.Contains(t, err.Error(), "RTMR3")
	require.ErrorIs(t, eventlog.Match(a, a, 4), eventlog.ErrMismatch)

	ccel, err := eventlog.Parse(fixture(t, "tdx/cos-113-ccel_data.dat"))
	require.NoError(t, err)
	assert.True(t, eventlog.CoversBoot(ccel))
	own, err := eventlog.Parse(eventlog.EncodeAAEL(evidence.Event{Domain: "d", Operation: "o", Content: "c"}))
	require.NoError(t, err)
	assert.False(t, eventlog.CoversBoot(own))
}

// attestation-agent's EL_HEADER (used when there is no CCEL) has an all-zero signature and
// declares SHA-384 and SM3; it must parse, with the digest sizes it declares.
func TestAttestationAgentHeader(t *testing.T) {
	data := make([]byte, 24)
	data[21] = 2                                        // spec major
	data[23] = 2                                        // uintnSize
	data = append(data, 2, 0, 0, 0)                     // two algorithms
	data = append(data, 0x0c, 0, 48, 0, 0x12, 0, 32, 0) // SHA-384/48, SM3/32
	data = append(data, 0)                              // no vendor info
	hdr := make([]byte, 32)
	hdr[4] = 3 // EV_NO_ACTION
	hdr[28] = byte(len(data))
	hdr = append(hdr, data...)
	require.Len(t, hdr, 69)
	ev := evidence.Event{Domain: "d", Operation: "o", Content: "c"}
	log := append(append(hdr, eventlog.EncodeAAEL(ev)...), tcg.EndMarker...)
	recs, err := eventlog.Parse(log)
	require.NoError(t, err)
	require.Len(t, recs, 1)
	assert.Equal(t, ev, *recs[0].AAEL)
}

// Our header has the shape of TDVF's CCEL header (only the PCR index differs).
func TestSpecIDHeaderShape(t *testing.T) {
	ccel := fixture(t, "tdx/cos-113-ccel_data.dat")
	h := tcg.SpecIDHeader()
	require.Len(t, h, 65)
	assert.Equal(t, ccel[4:65], h[4:65])
	l, err := tcg.Walk(append(h, tcg.EndMarker...))
	require.NoError(t, err)
	assert.Equal(t, 65, l.HeaderEnd)
	assert.Empty(t, l.Records)
}

func rtmrBank(mr [4][48]byte) []register.MR {
	var b register.RTMRBank
	for i := range mr {
		b.RTMRs = append(b.RTMRs, register.RTMR{Index: i, Digest: append([]byte{}, mr[i][:]...)})
	}
	return b.MRs()
}

// Cross-check with an independent implementation: google/go-eventlog parses the logs we
// build (CCEL ‖ AAEL records ‖ 8×FF, and our Spec ID header ‖ records ‖ 8×FF) and agrees with
// our replay; it rejects a wrong RTMR. (It cannot parse Trustee's CCEL_data fixture, whose
// area is zero-padded; ours does, see TestReplayTrusteeCCELData.)
func TestCrossCheckGoEventlog(t *testing.T) {
	ccel, err := eventlog.Trim(fixture(t, "tdx/cos-113-ccel_data.dat"))
	require.NoError(t, err)
	evs := []evidence.Event{
		{Domain: evidence.Domain, Operation: evidence.OpBinary, Content: `{"path":"/usr/bin/ollama","sha384":"00"}`},
		{Domain: evidence.Domain, Operation: evidence.OpModel, Content: `{"manifest_sha256":"ab","name":"tinyllama"}`},
	}
	var own []byte
	for _, ev := range evs {
		own = append(own, eventlog.EncodeAAEL(ev)...)
	}
	for name, log := range map[string][]byte{
		"ccel":             append(append([]byte{}, ccel...), tcg.EndMarker...),
		"ccel+aael":        append(append(append([]byte{}, ccel...), own...), tcg.EndMarker...),
		"header+aael":      append(append(tcg.SpecIDHeader(), own...), tcg.EndMarker...),
		"trustee-aael":     fixture(t, "eventlogs/trustee-CCEL_AAEL_alibabacloud"),
		"cos-113 (padded)": fixture(t, "tdx/cos-113-ccel_data.dat"),
	} {
		t.Run(name, func(t *testing.T) {
			recs, err := eventlog.Parse(log)
			require.NoError(t, err)
			mr, err := eventlog.Replay(recs)
			require.NoError(t, err)
			events, err := gotcg.ParseAndReplay(log, rtmrBank(mr), gotcg.ParseOpts{AllowPadding: true})
			require.NoError(t, err)
			assert.Len(t, events, len(recs))
			// go-eventlog checks the registers the log has events for.
			for i := 0; i < 4; i++ {
				if i < 3 && !eventlog.CoversBoot(recs) || i == 3 && recs[len(recs)-1].AAEL == nil {
					continue
				}
				bad := mr
				bad[i][0] ^= 1
				_, err = gotcg.ParseAndReplay(log, rtmrBank(bad), gotcg.ParseOpts{AllowPadding: true})
				require.Error(t, err, "RTMR%d", i)
			}
		})
	}
}

func TestMeasurements(t *testing.T) {
	bin, err := evidence.BinaryEvent("/usr/bin/ollama", []byte{1, 2})
	require.NoError(t, err)
	model, err := evidence.ModelEvent("tinyllama:latest", []byte{0xab})
	require.NoError(t, err)
	assert.Equal(t, `{"path":"/usr/bin/ollama","sha384":"0102"}`, bin.Content)
	assert.Equal(t, `{"manifest_sha256":"ab","name":"tinyllama:latest"}`, model.Content)
	log := append(fixture(t, "eventlogs/trustee-CCEL_AAEL_alibabacloud")[:0:0], fixture(t, "eventlogs/trustee-CCEL_AAEL_alibabacloud")...)
	log = log[:len(log)-8]
	log = append(append(append(log, eventlog.EncodeAAEL(bin)...), eventlog.EncodeAAEL(model)...), tcg.EndMarker...)
	recs, err := eventlog.Parse(log)
	require.NoError(t, err)
	ms, mi := eventlog.Measurements(recs)
	require.Len(t, ms, 4)
	assert.Equal(t, "coco.com", ms[0].Domain)
	assert.Equal(t, bin, ms[2].Event)
	d := evidence.AAELDigest(model)
	assert.Equal(t, hex.EncodeToString(d[:]), ms[3].Digest)
	require.NotNil(t, mi)
	assert.Equal(t, evidence.ModelInfo{Name: "tinyllama:latest", ManifestSHA256: "ab"}, *mi)

	ms, mi = eventlog.Measurements(nil)
	assert.NotNil(t, ms)
	assert.Empty(t, ms)
	assert.Nil(t, mi)
}

func BenchmarkParseReplayCCEL(b *testing.B) {
	raw := fixture(b, "tdx/cos-113-ccel_data.dat")
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		recs, err := eventlog.Parse(raw)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := eventlog.Replay(recs); err != nil {
			b.Fatal(err)
		}
	}
}

// A log of more than MaxRecords records is refused, whatever their size: a hostile bundle
// of tiny records must not make a verifier allocate gigabytes.
func TestParseRecordLimit(t *testing.T) {
	rec := eventlog.EncodeAAEL(evidence.Event{Domain: "a", Operation: "b", Content: "c"})
	_, err := eventlog.Parse(bytes.Repeat(rec, eventlog.MaxRecords))
	require.NoError(t, err)
	_, err = eventlog.Parse(bytes.Repeat(rec, eventlog.MaxRecords+1))
	require.ErrorIs(t, err, eventlog.ErrMalformed)
	require.Contains(t, err.Error(), "more than 65536 records")
}

// The bundle's model (Measurements, as serve fills it) and the verifier's are one rule: the
// last cai-agent Model event, unless an RTMR3 record that is not an AAEL event follows it.
func TestLastModelHiddenByLaterRecord(t *testing.T) {
	m, err := evidence.ModelEvent("cai-tiny", make([]byte, 32))
	require.NoError(t, err)
	// An RTMR3 record (MR index 4) whose data is not an AAEL event.
	data := []byte("opaque")
	other := binary.LittleEndian.AppendUint32(nil, eventlog.MRIndexRTMR3)
	other = binary.LittleEndian.AppendUint32(other, 0x0d) // EV_IPL
	other = binary.LittleEndian.AppendUint32(other, 1)
	other = binary.LittleEndian.AppendUint16(other, eventlog.AlgSHA384)
	other = append(other, make([]byte, 48)...)
	other = binary.LittleEndian.AppendUint32(other, uint32(len(data)))
	other = append(other, data...)

	recs, err := eventlog.Parse(eventlog.EncodeAAEL(m))
	require.NoError(t, err)
	_, model := eventlog.Measurements(recs)
	require.NotNil(t, model)
	assert.Equal(t, "cai-tiny", model.Name)

	recs, err = eventlog.Parse(append(eventlog.EncodeAAEL(m), other...))
	require.NoError(t, err)
	ms, model := eventlog.Measurements(recs)
	assert.Nil(t, model)
	assert.Len(t, ms, 1)
	model, err = eventlog.LastModel(recs)
	assert.NoError(t, err)
	assert.Nil(t, model)

	// A malformed last Model event is an error for LastModel and no model for the bundle.
	bad := evidence.Event{Domain: evidence.Domain, Operation: evidence.OpModel, Content: `{"name":"x"}`}
	recs, err = eventlog.Parse(append(eventlog.EncodeAAEL(m), eventlog.EncodeAAEL(bad)...))
	require.NoError(t, err)
	_, err = eventlog.LastModel(recs)
	require.ErrorIs(t, err, eventlog.ErrMalformed)
	_, model = eventlog.Measurements(recs)
	assert.Nil(t, model)
}
