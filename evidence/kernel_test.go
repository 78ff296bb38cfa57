package evidence

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/cai-agent/cai-agent/evidence/rtmr"
	"github.com/cai-agent/cai-agent/evidence/rtmr/rtmrtest"
)

// On mainline Linux 6.2–6.15 /dev/tdx_guest exists but only reads (TDX_CMD_GET_REPORT0):
// a measurement fails as not supported, and leaves RTMR3, the log and the state directory
// as they were.
func TestMeasureIoctlDeviceWithoutExtend(t *testing.T) {
	e := newEnv(t)
	e.k = &rtmrtest.Kernel{Root: e.root, Ioctl: true, NoExtend: true}
	p := e.open(t, TEETDX)
	_, err := p.Measure(context.Background(), Event{Domain: Domain, Operation: "Test", Content: "x"})
	require.ErrorIs(t, err, ErrMeasure)
	require.ErrorIs(t, err, rtmr.ErrNotSupported)
	assert.Equal(t, 0, e.k.Extends())
	assert.Equal(t, 0, requireConsistent(t, p))
	fi, err := os.Stat(filepath.Join(e.state, EventLogFile))
	if err == nil {
		assert.Zero(t, fi.Size())
	}
	_, err = p.Attest(context.Background(), [64]byte{})
	require.NoError(t, err)
}
