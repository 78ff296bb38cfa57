package verify

import (
	"context"
	"errors"
	"sync"
	"testing"

	test "github.com/google/go-tdx-guest/testing"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type recordingGetter struct {
	mu   sync.Mutex
	urls []string
}

func (g *recordingGetter) Get(url string) (map[string][]string, []byte, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.urls = append(g.urls, url)
	return nil, nil, errors.New("offline")
}

// --collateral asks Intel PCS (through the injectable getter) for the quote's FMSPC and fails
// closed when collateral is unavailable. Never online in tests.
func TestCollateralFailsClosed(t *testing.T) {
	ctx := context.Background()
	g := &recordingGetter{}
	_, err := VerifyQuote(ctx, fixture(t, "tdx_prod_quote_SPR_E4.dat"), Options{Now: date(2024, 1, 1), Collateral: true, Getter: g})
	require.ErrorIs(t, err, ErrSignature)
	require.NotEmpty(t, g.urls)
	assert.Contains(t, g.urls[0], "api.trustedservices.intel.com/tdx/certification/v4/tcb?fmspc=50806f000000")

	// go-tdx-guest's recorded 2023 PCS responses: collateral is fetched, its signatures and
	// dates checked, and this platform's TCB matched against it — which finds no level for
	// this quote (as upstream's own test expects), so verification fails.
	_, err = VerifyQuote(ctx, fixture(t, "tdx_prod_quote_SPR_E4.dat"), Options{Now: date(2023, 7, 1), Collateral: true, Getter: test.TestGetter})
	require.ErrorIs(t, err, ErrSignature)
	assert.Contains(t, err.Error(), "TCB status check: no matching TCB level found")
}
