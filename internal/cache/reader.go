package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"
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

// ProgressReaderAt is a source that tells how a range read progresses (registry.Blob): the cache then serves the
// blocks of a fetch to the readers waiting for them as they arrive, not when the whole range has.
type ProgressReaderAt interface {
	// ReadAtProgress is ReadAt that calls progress(n), in order and with n growing, when the first n bytes of p
	// hold their bytes; they are not written again.
	ReadAtProgress(p []byte, off int64, progress func(n int)) (int, error)
}

// readSrc fills p from the source.
func (r *Reader) readSrc(p []byte, off int64) error {
	return r.readSrcProgress(p, off, nil)
}

// readSrcProgress is readSrc that calls progress as ProgressReaderAt does (once at the end for other sources).
func (r *Reader) readSrcProgress(p []byte, off int64, progress func(n int)) error {
	var m int
	var err error
	if ps, ok := r.src.(ProgressReaderAt); ok && progress != nil {
		m, err = ps.ReadAtProgress(p, off, progress)
	} else {
		m, err = r.src.ReadAt(p, off)
		if m == len(p) && progress != nil {
			progress(m)
		}
	}
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

// fetchKind says why a fetch was made.
type fetchKind int

const (
	fetchDemand    fetchKind = iota // a read needs the blocks now
	fetchReadahead                  // ahead of a sequential reader
	fetchPrefetch                   // asked for by Prefetch: never evicts to make room
	fetchDownload                   // a background download of the whole blob
)

// readCached fills p (inside the blob) through the cache.
func (r *Reader) readCached(p []byte, off int64) error {
	b, bs := r.b, r.c.opts.BlockSize
	first, last := off/bs, (off+int64(len(p))-1)/bs
	pin := pinRange{first, last}
	var segs []segment
	var own []*fetch
	var hits, misses, aheadHits int64

	b.mu.Lock()
	if b.size != r.size {
		b.mu.Unlock()
		return r.readSrc(p, off)
	}
	b.pins = append(b.pins, pin)
	// follow: the read continues what readahead is for, a reader missing the cache (a block not present, or one
	// readahead fetched). A read of blocks brought otherwise — by Prefetch of a recorded start, an import, a
	// download, earlier reads — does not move readahead: what a recorded start needs is fetched already, and
	// fetching beyond it would spend the link on blocks the start never reads.
	follow := false
	for i := first; i <= last; i++ {
		var f *fetch
		switch g := b.inflight[i]; {
		case bitSet(b.present, i):
			hits++
			ahead, ra := b.takeAhead(i)
			if ahead {
				aheadHits++
			}
			follow = follow || ra
		case g != nil:
			f = g
			misses++
			if ahead, _ := b.takeAhead(i); ahead {
				aheadHits++
			}
			follow = follow || g.kind != fetchPrefetch
		default:
			misses++
			follow = true
			b.takeAhead(i) // fetched ahead, then lost: it did not help
			if k := len(own) - 1; k >= 0 && own[k].last == i-1 && (i-own[k].first+1)*bs <= maxRun {
				f = own[k]
				f.last = i
			} else {
				f = newFetch(i, i, fetchDemand)
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
	// A miss fetches the missing blocks of its fetch unit with it: those after it in its own request, so that the
	// read's blocks come first, those before it in a request of their own, sent with it.
	if u := r.c.opts.FetchBytes / bs; u > 1 {
		for _, f := range own {
			lo, hi := f.first/u*u, min((f.last/u+1)*u-1, b.nblocks-1)
			var before *fetch
			for i := f.first - 1; i >= lo && !bitSet(b.present, i) && b.inflight[i] == nil; i-- {
				if before == nil {
					before = newFetch(i, i, fetchReadahead)
					own = append(own, before)
				}
				before.first = i
				b.inflight[i] = before
				b.setAhead(i, true)
			}
			for f.last < hi && !bitSet(b.present, f.last+1) && b.inflight[f.last+1] == nil {
				f.last++
				b.inflight[f.last] = f
				b.setAhead(f.last, true)
			}
		}
	}
	var ahead []*fetch
	if follow {
		ahead = r.readaheadLocked(off, off+int64(len(p)))
	}
	b.mu.Unlock()
	defer b.unpin(pin)
	b.touch()
	r.c.hits.Add(hits)
	r.c.misses.Add(misses)
	r.c.prefetchHits.Add(aheadHits)
	r.hits.Add(hits)
	r.misses.Add(misses)

	if len(ahead) > 0 {
		r.c.background.Add(1)
		go func() {
			r.fillAll(ahead)
			r.c.background.Add(-1)
		}()
	}
	// The read waits for its own blocks only, not for the rest of its fetch unit: each fetch is filled in the
	// background and the read takes its blocks as they arrive, like a reader waiting for another's fetch.
	r.c.background.Add(int64(len(own)))
	for _, f := range own {
		demand := f.kind == fetchDemand // not the blocks before the miss
		if demand {
			r.c.demand.Add(1)
		}
		go func() {
			r.fill(f)
			if demand {
				r.c.demand.Add(-1)
			}
			r.c.background.Add(-1)
		}()
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
		buf, err := s.f.wait(s.last)
		if err != nil {
			return err
		}
		if buf == nil { // a direct store has ended: its blocks are on disk, unless it failed to store them
			if err := r.readCached(dst, lo); err != nil {
				return err
			}
			continue
		}
		copy(dst, buf[lo-s.f.first*bs:])
	}
	return nil
}

// readaheadLocked follows the sequential readers of the blob. When the read of bytes [off, end) continues one (it
// starts where that reader's previous read ended, or less than a block after; a read of bytes read before, such as
// a second open of a layer reading its header again, continues none) and has consumed half of what
// was fetched ahead of it, the reader's window doubles (from two blocks up to Options.ReadaheadBytes) and the
// missing blocks of the next window are claimed; the caller fetches them in the background. b.mu is held.
func (r *Reader) readaheadLocked(off, end int64) []*fetch {
	b, bs := r.b, r.c.opts.BlockSize
	last := (end - 1) / bs
	maxWin := r.c.opts.ReadaheadBytes / bs
	if maxWin <= 0 {
		return nil
	}
	var s *stream
	lru := &b.streams[0]
	var clock int64
	for i := range b.streams {
		st := &b.streams[i]
		clock = max(clock, st.used)
		if st.window >= 0 && st.used > 0 && off >= st.end && off < st.end+bs {
			s = st
		}
		if st.used < lru.used {
			lru = st
		}
	}
	if s == nil {
		*lru = stream{end: end, aheadEnd: last + 1, used: clock + 1}
		return nil
	}
	s.used, s.end = clock+1, end
	if last+1 < s.aheadEnd-s.window/2 {
		return nil // enough is on its way
	}
	s.window = min(max(2*s.window, 2*r.c.opts.FetchBytes/bs), maxWin)
	from := max(s.aheadEnd, last+1)
	to := min(last+s.window, b.nblocks-1)
	if from > to {
		return nil
	}
	s.aheadEnd = to + 1
	return r.claimLocked(from, to, fetchReadahead)
}

// claimLocked marks the blocks of [first, last] that are neither present nor being fetched as in flight, in fetches
// of at most maxAheadRun bytes (a demand read that needs one of them waits for no more than that), and returns those fetches for the caller to fill. b.mu is held.
func (r *Reader) claimLocked(first, last int64, kind fetchKind) []*fetch {
	b, bs := r.b, r.c.opts.BlockSize
	var own []*fetch
	for i := first; i <= last; i++ {
		if bitSet(b.present, i) || b.inflight[i] != nil {
			continue
		}
		if k := len(own) - 1; k >= 0 && own[k].last == i-1 && (i-own[k].first+1)*bs <= maxAheadRun {
			own[k].last = i
		} else {
			own = append(own, newFetch(i, i, kind))
		}
		b.inflight[i] = own[len(own)-1]
		b.setAhead(i, kind == fetchReadahead)
	}
	return own
}

// fillAll fills fetches one after another and returns the first error.
func (r *Reader) fillAll(fs []*fetch) error {
	var first error
	for _, f := range fs {
		if err := r.fill(f); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// ErrFull is returned by Prefetch when the blocks do not fit in the free capacity of the cache.
var ErrFull = errors.New("cache: full: prefetching more would evict cached blocks")

// Prefetch brings the blocks holding [off, off+n) of the blob into the cache, in source reads of at most 1 MiB, and
// returns when its own source reads are done. Blocks that are present or being fetched are skipped. It never
// evicts: blocks that do not fit in the free capacity are not stored, and it returns ErrFull. The blocks count as
// prefetched, and the first read of each as a prefetch hit.
func (r *Reader) Prefetch(off, n int64) error {
	if off < 0 || n < 0 {
		return fmt.Errorf("cache: blob %s: bad range %d+%d to prefetch", r.key, off, n)
	}
	end := min(off+n, r.size)
	if r.b == nil || r.c.closed.Load() || end <= off {
		return nil
	}
	bs := r.c.opts.BlockSize
	own, err := r.claimFitting(off/bs, (end-1)/bs, false)
	if err != nil {
		return err
	}
	return r.fillAll(own)
}

// claimFitting claims the blocks of [first, last] that are neither present nor being fetched, in fetches of kind
// fetchPrefetch (direct ones if direct is set) for the caller to fill, when they fit in the free capacity of the
// cache; it returns ErrFull when they do not. It claims nothing when the blob was reset to another size.
func (r *Reader) claimFitting(first, last int64, direct bool) ([]*fetch, error) {
	b := r.b
	b.mu.Lock()
	if b.size != r.size {
		b.mu.Unlock()
		return nil, nil
	}
	var need int64
	for i := first; i <= last; i++ {
		if !bitSet(b.present, i) && b.inflight[i] == nil {
			need += b.blockBytes(i)
		}
	}
	b.mu.Unlock()
	if need > 0 && !r.c.fits(need) { // Cache.mu is taken before blob.mu, never inside it
		return nil, ErrFull
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.size != r.size {
		return nil, nil
	}
	own := r.claimLocked(first, last, fetchPrefetch)
	for _, f := range own {
		f.direct = direct // before a reader can see it
	}
	return own, nil
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

// fill performs the source read of fetch f, stores the bytes and wakes the readers waiting for them. Its error is
// the source's, or ErrFull when a prefetch could not store the bytes.
func (r *Reader) fill(f *fetch) error {
	bs := r.c.opts.BlockSize
	start := f.first * bs
	buf := make([]byte, min((f.last+1)*bs, r.size)-start)
	f.mu.Lock()
	f.buf = buf
	f.mu.Unlock()
	err := r.readSrcProgress(buf, start, func(n int) { f.arrived(int64(n), bs) })
	var stored bool
	if err == nil {
		f.arrived(int64(len(buf)), bs) // whatever the source reported
		stored = r.store(f, buf, start)
		blocks := f.last - f.first + 1
		switch f.kind {
		case fetchPrefetch:
			r.c.prefetched.Add(blocks)
		case fetchReadahead:
			r.c.readAhead.Add(blocks)
		}
	}
	dropped := r.settle(f, err)
	if err == nil && !stored && !dropped && f.kind == fetchPrefetch {
		return ErrFull
	}
	return err
}

// settle ends fetch f with err once its bytes are stored or not: its blocks are no longer in flight, and the
// readers waiting for them are woken. It reports whether Evict dropped the fetch meanwhile.
func (r *Reader) settle(f *fetch, err error) (dropped bool) {
	b := r.b
	b.mu.Lock()
	for i := f.first; i <= f.last; i++ {
		if b.inflight[i] == f {
			delete(b.inflight, i)
		}
	}
	dropped = f.dropped
	b.mu.Unlock()
	f.end(err)
	return dropped
}

// storeDirect stores buf, the bytes of the blob from off (a multiple of the block size), into the cache: the
// blocks neither present nor being fetched are written straight to the data file, with no copy, and count as
// prefetched. Readers that need them meanwhile wait, then read them from disk. Like Prefetch it never evicts: it
// returns ErrFull, having stored nothing, when the blocks do not fit in the free capacity, and when the capacity
// is taken while it stores them, having stored some.
func (r *Reader) storeDirect(off int64, buf []byte) error {
	bs := r.c.opts.BlockSize
	end := min(off+int64(len(buf)), r.size)
	if off < 0 || off%bs != 0 || end <= off {
		return fmt.Errorf("cache: blob %s: bad range %d+%d to store", r.key, off, len(buf))
	}
	if r.b == nil || r.c.closed.Load() {
		return nil
	}
	own, err := r.claimFitting(off/bs, (end-1)/bs, true)
	for _, f := range own {
		ok := err == nil && r.store(f, buf[f.first*bs-off:min((f.last+1)*bs, r.size)-off], f.first*bs)
		if ok {
			r.c.prefetched.Add(f.last - f.first + 1)
		}
		if dropped := r.settle(f, nil); !ok && !dropped && err == nil {
			err = ErrFull
		}
	}
	return err
}

// store writes fetched blocks to the data file and marks them present; when it cannot, the blocks simply stay
// missing, and it returns false. A prefetch stores only into free capacity.
func (r *Reader) store(f *fetch, buf []byte, start int64) bool {
	c, b := r.c, r.b
	n := int64(len(buf))
	if !c.reserve(b, n, f.kind != fetchPrefetch) {
		if !c.closed.Load() && f.kind != fetchPrefetch {
			c.storeFailures.Add(1)
			c.noteStore(errors.New("the capacity is taken by blocks of ongoing reads"))
		}
		return false
	}
	b.writeMu.RLock()
	b.mu.Lock()
	if c.closed.Load() || f.dropped { // Close is closing the data files: do not reopen them
		b.mu.Unlock()
		b.writeMu.RUnlock()
		c.release(n)
		return false
	}
	file, err := b.openFileLocked(true)
	b.mu.Unlock()
	if err == nil {
		_, err = file.WriteAt(buf, start)
	}
	b.writeMu.RUnlock()
	if err == nil && !b.markPresent(f, f.first, f.last) {
		c.release(n)
		return false
	}
	if err != nil {
		c.release(n)
		if !c.closed.Load() {
			c.storeFailures.Add(1)
			c.noteStore(err)
		}
		return false
	}
	c.noteStore(nil)
	return true
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
	if b.size != r.size {
		c.mu.Unlock()
		return nil
	}
	freed, err := b.evict(first, last, -1, false, true)
	c.used -= freed
	c.mu.Unlock()
	if err != nil {
		return fmt.Errorf("cache: blob %s: evicted blocks are forgotten but not yet recorded: %w", r.key, err)
	}
	// Fetches bringing blocks of the range are dropped too: what they bring may be what was just found bad (a
	// source serving wrong bytes), and a read after this one must fetch again, not join them.
	// Taking writeMu waits for their stores under way; a store that starts after sees its fetch dropped.
	b.writeMu.Lock()
	defer b.writeMu.Unlock()
	b.mu.Lock()
	defer b.mu.Unlock()
	for i := first; i <= last; i++ {
		if f := b.inflight[i]; f != nil {
			f.dropped = true
			for j := f.first; j <= f.last; j++ {
				if b.inflight[j] == f {
					delete(b.inflight, j)
				}
			}
		}
	}
	return nil
}

// DownloadOptions tune Reader.Download.
type DownloadOptions struct {
	// MaxBytesPerSecond bounds the download rate (0: unbounded).
	MaxBytesPerSecond int64
	// Chunk is the bytes of one step of the download (default 1 MiB, one source read: reads are at most 1 MiB so
	// that a demand read never waits long behind one).
	Chunk int64
	// Concurrency is the number of source reads in flight (default 1).
	Concurrency int
	// Demand, if set, returns the number of demand fetches in progress: the download waits while there are any.
	Demand func() int64
	// Progress, if set, is called after each chunk with the bytes of the blob present so far.
	Progress func(present int64)
}

// ErrDigestMismatch is returned by Download when the complete blob does not hash to its digest; its blocks were
// dropped.
var ErrDigestMismatch = errors.New("cache: downloaded blob does not match its digest")

// Download brings the whole blob into the cache in the background of demand reads: chunk by chunk at a bounded
// rate, waiting while demand fetches run, skipping what is present (so an interrupted download resumes), then
// checks the complete blob against its digest. On a mismatch every block of the blob is dropped and it returns
// ErrDigestMismatch: its bytes are never reported as verified. It fails with ErrFull when the blob does not fit
// in the cache's capacity.
func (r *Reader) Download(ctx context.Context, opts DownloadOptions) error {
	if r.b == nil || r.c.closed.Load() {
		return errors.New("cache: blob not cached (closed cache or invalid digest)")
	}
	if r.size > r.c.opts.CapacityBytes {
		return fmt.Errorf("%w: blob %s has %d bytes, the cache holds %d", ErrFull, r.key, r.size, r.c.opts.CapacityBytes)
	}
	if opts.Chunk <= 0 {
		opts.Chunk = maxAheadRun
	}
	start := time.Now()
	var (
		fetched    atomic.Int64
		progressMu sync.Mutex
	)
	// The digest is taken as the chunks arrive, in order, from the data file (in the page cache: just written), so
	// that only the last chunk's is left when the download ends; if blocks were dropped meanwhile, or a chunk was
	// not all present when its turn came (another read was fetching it), the blob is read back whole instead.
	r.b.mu.Lock()
	drops := r.b.drops
	r.b.mu.Unlock()
	nchunks := (r.size + opts.Chunk - 1) / opts.Chunk
	chunkDone := make([]chan struct{}, nchunks)
	for i := range chunkDone {
		chunkDone[i] = make(chan struct{})
	}
	vr := r.key.Algorithm().Digester()
	hashed := make(chan bool, 1) // whether vr holds the digest of every chunk
	go func() {
		buf := make([]byte, opts.Chunk)
		for i := range nchunks {
			<-chunkDone[i]
			off := i * opts.Chunk
			n := min(opts.Chunk, r.size-off)
			if ctx.Err() != nil || r.missingBytes(off, n) > 0 || r.readDisk(buf[:n], off) != nil {
				hashed <- false
				return
			}
			vr.Hash().Write(buf[:n])
		}
		hashed <- true
	}()
	offs := make(chan int64)
	g, gctx := errgroup.WithContext(ctx)
	for range max(1, opts.Concurrency) {
		g.Go(func() error {
			for off := range offs {
				for opts.Demand != nil && opts.Demand() > 0 && gctx.Err() == nil {
					time.Sleep(5 * time.Millisecond)
				}
				if opts.MaxBytesPerSecond > 0 {
					// Wait until the average rate is back under the bound.
					due := start.Add(time.Duration(float64(fetched.Load()) / float64(opts.MaxBytesPerSecond) * float64(time.Second)))
					if d := time.Until(due); d > 0 {
						select {
						case <-gctx.Done():
						case <-time.After(d):
						}
					}
				}
				if err := gctx.Err(); err != nil {
					return err
				}
				n := min(opts.Chunk, r.size-off)
				if missing := r.missingBytes(off, n); missing > 0 {
					if err := r.fetchEvicting(off, n); err != nil {
						return err
					}
					fetched.Add(missing)
				}
				close(chunkDone[off/opts.Chunk])
				if opts.Progress != nil {
					progressMu.Lock()
					opts.Progress(r.presentBytes())
					progressMu.Unlock()
				}
			}
			return nil
		})
	}
	g.Go(func() error {
		defer close(offs)
		for off := int64(0); off < r.size; off += opts.Chunk {
			select {
			case offs <- off:
			case <-gctx.Done():
				return nil
			}
		}
		return nil
	})
	err := g.Wait()
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		for _, c := range chunkDone { // let the digest's goroutine end
			select {
			case <-c:
			default:
				close(c)
			}
		}
		return err
	}
	// Blocks that other reads were fetching when the chunk was claimed: wait for them, fetch what they failed.
	for try := 0; r.presentBytes() != r.size; try++ {
		if try == 50 {
			return fmt.Errorf("cache: blob %s: %d of %d bytes present after the download (evicted meanwhile?)", r.key, r.presentBytes(), r.size)
		}
		time.Sleep(20 * time.Millisecond)
		if err := r.fetchEvicting(0, r.size); err != nil {
			return err
		}
	}
	if opts.Progress != nil {
		opts.Progress(r.presentBytes())
	}
	r.b.mu.Lock()
	dropped := r.b.drops != drops
	r.b.mu.Unlock()
	if !<-hashed || dropped {
		vr = r.key.Algorithm().Digester()
		h := vr.Hash()
		buf := make([]byte, 1<<20)
		for off := int64(0); off < r.size; off += int64(len(buf)) {
			m := min(int64(len(buf)), r.size-off)
			if err := r.readDisk(buf[:m], off); err != nil {
				return fmt.Errorf("cache: blob %s: read back for its digest: %w", r.key, err)
			}
			h.Write(buf[:m])
		}
	}
	if got := vr.Digest(); got != r.key {
		_ = r.Evict(0, r.size)
		return fmt.Errorf("%w: blob %s hashes to %s; its cached blocks were dropped", ErrDigestMismatch, r.key, got)
	}
	return nil
}

// missingBytes returns the bytes of the blocks of [off, off+n) that are not present.
func (r *Reader) missingBytes(off, n int64) int64 {
	b, bs := r.b, r.c.opts.BlockSize
	b.mu.Lock()
	defer b.mu.Unlock()
	var m int64
	for i := off / bs; i <= (off+n-1)/bs; i++ {
		if !bitSet(b.present, i) {
			m += b.blockBytes(i)
		}
	}
	return m
}

// presentBytes returns the bytes of the blob's present blocks.
func (r *Reader) presentBytes() int64 {
	r.b.mu.Lock()
	defer r.b.mu.Unlock()
	return r.b.presentBytes
}

// fetchEvicting brings the missing blocks of [off, off+n) that nobody is fetching into the cache; like demand
// reads, it may evict other blobs' blocks.
func (r *Reader) fetchEvicting(off, n int64) error {
	b, bs := r.b, r.c.opts.BlockSize
	b.mu.Lock()
	own := r.claimLocked(off/bs, (off+n-1)/bs, fetchDownload)
	b.mu.Unlock()
	return r.fillAll(own)
}

// Cached reports whether every byte of [off, off+n) of the blob is in the cache.
func (r *Reader) Cached(off, n int64) bool {
	if r.b == nil {
		return false
	}
	off, end := max(off, 0), min(off+n, r.size)
	return end <= off || r.missingBytes(off, end-off) == 0
}

// WillNeed starts reading the cached blocks of [off, off+n) from disk into the page cache and returns without
// waiting for them. A caller that knows what it reads next, as the decoding of a start ahead of its reads does,
// has those disk reads issued together instead of one at a time as it reaches them. Blocks not cached are left
// alone.
func (r *Reader) WillNeed(off, n int64) {
	off, end := max(off, 0), min(off+n, r.size)
	if r.b == nil || end <= off {
		return
	}
	b, bs := r.b, r.c.opts.BlockSize
	b.mu.Lock()
	f, err := b.openFileLocked(false)
	// Runs of present blocks: a hole of the data file reads as zeros, for nothing.
	var runs [][2]int64
	if err == nil {
		for i := off / bs; i <= (end-1)/bs; i++ {
			if !bitSet(b.present, i) {
				continue
			}
			if k := len(runs) - 1; k >= 0 && runs[k][1] == i {
				runs[k][1] = i + 1
			} else {
				runs = append(runs, [2]int64{i, i + 1})
			}
		}
	}
	b.mu.Unlock()
	for _, run := range runs {
		lo, hi := max(run[0]*bs, off), min(run[1]*bs, end)
		if err := willNeed(f, lo, hi-lo); err != nil {
			return
		}
	}
}
