package evidencetest_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-configfs-tsm/report"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence/evidencetest"
)

// The tdx_guest provider's tdx_report_new (drivers/virt/coco/tdx-guest/tdx-guest.c) answers
// EINVAL to an inblob that is not exactly TDX_REPORTDATA_LEN (64) bytes; configfs-tsm's
// inblob write stores what was written, without padding. The fake must not be more lenient.
func TestTSMInblobMustBe64Bytes(t *testing.T) {
	quote, err := os.ReadFile(filepath.Join("..", "..", "testdata", "tdx", "cos-113-tdx-quote.dat"))
	require.NoError(t, err)
	c := evidencetest.TSM(quote, true, "tdx_guest")
	for _, n := range []int{0, 1, 32, 63} {
		_, err := report.Get(c, &report.Request{InBlob: bytes.Repeat([]byte{7}, n)})
		require.Error(t, err, "inblob of %d bytes", n)
	}
	rd := bytes.Repeat([]byte{7}, 64)
	resp, err := report.Get(c, &report.Request{InBlob: rd})
	require.NoError(t, err)
	off := evidencetest.ReportDataOffset(resp.OutBlob)
	require.Equal(t, rd, resp.OutBlob[off:off+64])
}
