package agent

import (
	"context"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/kbc"
	"github.com/cai-agent/cai-agent/kbc/kbstest"
	"github.com/cai-agent/cai-agent/kbc/trustee"
)

// The Trustee test server: released with sample evidence; refused by policy; evidence fails.
func TestRunTrustee(t *testing.T) {
	dir, key, plain := testModel(t, 50<<10)
	for _, tc := range []struct {
		name     string
		attester evidence.Attester
		allowed  []string
		is       error
	}{
		{name: "released", attester: kbstest.SampleAttester{}},
		{name: "policy denies", attester: kbstest.SampleAttester{}, allowed: []string{evidence.TEETDX}, is: kbc.ErrRefused},
		{name: "evidence fails", attester: kbstest.SampleAttester{Err: evidence.ErrQuote}, is: evidence.ErrQuote},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kbs := kbstest.NewTrustee()
			kbs.AllowedTEEs = tc.allowed
			require.NoError(t, kbs.SetResource(testResource, key))
			srv := httptest.NewServer(kbs)
			defer srv.Close()
			broker, err := trustee.New(trustee.Options{URL: srv.URL, Attester: tc.attester, HTTP: kbc.HTTPOptions{InsecureHTTP: true, Retries: -1}})
			require.NoError(t, err)
			out := filepath.Join(t.TempDir(), "out")
			tee := &fakeTEE{}
			_, err = Run(context.Background(), Config{Source: modelcrypt.DirSource(dir), Out: out, Evidence: tee, Broker: broker, AllowNonTmpfs: true})
			if tc.is == nil {
				require.NoError(t, err)
				requirePublished(t, out, plain)
				return
			}
			var se *StepError
			require.ErrorAs(t, err, &se)
			require.Equal(t, StepGetKey, se.Step)
			require.ErrorIs(t, err, tc.is)
			requireNothingPublished(t, out, plain)
			require.Empty(t, tee.ops())
		})
	}
}
