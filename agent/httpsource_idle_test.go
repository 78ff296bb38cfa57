package agent

import (
	"context"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// lateBody delivers its last bytes together with io.EOF, but only once the idle timer has
// fired (cancel was called): the race of a body that ends just as the idle timeout expires.
type lateBody struct {
	data      []byte
	cancelled chan struct{}
}

func (b *lateBody) Read(p []byte) (int, error) {
	<-b.cancelled
	n := copy(p, b.data)
	b.data = b.data[n:]
	if len(b.data) == 0 {
		return n, io.EOF
	}
	return n, nil
}

func (b *lateBody) Close() error { return nil }

// The end of a body that arrives as the idle timer fires is still the end of the object,
// not a stalled transfer to resume (a resume at the object's end gets 416 and fails).
func TestHTTPSourceIdleTimerRacesEOF(t *testing.T) {
	s := &HTTPSource{retries: 0, idle: time.Nanosecond, backoff: time.Millisecond}
	cancelled := make(chan struct{})
	r := &httpReader{s: s, ctx: context.Background(), name: "obj", pos: 10, total: 15,
		body: &cancelBody{ReadCloser: &lateBody{data: []byte("world"), cancelled: cancelled}, cancel: sync.OnceFunc(func() { close(cancelled) })}}
	got, err := io.ReadAll(r)
	require.NoError(t, err)
	require.Equal(t, "world", string(got))
	require.EqualValues(t, 15, r.pos)
}
