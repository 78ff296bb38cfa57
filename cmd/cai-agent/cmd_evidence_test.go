package main

import (
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), append([]string{"cai-agent", "--state-dir", t.TempDir()}, args...), nil, &out, &errb)
	return code, out.String(), errb.String()
}

func repoFixture(rel string) string { return filepath.Join("..", "..", "testdata", rel) }

// The real COS-113 CCEL replays to its real quote; not to an unrelated one (exit 10).
func TestEventlogReplayRealFixtures(t *testing.T) {
	code, out, errs := runCLI(t, "eventlog", "replay", "--json",
		"--eventlog", repoFixture("tdx/cos-113-ccel_data.dat"), "--quote", repoFixture("tdx/cos-113-tdx-quote.dat"))
	require.Equal(t, ExitOK, code, errs)
	var res struct {
		RTMR         []string `json:"rtmr"`
		MatchesQuote *bool    `json:"matches_quote"`
		Compared     []int    `json:"compared"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	require.NotNil(t, res.MatchesQuote)
	assert.True(t, *res.MatchesQuote)
	assert.Equal(t, []int{0, 1, 2, 3}, res.Compared)
	assert.Len(t, res.RTMR, 4)

	code, out, _ = runCLI(t, "eventlog", "replay", "--json",
		"--eventlog", repoFixture("tdx/cos-113-ccel_data.dat"), "--quote", repoFixture("tdx/quote_v5_sample.dat"))
	assert.Equal(t, ExitVerify, code)
	assert.Contains(t, out, `"matches_quote":false`)

	// No quote: replay only, matches_quote null.
	code, out, _ = runCLI(t, "eventlog", "replay", "--json", "--eventlog", repoFixture("eventlogs/trustee-CCEL_data"))
	require.Equal(t, ExitOK, code)
	assert.Contains(t, out, `"matches_quote":null`)
	assert.Contains(t, out, "2dc712306a963eadb894ad47dbaa17df44814151555aee11cbb843becca88950ffd079664902e6f22c66f7c8213543f4")
}

// Trustee's CCEL with two AAEL events: show lists them with domain/operation/content.
func TestEventlogShowTrusteeAAEL(t *testing.T) {
	code, out, errs := runCLI(t, "eventlog", "show", "--json", "--eventlog", repoFixture("eventlogs/trustee-CCEL_AAEL_alibabacloud"))
	require.Equal(t, ExitOK, code, errs)
	var evs []map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &evs))
	require.Len(t, evs, 87)
	last := evs[86]
	assert.EqualValues(t, 4, last["mr_index"])
	assert.EqualValues(t, 6, last["type"])
	assert.Equal(t, "coco.com", last["domain"])
	assert.Equal(t, "some-operation", last["operation"])
	assert.Equal(t, `{"key": "value", "nested-key": {"sub-key": "value"}}`, last["content"])
	assert.Equal(t, "82b3e7dd09cbe55777a6eeed67614e9e5a25508ec1cd03ecbfbe10c913fa76ed451fbc275babc6a01a8e5c08e853419b", last["digest"])
	assert.Equal(t, "some-content", evs[85]["content"])
	assert.NotContains(t, evs[0], "domain")
}
