package evidence

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// JSON cannot carry invalid UTF-8: encoding/json replaces each bad byte with U+FFFD, so two
// different nonces would give the same REPORTDATA (and one that serve, which accepts the
// UTF-8 string "\uFFFD…", would hand out). A nonce that is not valid UTF-8 is refused.
func TestNonceReportDataRefusesInvalidUTF8(t *testing.T) {
	_, err := NonceReportData("\xff\xfe-nonce", nil)
	require.Error(t, err)
	a, err := NonceReportData("\ufffd\ufffd-nonce", nil)
	require.NoError(t, err)
	b, err := NonceReportData("\ufffd\ufffe-nonce", nil)
	require.NoError(t, err)
	require.NotEqual(t, a, b)
}
