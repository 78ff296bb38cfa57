package serve

import (
	"context"
	"errors"
	"sync/atomic"
)

// errBusy: the queue is full.
var errBusy = errors.New("too many evidence requests waiting")

// queue serializes quote generation: one holder at a time, at most max waiters beyond it.
// A request that cannot even wait is refused at once (errBusy).
type queue struct {
	slot chan struct{} // capacity 1: the token of the single holder
	in   atomic.Int64  // holder + waiters
	max  int64         // waiters allowed beyond the holder
}

func newQueue(maxWaiters int) *queue {
	return &queue{slot: make(chan struct{}, 1), max: int64(maxWaiters)}
}

// acquire waits for the slot. It fails with errBusy when 1+max requests are already in the
// queue, or with ctx's error when ctx ends first. On success the caller must call release.
func (q *queue) acquire(ctx context.Context) error {
	if q.in.Add(1) > q.max+1 {
		q.in.Add(-1)
		return errBusy
	}
	select {
	case q.slot <- struct{}{}:
		return nil
	case <-ctx.Done():
		q.in.Add(-1)
		return ctx.Err()
	}
}

func (q *queue) release() {
	<-q.slot
	q.in.Add(-1)
}

// depth returns how many requests hold or wait for the slot.
func (q *queue) depth() int { return int(q.in.Load()) }
