package modelcrypt

import (
	"crypto/sha256"
	"hash"
)

// pipeHasher hashes buffers, in the order they are sent, on its own goroutine, so a lane's
// SHA-256 (1.7 GB/s on one core, the slowest stage) overlaps with reading, AES-GCM and
// writing on another core. Buffers come from a small fixed ring (constant memory): take one
// with get, fill it, pass a prefix to hash; the hasher returns it to the ring when done.
//
// With inline set it hashes synchronously in hash (one buffer, no goroutine): used when
// there is only one worker, and by benchmarks to compare.
type pipeHasher struct {
	h      hash.Hash
	n      int // ring size
	inline bool
	work   chan []byte
	free   chan []byte
	done   chan struct{}
}

// pipelining enables the optimisations for a file that dominates the remaining work (a
// hasher goroutine, or a lone shard's chunks spread over the workers); benchmarks switch it
// off to compare.
var pipelining = true

// pipeRingBytes bounds the memory of one ring: 4 buffers, fewer for big chunks (min 2).
const pipeRingBytes = 8 << 20

func newPipeHasher(bufSize int, inline bool) *pipeHasher {
	n := max(2, min(4, pipeRingBytes/bufSize))
	if inline {
		n = 1
	}
	p := &pipeHasher{h: sha256.New(), n: n, inline: inline, work: make(chan []byte, n),
		free: make(chan []byte, n), done: make(chan struct{})}
	for range p.n {
		p.free <- make([]byte, bufSize)
	}
	if inline {
		close(p.done)
		return p
	}
	go func() {
		defer close(p.done)
		for b := range p.work {
			p.h.Write(b)
			p.free <- b[:cap(b)]
		}
	}()
	return p
}

// get returns a free buffer (full capacity).
func (p *pipeHasher) get() []byte { return <-p.free }

// hash queues b (a prefix of a buffer from get) to be hashed; the buffer is owned by the
// hasher until it comes back from get.
func (p *pipeHasher) hash(b []byte) {
	if p.inline {
		p.h.Write(b)
		p.free <- b[:cap(b)]
		return
	}
	p.work <- b
}

// put returns a buffer from get that will not be hashed.
func (p *pipeHasher) put(b []byte) { p.free <- b[:cap(b)] }

// wait blocks until every queued buffer was hashed.
func (p *pipeHasher) wait() {
	bufs := make([][]byte, 0, p.n)
	for range p.n {
		bufs = append(bufs, <-p.free)
	}
	for _, b := range bufs {
		p.free <- b
	}
}

// sum waits for pending work and writes the digest into d.
func (p *pipeHasher) sum(d *[32]byte) {
	p.wait()
	p.h.Sum(d[:0])
}

// reset waits for pending work and starts a new digest.
func (p *pipeHasher) reset() {
	p.wait()
	p.h.Reset()
}

// stop ends the hasher goroutine after pending work.
func (p *pipeHasher) stop() {
	if p.inline {
		return
	}
	close(p.work)
	<-p.done
}
