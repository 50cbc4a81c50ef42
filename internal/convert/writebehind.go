package convert

import (
	"errors"
	"io"
	"io/fs"
	"sync"

	"github.com/obdproject/obd/lsmt"
)

// Write-behind buffers: wbBufs of wbBufSize bytes, so at most wbBufs*wbBufSize bytes wait in memory.
const (
	wbBufSize = 1 << 20
	wbBufs    = 8
)

// writeBehind is a layer's data file whose appends are copied into memory and written to the file by a goroutine
// of its own, in 1 MiB writes: the applier neither waits for the page cache nor makes a system call per small
// file. Reads see every write made so far. Writes that do not append (the header) wait for the queue to drain
// and go straight to the file. The first error of a background write is returned by every later call.
type writeBehind struct {
	f       lsmt.WriteAtFile
	mu      sync.Mutex
	drained *sync.Cond // signalled when a buffer has been written
	cur     *wbBuf     // being filled; nil when none
	pending []*wbBuf   // queued or being written, oldest first
	free    chan *wbBuf
	queue   chan *wbBuf
	exited  chan struct{}
	size    int64 // the file's size with everything written
	err     error // the first error of a background write
	closed  bool
}

type wbBuf struct {
	off int64
	b   []byte
}

// wbPool keeps buffers from one layer to the next.
var wbPool = sync.Pool{New: func() any { return &wbBuf{b: make([]byte, 0, wbBufSize)} }}

func newWriteBehind(f lsmt.WriteAtFile) (*writeBehind, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	w := &writeBehind{f: f, size: st.Size(), free: make(chan *wbBuf, wbBufs), queue: make(chan *wbBuf, wbBufs), exited: make(chan struct{})}
	w.drained = sync.NewCond(&w.mu)
	for range wbBufs {
		w.free <- wbPool.Get().(*wbBuf)
	}
	go w.writer()
	return w, nil
}

func (w *writeBehind) writer() {
	defer close(w.exited)
	for b := range w.queue {
		_, err := w.f.WriteAt(b.b, b.off)
		w.mu.Lock()
		if err != nil && w.err == nil {
			w.err = err
		}
		w.pending = w.pending[1:]
		w.drained.Broadcast()
		w.mu.Unlock()
		b.b = b.b[:0]
		w.free <- b
	}
}

// writable says why the file takes no writes. The caller holds w.mu.
func (w *writeBehind) writable() error {
	if w.err != nil {
		return w.err
	}
	if w.closed {
		return errClosed
	}
	return nil
}

// send queues the buffer being filled. The caller holds w.mu.
func (w *writeBehind) send() {
	if w.cur == nil {
		return
	}
	if len(w.cur.b) == 0 {
		w.free <- w.cur
	} else {
		w.pending = append(w.pending, w.cur)
		w.queue <- w.cur // never blocks: there are no more buffers than queue slots
	}
	w.cur = nil
}

// drain waits until everything written so far is in the file. The caller holds w.mu.
func (w *writeBehind) drain() error {
	w.send()
	for len(w.pending) > 0 {
		w.drained.Wait()
	}
	return w.err
}

func (w *writeBehind) WriteAt(p []byte, off int64) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.writable(); err != nil {
		return 0, err
	}
	if off != w.size {
		// Not an append: write through, after what is queued.
		if err := w.drain(); err != nil {
			return 0, err
		}
		n, err := w.f.WriteAt(p, off)
		w.size = max(w.size, off+int64(n))
		return n, err
	}
	done := 0
	for done < len(p) {
		if w.cur != nil && len(w.cur.b) == cap(w.cur.b) {
			w.send()
		}
		if w.cur == nil {
			w.mu.Unlock() // the writer needs the lock to hand buffers back
			b := <-w.free
			w.mu.Lock()
			if w.err != nil {
				w.free <- b
				return done, w.err
			}
			b.off, w.cur = off+int64(done), b
		}
		n := copy(w.cur.b[len(w.cur.b):cap(w.cur.b)], p[done:])
		w.cur.b = w.cur.b[:len(w.cur.b)+n]
		done += n
		w.size += int64(n)
	}
	return done, nil
}

func (w *writeBehind) ReadAt(p []byte, off int64) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		return 0, w.err
	}
	if off >= w.size {
		return 0, io.EOF
	}
	q := p[:min(int64(len(p)), w.size-off)]
	// What the file holds, then what is still in memory on top (a buffer leaves pending only under w.mu, after
	// its write, so a read racing with that write is corrected here).
	n, err := w.f.ReadAt(q, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, err
	}
	clear(q[n:])
	for _, b := range append(w.pending, w.cur) {
		if b == nil {
			continue
		}
		lo, hi := max(off, b.off), min(off+int64(len(q)), b.off+int64(len(b.b)))
		if lo < hi {
			copy(q[lo-off:hi-off], b.b[lo-b.off:hi-b.off])
		}
	}
	if len(q) < len(p) {
		return len(q), io.EOF
	}
	return len(q), nil
}

// sizedInfo reports the size with what is still in memory.
type sizedInfo struct {
	fs.FileInfo
	size int64
}

func (i sizedInfo) Size() int64 { return i.size }

func (w *writeBehind) Stat() (fs.FileInfo, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	st, err := w.f.Stat()
	if err != nil {
		return nil, err
	}
	return sizedInfo{st, w.size}, nil
}

func (w *writeBehind) Truncate(size int64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.writable(); err != nil {
		return err
	}
	if err := w.drain(); err != nil {
		return err
	}
	if err := w.f.Truncate(size); err != nil {
		return err
	}
	w.size = size
	return nil
}

// Flush waits until every write is in the file and returns the first error of any.
func (w *writeBehind) Flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.drain()
}

// Close flushes and stops the writer. Reads still work (straight from the file); writes do not.
func (w *writeBehind) Close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return w.err
	}
	err := w.drain()
	w.closed = true
	w.mu.Unlock()
	close(w.queue)
	<-w.exited
	for range wbBufs {
		wbPool.Put(<-w.free)
	}
	return err
}

var errClosed = errors.New("write-behind file closed")
