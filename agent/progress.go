package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	"github.com/cai-agent/cai-agent/crypto/modelcrypt"
)

type progressCounter struct{ n atomic.Int64 }

func (p *progressCounter) add(n int64) int64 { return p.n.Add(n) }

// errSource wraps a Source so that its failures (other than io.EOF) match ErrSource.
type errSource struct{ modelcrypt.Source }

func (s errSource) Open(ctx context.Context, name string, off int64) (io.ReadCloser, error) {
	rc, err := s.Source.Open(ctx, name, off)
	if err != nil {
		return nil, sourceErr(err)
	}
	return errReader{rc}, nil
}

type errReader struct{ io.ReadCloser }

func (r errReader) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		err = sourceErr(err)
	}
	return n, err
}

func sourceErr(err error) error {
	if errors.Is(err, ErrSource) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrSource, err)
}
