package pull

import (
	"context"
	"io"

	"github.com/obdproject/obd/internal/registry"
)

// Sizes of a ranged download (see rangedReader): with 20 ms of round trip, 8 requests of 4 MiB in flight keep a
// 1 Gbit/s link busy (its bandwidth-delay product is 2.5 MB) while each request is long enough for its TCP window
// to stay open. DownloadAhead chunks may wait for the reader beyond those in flight, so that a slow request does
// not stop the others from being replaced as they finish; memory stays below 64 MiB per blob.
const (
	DownloadChunk       = 4 << 20
	DownloadConcurrency = 8
	DownloadAhead       = 8
)

// rangedReader streams a registry blob in order while it fetches it with several range requests in flight. Each
// chunk is retried by the registry client; a chunk that fails fails the stream.
type rangedReader struct {
	ctx     context.Context
	cancel  context.CancelFunc
	futures chan *chunk
	cur     []byte
	err     error
}

// chunk is one range request of a rangedReader.
type chunk struct {
	buf  []byte
	err  error
	done chan struct{}
}

// newRangedReader returns the blob's bytes in order, fetched chunkSize bytes a request with concurrency requests
// in flight: a request starts as soon as one finishes, while at most ahead finished chunks wait for the reader.
// progress (optional) is called with the bytes of each chunk fetched.
func newRangedReader(ctx context.Context, b *registry.Blob, chunkSize int64, concurrency, ahead int, progress func(n int64)) io.ReadCloser {
	ctx, cancel := context.WithCancel(ctx)
	r := &rangedReader{ctx: ctx, cancel: cancel, futures: make(chan *chunk, concurrency+ahead-1)}
	inflight := make(chan struct{}, concurrency)
	go func() {
		defer close(r.futures)
		for off := int64(0); off < b.Size(); off += chunkSize {
			c := &chunk{buf: make([]byte, min(chunkSize, b.Size()-off)), done: make(chan struct{})}
			select {
			case r.futures <- c:
			case <-ctx.Done():
				return
			}
			select {
			case inflight <- struct{}{}:
			case <-ctx.Done():
				c.err = ctx.Err()
				close(c.done)
				return
			}
			go func(off int64) {
				defer close(c.done)
				_, c.err = b.ReadAtContext(ctx, c.buf, off)
				<-inflight
				if c.err == nil && progress != nil {
					progress(int64(len(c.buf)))
				}
			}(off)
		}
	}()
	return r
}

func (r *rangedReader) Read(p []byte) (int, error) {
	for len(r.cur) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		c, ok := <-r.futures
		if !ok {
			// The producer stops early only when the context ends.
			if r.err = r.ctx.Err(); r.err == nil {
				r.err = io.EOF
			}
			continue
		}
		<-c.done
		r.cur, r.err = c.buf, c.err
		if r.err != nil {
			r.cur = nil
		}
	}
	n := copy(p, r.cur)
	r.cur = r.cur[n:]
	return n, nil
}

// Close stops the requests in flight.
func (r *rangedReader) Close() error {
	r.cancel()
	for c := range r.futures {
		<-c.done
	}
	return nil
}
