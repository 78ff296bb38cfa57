package kbstest_test

import (
	"context"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence"
	"github.com/cai-agent/cai-agent/evidence/evidencetest"
	"github.com/cai-agent/cai-agent/evidence/rtmr/rtmrtest"
	"github.com/cai-agent/cai-agent/kbc"
	"github.com/cai-agent/cai-agent/kbc/ita"
	"github.com/cai-agent/cai-agent/kbc/kbstest"
	"github.com/cai-agent/cai-agent/kbc/trustee"
)

// The clients with the real evidence runtime (evidence.Platform): TDX through a fake
// configfs-tsm serving a real quote with REPORTDATA patched, after a measurement into RTMR3
// (so cc_eventlog is sent), and the sample TEE.
func TestWithEvidencePlatform(t *testing.T) {
	root := t.TempDir()
	for _, tc := range []struct {
		tee   string
		quote string
	}{{evidence.TEETDX, "trustee-tdx_quote_4.dat"}, {evidence.TEETDX, "trustee-tdx_quote_5.dat"}, {evidence.TEESample, ""}} {
		t.Run(tc.tee+tc.quote, func(t *testing.T) {
			opts := evidence.Options{TEE: tc.tee, StateDir: filepath.Join(t.TempDir(), "state"), Root: root, Kernel: &rtmrtest.Kernel{Root: root, Sysfs: true}}
			if tc.quote != "" {
				opts.TSM = evidencetest.TSM(fixture(t, tc.quote), true, "tdx_guest")
			}
			p, err := evidence.Open(context.Background(), opts)
			require.NoError(t, err)
			t.Cleanup(func() { p.Close() })
			_, err = p.Measure(t.Context(), evidence.Event{Domain: evidence.Domain, Operation: "Test", Content: "kbc"})
			require.NoError(t, err)

			ts := kbstest.NewTrustee()
			require.NoError(t, ts.SetResource(trusteeURI, secret))
			srv := httptest.NewServer(ts)
			t.Cleanup(srv.Close)
			c, err := trustee.New(trustee.Options{URL: srv.URL, Attester: p, HTTP: kbc.HTTPOptions{InsecureHTTP: true}})
			require.NoError(t, err)
			got, err := c.GetResource(t.Context(), trusteeURI)
			require.NoError(t, err)
			require.Equal(t, secret, got)

			if tc.tee != evidence.TEETDX {
				return
			}
			is := kbstest.NewITA()
			require.NoError(t, is.SetKey(itaKeyID, secret))
			isrv := httptest.NewServer(is)
			t.Cleanup(isrv.Close)
			ic, err := ita.New(ita.Options{URL: isrv.URL, Attester: p, Nonce: true, HTTP: kbc.HTTPOptions{InsecureHTTP: true}})
			require.NoError(t, err)
			got, err = ic.GetResource(t.Context(), itaKeyID)
			require.NoError(t, err)
			require.Equal(t, secret, got)
		})
	}
}
