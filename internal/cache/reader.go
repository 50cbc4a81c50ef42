package cache

import (
	"errors"
	"fmt"
	"io"
	"sync/atomic"

	"github.com/opencontainers/go-digest"
)

// Reader reads one blob through the cache: present blocks come from disk, missing ones from the source in
// BlockSize-aligned runs (adjacent missing blocks in one source read), which are stored and then served.
// Concurrent readers of a missing block wait for one fetch. A Reader is an io.ReaderAt, safe for concurrent use.
type Reader struct {
	c    *Cache
	b    *blob // nil: no caching for this blob, every read goes to src
	key  digest.Digest
	size int64
	src  io.ReaderAt

	hits, misses atomic.Int64 // this Reader's share of the Cache's counters
}

// Reader returns a Reader for the blob key of size bytes, whose bytes come from src (typically the registry blob).
// If key is not a valid digest, or the cache holds the blob with another size and cannot drop it now, or the
// cache is closed, the Reader reads src directly.
func (c *Cache) Reader(key digest.Digest, size int64, src io.ReaderAt) *Reader {
	r := &Reader{c: c, key: key, size: size, src: src}
	if err := key.Validate(); err != nil || size < 0 {
		c.log.Warn("cache: not caching a blob with an invalid digest or size", "blob", key, "size", size, "err", err)
		return r
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return r
	}
	b := c.blobs[key]
	if b == nil {
		b = c.newBlob(key, size)
		c.blobs[key] = b
	} else if b.size != size {
		freed, _ := b.evict(0, b.nblocks-1, -1, true, false)
		c.used -= freed
		b.stateMu.Lock()
		b.mu.Lock()
		reset := b.presentBytes == 0 && len(b.pins) == 0 && len(b.inflight) == 0
		if reset {
			b.resetLocked(size)
		}
		b.mu.Unlock()
		b.stateMu.Unlock()
		c.log.Warn("cache: blob opened with another size than cached; dropped its cached blocks",
			"blob", key, "size", size, "reset", reset)
		if !reset {
			return r
		}
	}
	b.touch()
	r.b = b
	return r
}

// Size returns the blob's size.
func (r *Reader) Size() int64 { return r.size }

// Stats returns the blocks this Reader served from disk (hits) and fetched or waited for (misses); reads of a
// Reader that does not cache count as neither.
func (r *Reader) Stats() (hits, misses int64) { return r.hits.Load(), r.misses.Load() }

// ReadAt reads len(p) bytes at off. It reads less only at the end of the blob, and then returns io.EOF.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("cache: blob %s: negative offset %d", r.key, off)
	}
	if off >= r.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), r.size-off))
	if n == 0 {
		return 0, nil
	}
	var err error
	if r.b == nil || r.c.closed.Load() {
		err = r.readSrc(p[:n], off)
	} else {
		err = r.readCached(p[:n], off)
	}
	if err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readSrc fills p from the source.
func (r *Reader) readSrc(p []byte, off int64) error {
	m, err := r.src.ReadAt(p, off)
	r.c.bytesFetched.Add(int64(m))
	if m == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// segment is a run of blocks of one read served the same way: from disk (f nil) or from a fetch.
type segment struct {
	first, last int64
	f           *fetch
}

// readCached fills p (inside the blob) through the cache.
func (r *Reader) readCached(p []byte, off int64) error {
	b, bs := r.b, r.c.opts.BlockSize
	first, last := off/bs, (off+int64(len(p))-1)/bs
	pin := pinRange{first, last}
	var segs []segment
	var own []*fetch
	var hits, misses int64

	b.mu.Lock()
	if b.size != r.size {
		b.mu.Unlock()
		return r.readSrc(p, off)
	}
	b.pins = append(b.pins, pin)
	for i := first; i <= last; i++ {
		var f *fetch
		switch g := b.inflight[i]; {
		case bitSet(b.present, i):
			hits++
		case g != nil:
			f = g
			misses++
		default:
			misses++
			if k := len(own) - 1; k >= 0 && own[k].last == i-1 && (i-own[k].first+1)*bs <= maxRun {
				f = own[k]
				f.last = i
			} else {
				f = &fetch{first: i, last: i, done: make(chan struct{})}
				own = append(own, f)
			}
			b.inflight[i] = f
		}
		if k := len(segs) - 1; k >= 0 && segs[k].f == f {
			segs[k].last = i
		} else {
			segs = append(segs, segment{i, i, f})
		}
	}
	b.mu.Unlock()
	defer b.unpin(pin)
	b.touch()
	r.c.hits.Add(hits)
	r.c.misses.Add(misses)
	r.hits.Add(hits)
	r.misses.Add(misses)

	for _, f := range own {
		r.fill(f)
	}
	end := off + int64(len(p))
	for _, s := range segs {
		lo, hi := max(off, s.first*bs), min(end, (s.last+1)*bs)
		dst := p[lo-off : hi-off]
		if s.f == nil {
			if err := r.readDisk(dst, lo); err != nil {
				if !r.c.closed.Load() { // after Close, the data files are closed on purpose
					r.c.log.Warn("cache: cannot read cached blocks; dropping them and reading the source", "blob", r.key, "err", err)
					_ = r.Evict(lo, hi-lo)
				}
				if err := r.readSrc(dst, lo); err != nil {
					return err
				}
			}
			continue
		}
		<-s.f.done
		if s.f.err != nil {
			return s.f.err
		}
		copy(dst, s.f.buf[lo-s.f.first*bs:])
	}
	return nil
}

// readDisk fills dst from the data file at off.
func (r *Reader) readDisk(dst []byte, off int64) error {
	b := r.b
	b.mu.Lock()
	f, err := b.openFileLocked(false)
	b.mu.Unlock()
	if err != nil {
		return err
	}
	m, err := f.ReadAt(dst, off)
	if m == len(dst) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// fill performs the source read of fetch f, stores the bytes and wakes the readers waiting for them.
func (r *Reader) fill(f *fetch) {
	b, bs := r.b, r.c.opts.BlockSize
	start := f.first * bs
	buf := make([]byte, min((f.last+1)*bs, r.size)-start)
	err := r.readSrc(buf, start)
	if err == nil {
		r.store(f, buf, start)
	}
	b.mu.Lock()
	for i := f.first; i <= f.last; i++ {
		delete(b.inflight, i)
	}
	b.mu.Unlock()
	f.buf, f.err = buf, err
	close(f.done)
}

// store writes fetched blocks to the data file and marks them present; when it cannot, the blocks simply stay
// missing.
func (r *Reader) store(f *fetch, buf []byte, start int64) {
	c, b := r.c, r.b
	n := int64(len(buf))
	if !c.reserve(b, n) {
		if !c.closed.Load() {
			c.storeFailures.Add(1)
			c.noteStore(errors.New("the capacity is taken by blocks of ongoing reads"))
		}
		return
	}
	b.mu.Lock()
	if c.closed.Load() { // Close is closing the data files: do not reopen them
		b.mu.Unlock()
		c.release(n)
		return
	}
	file, err := b.openFileLocked(true)
	b.mu.Unlock()
	if err == nil {
		_, err = file.WriteAt(buf, start)
	}
	if err != nil {
		c.release(n)
		if !c.closed.Load() {
			c.storeFailures.Add(1)
			c.noteStore(err)
		}
		return
	}
	b.markPresent(f.first, f.last)
	c.noteStore(nil)
}

// Evict drops the cached blocks overlapping [off, off+n), so that the next read fetches them again (used when
// the bytes read from the cache fail a checksum). Ongoing reads of those blocks are not disturbed.
func (r *Reader) Evict(off, n int64) error {
	if off < 0 || n < 0 {
		return fmt.Errorf("cache: blob %s: bad range %d+%d to evict", r.key, off, n)
	}
	b := r.b
	if b == nil || n == 0 || off >= r.size || r.c.closed.Load() {
		return nil
	}
	bs := r.c.opts.BlockSize
	first, last := off/bs, (min(off+n, r.size)-1)/bs
	c := r.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if b.size != r.size {
		return nil
	}
	freed, err := b.evict(first, last, -1, false, true)
	c.used -= freed
	if err != nil {
		return fmt.Errorf("cache: blob %s: evicted blocks are forgotten but not yet recorded: %w", r.key, err)
	}
	return nil
}
