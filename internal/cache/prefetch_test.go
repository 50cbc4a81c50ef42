package cache

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestPrefetch(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	src := newSrc(300*testBS+17, 2)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	checkRead(t, r, src, 10*testBS, testBS) // block 10 present before the prefetch
	calls := src.calls.Load()
	if err := r.Prefetch(0, int64(len(src.data))); err != nil {
		t.Fatal(err)
	}
	// 300 blocks minus the present one, in reads of at most 1 MiB (256 blocks): blocks 0-9, 11-266, 267-300.
	if n := src.calls.Load() - calls; n != 3 {
		t.Fatalf("prefetch made %d source reads, want 3", n)
	}
	calls = src.calls.Load()
	checkRead(t, r, src, 0, len(src.data))
	if src.calls.Load() != calls {
		t.Fatal("a read after a whole-blob prefetch went to the source")
	}
	st := c.Stats()
	if st.Prefetched != 300 || st.PrefetchHits != 300 {
		t.Fatalf("stats %+v: want 300 blocks prefetched and 300 prefetch hits", st)
	}
	checkRead(t, r, src, 0, len(src.data))
	if st2 := c.Stats(); st2.PrefetchHits != 300 {
		t.Fatalf("a second read counted prefetch hits again: %+v", st2)
	}
	if err := r.Prefetch(-1, 10); err == nil {
		t.Fatal("a negative offset was accepted")
	}
}

// A prefetch never evicts cached blocks: what does not fit in the free capacity is not stored, and it says so.
func TestPrefetchStopsAtTheBound(t *testing.T) {
	c := openTest(t, t.TempDir(), 100*testBS, nil)
	defer c.Close()
	a := newSrc(80*testBS, 3)
	ra := c.Reader(a.key(), int64(len(a.data)), a)
	checkRead(t, ra, a, 0, len(a.data))
	b := newSrc(50*testBS, 4)
	rb := c.Reader(b.key(), int64(len(b.data)), b)
	if err := rb.Prefetch(0, int64(len(b.data))); !errors.Is(err, ErrFull) {
		t.Fatalf("prefetch beyond the free capacity: %v, want ErrFull", err)
	}
	if used, _ := c.Usage(); used > 100*testBS {
		t.Fatalf("cache holds %d bytes, bound %d", used, 100*testBS)
	}
	calls := a.calls.Load()
	checkRead(t, ra, a, 0, len(a.data))
	if a.calls.Load() != calls {
		t.Fatal("a prefetch evicted blocks of another blob")
	}
}

// A sequential reader gets readahead in a growing window, so it makes far fewer source reads than it reads
// blocks; random reads get none.
func TestReadahead(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	src := newSrc(2000*testBS, 5)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	for off := int64(0); off < int64(len(src.data)); off += 2 * testBS {
		checkRead(t, r, src, off, 2*testBS)
	}
	if n := src.calls.Load(); n > 100 {
		t.Fatalf("%d source reads for a sequential read of 2000 blocks in 1000 reads", n)
	}
	if st := c.Stats(); st.ReadAhead == 0 || st.PrefetchHits == 0 {
		t.Fatalf("stats %+v: want blocks read ahead and hit", st)
	}

	c2 := openTest(t, t.TempDir(), 1<<30, nil)
	defer c2.Close()
	src2 := newSrc(2000*testBS, 6)
	r2 := c2.Reader(src2.key(), int64(len(src2.data)), src2)
	for i := range 200 {
		checkRead(t, r2, src2, int64((i*7919)%2000)*testBS, testBS)
	}
	if st := c2.Stats(); st.ReadAhead != 0 {
		t.Fatalf("random reads got readahead: %+v", st)
	}
}

// A reader going through blocks that Prefetch brought (a recorded start) fetches nothing beyond them: readahead
// follows readers that miss, and starts when the reader leaves the prefetched blocks.
func TestReadaheadSkipsPrefetched(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	src := newSrc(400*testBS, 8)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	if err := r.Prefetch(0, 100*testBS); err != nil {
		t.Fatal(err)
	}
	calls := src.calls.Load()
	for off := int64(0); off < 100*testBS; off += 2 * testBS {
		checkRead(t, r, src, off, 2*testBS)
	}
	if n := src.calls.Load() - calls; n != 0 {
		t.Fatalf("reading 100 prefetched blocks made %d source reads", n)
	}
	if st := c.Stats(); st.ReadAhead != 0 {
		t.Fatalf("reads of prefetched blocks fetched ahead: %+v", st)
	}
	// Past them, the sequential reader misses and readahead follows it.
	for off := int64(100 * testBS); off < 400*testBS; off += 2 * testBS {
		checkRead(t, r, src, off, 2*testBS)
	}
	if n := src.calls.Load() - calls; n > 40 {
		t.Fatalf("%d source reads for a sequential read of 300 blocks in 150 reads", n)
	}
	if st := c.Stats(); st.ReadAhead == 0 {
		t.Fatalf("no readahead after the prefetched blocks: %+v", st)
	}
}

// A demand miss fetches the missing blocks of its fetch unit after it in the same request, those before it in
// another; Prefetch fetches single blocks.
func TestFetchUnit(t *testing.T) {
	c, err := Open(Options{Dir: t.TempDir(), CapacityBytes: 1 << 30, BlockSize: testBS, FetchBytes: 4 * testBS, ReadaheadBytes: -1,
		Logger: slog.New(slog.DiscardHandler), flushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	src := newSrc(10*testBS, 9)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	if err := r.Prefetch(4*testBS, 1); err != nil { // block 4 only
		t.Fatal(err)
	}
	checkRead(t, r, src, 5*testBS+10, 100) // a miss in block 5: blocks 5-7 come with it
	for _, i := range []int64{4, 6, 7} {
		checkRead(t, r, src, i*testBS, testBS)
	}
	if n := src.calls.Load(); n != 2 {
		t.Fatalf("%d source reads, want 2 (the prefetch of block 4, the miss with blocks 5-7)", n)
	}
	checkRead(t, r, src, 9*testBS, testBS) // the last unit is short: blocks 8-9, block 8 in a request of its own
	checkRead(t, r, src, 8*testBS, testBS)
	if n := src.calls.Load(); n != 4 {
		t.Fatalf("%d source reads after the last unit, want 4", n)
	}
	if _, err := Open(Options{Dir: t.TempDir(), CapacityBytes: 1 << 30, BlockSize: testBS, FetchBytes: testBS + 1}); err == nil {
		t.Error("a fetch unit that is no multiple of the block size was accepted")
	}
}

func TestReadaheadOff(t *testing.T) {
	c, err := Open(Options{Dir: t.TempDir(), CapacityBytes: 1 << 30, BlockSize: testBS, ReadaheadBytes: -1,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), flushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	src := newSrc(100*testBS, 7)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	for off := int64(0); off < int64(len(src.data)); off += testBS {
		checkRead(t, r, src, off, testBS)
	}
	if n := src.calls.Load(); n != 100 {
		t.Fatalf("%d source reads without readahead, want one per block (100)", n)
	}
}

func TestDownload(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	src := newSrc(3<<20+100, 8)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	checkRead(t, r, src, 1<<20, 5000) // some blocks are there already: they are not fetched again
	before := src.bytes.Load()
	var progress []int64
	if err := r.Download(context.Background(), DownloadOptions{Chunk: 1 << 20, Progress: func(p int64) { progress = append(progress, p) }}); err != nil {
		t.Fatal(err)
	}
	if got := src.bytes.Load() - before; got >= int64(len(src.data)) {
		t.Fatalf("the download fetched %d bytes: present blocks were fetched again", got)
	}
	if len(progress) < 4 || progress[len(progress)-1] != int64(len(src.data)) {
		t.Fatalf("progress %v", progress)
	}
	calls := src.calls.Load()
	checkRead(t, r, src, 0, len(src.data))
	if src.calls.Load() != calls {
		t.Fatal("a read after the download went to the source")
	}
}

// A source that serves wrong bytes (the CRC-less part of a blob, or a whole bad blob) is caught by the digest:
// the blocks are dropped and the download fails.
func TestDownloadDigestMismatch(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	src := newSrc(1<<20, 9)
	key := src.key()
	src.data[12345] ^= 1 // the registry's copy is corrupt
	r := c.Reader(key, int64(len(src.data)), src)
	if err := r.Download(context.Background(), DownloadOptions{}); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("download of a corrupt blob: %v, want ErrDigestMismatch", err)
	}
	if used, _ := c.Usage(); used != 0 {
		t.Fatalf("%d bytes of a blob that failed its digest stay cached", used)
	}
}

func TestDownloadTooLarge(t *testing.T) {
	c := openTest(t, t.TempDir(), 10*testBS, nil)
	defer c.Close()
	src := newSrc(11*testBS, 10)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	if err := r.Download(context.Background(), DownloadOptions{}); !errors.Is(err, ErrFull) {
		t.Fatalf("download of a blob larger than the cache: %v, want ErrFull", err)
	}
	if src.calls.Load() != 0 {
		t.Fatal("a blob that cannot fit was fetched")
	}
}

// concurrencySrc is a memSrc that records how many reads run at once.
type concurrencySrc struct {
	*memSrc
	active, peak atomic.Int64
}

func (s *concurrencySrc) ReadAt(p []byte, off int64) (int, error) {
	n := s.active.Add(1)
	defer s.active.Add(-1)
	for {
		p := s.peak.Load()
		if n <= p || s.peak.CompareAndSwap(p, n) {
			break
		}
	}
	return s.memSrc.ReadAt(p, off)
}

// A download keeps Concurrency reads in flight; interrupted, it resumes after a restart from what is cached.
func TestDownloadConcurrentAndResumed(t *testing.T) {
	dir := t.TempDir()
	c := openTest(t, dir, 1<<30, nil)
	src := &concurrencySrc{memSrc: newSrc(16<<20, 11)}
	src.delay = 5 * time.Millisecond
	r := c.Reader(src.key(), int64(len(src.data)), src)
	ctx, cancel := context.WithCancel(context.Background())
	err := r.Download(ctx, DownloadOptions{Chunk: 1 << 20, Concurrency: 4, Progress: func(p int64) {
		if p >= 6<<20 {
			cancel() // the daemon stops mid-download
		}
	}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted download: %v", err)
	}
	if p := src.peak.Load(); p < 2 || p > 4 {
		t.Errorf("%d source reads at once, want 2 to 4", p)
	}
	first := src.bytes.Load()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}

	c = openTest(t, dir, 1<<30, nil)
	defer c.Close()
	r = c.Reader(src.key(), int64(len(src.data)), src)
	if err := r.Download(context.Background(), DownloadOptions{Chunk: 1 << 20, Concurrency: 4}); err != nil {
		t.Fatal(err)
	}
	if total := src.bytes.Load(); total != int64(len(src.data)) {
		t.Fatalf("the download fetched %d bytes before and %d after the restart for a %d-byte blob: it started over",
			first, total-first, len(src.data))
	}
}

// streamSrc delivers a range read block by block through ReadAtProgress, holding the rest until release is
// closed, and then fails when failRest is set.
type streamSrc struct {
	*memSrc
	release  chan struct{}
	failRest bool
}

func (s *streamSrc) ReadAtProgress(p []byte, off int64, progress func(n int)) (int, error) {
	n := copy(p[:testBS], s.data[off:])
	progress(n)
	<-s.release
	if s.failRest {
		return n, errors.New("connection reset")
	}
	n += copy(p[n:], s.data[off+int64(n):])
	progress(n)
	return n, nil
}

// A read waiting for a block of a range fetch in flight gets it as soon as the block has arrived, not when the
// whole range has; when the rest of the range fails, readers of the blocks that arrived are served and readers
// of the others get the error.
func TestFetchServesBlocksAsTheyArrive(t *testing.T) {
	for _, fail := range []bool{false, true} {
		c := openTest(t, t.TempDir(), 1<<30, nil)
		src := &streamSrc{memSrc: newSrc(64*testBS, 7), release: make(chan struct{}), failRest: fail}
		r := c.Reader(src.key(), int64(len(src.data)), src)
		done := make(chan error, 1)
		go func() { done <- r.Prefetch(0, 16*testBS) }()
		first := make(chan error, 1)
		go func() {
			// The prefetch claims its blocks first: wait until block 0 is in flight, then read it.
			for {
				r.b.mu.Lock()
				busy := r.b.inflight[0] != nil
				r.b.mu.Unlock()
				if busy {
					break
				}
				time.Sleep(time.Millisecond)
			}
			p := make([]byte, 100)
			_, err := r.ReadAt(p, 10)
			if err == nil && !bytes.Equal(p, src.data[10:110]) {
				err = errors.New("wrong bytes")
			}
			first <- err
		}()
		select {
		case err := <-first:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a read of the first block waited for the whole range")
		}
		late := make(chan error, 1)
		misses := c.Stats().Misses
		go func() { _, err := r.ReadAt(make([]byte, 100), 8*testBS); late <- err }()
		for c.Stats().Misses == misses { // the read waits for the prefetch's block 8
			time.Sleep(time.Millisecond)
		}
		close(src.release)
		err := <-late
		if fail && err == nil {
			t.Fatal("a block that never arrived was served")
		}
		if !fail && err != nil {
			t.Fatal(err)
		}
		if perr := <-done; (perr != nil) != fail {
			t.Fatalf("prefetch: %v (failing source: %v)", perr, fail)
		}
		src.failRest = false
		checkRead(t, r, src.memSrc, 0, 64*testBS)
		c.Close()
	}
}

// A demand miss waits for its own blocks, not for the rest of its fetch unit: the blocks after it come in its
// request (held here after the first block), those before it in a request of their own (held before any block),
// and both are stored once they end.
func TestMissWaitsForItsBlocksOnly(t *testing.T) {
	c, err := Open(Options{Dir: t.TempDir(), CapacityBytes: 1 << 30, BlockSize: testBS, FetchBytes: 4 * testBS, ReadaheadBytes: -1,
		Logger: slog.New(slog.DiscardHandler), flushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	src := &heldSrc{streamSrc: streamSrc{memSrc: newSrc(16*testBS, 5), release: make(chan struct{})}}
	r := c.Reader(src.key(), int64(len(src.data)), src)
	read := make(chan error, 1)
	go func() {
		p := make([]byte, 100)
		_, err := r.ReadAt(p, 6*testBS+10) // block 6 of the unit 4-7
		if err == nil && !bytes.Equal(p, src.data[6*testBS+10:6*testBS+110]) {
			err = errors.New("wrong bytes")
		}
		read <- err
	}()
	select {
	case err := <-read:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a miss waited for the rest of its fetch unit")
	}
	for deadline := time.Now().Add(10 * time.Second); len(src.offsets()) < 2 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond) // the request of the blocks before the miss is sent on its own goroutine
	}
	if got := src.offsets(); !slices.Equal(got, []int64{4 * testBS, 6 * testBS}) {
		t.Fatalf("source reads at %v, want blocks 6-7 and 4-5 in two requests", got)
	}
	close(src.release)
	settle(c)
	n := src.calls.Load()
	checkRead(t, r, src.memSrc, 4*testBS, 4*testBS)
	if src.calls.Load() != n {
		t.Fatal("the fetch unit's blocks were not stored")
	}
}

// heldSrc is a streamSrc whose reads starting at a multiple of 4 blocks deliver nothing until release is closed;
// it records where the reads start.
type heldSrc struct {
	streamSrc
	mu   sync.Mutex
	offs []int64
}

func (s *heldSrc) ReadAtProgress(p []byte, off int64, progress func(n int)) (int, error) {
	s.mu.Lock()
	s.offs = append(s.offs, off)
	s.mu.Unlock()
	s.calls.Add(1)
	if off/testBS%4 == 0 {
		<-s.release
		n := copy(p, s.data[off:])
		progress(n)
		return n, nil
	}
	return s.streamSrc.ReadAtProgress(p, off, progress)
}

// offsets returns the offsets of the reads so far, sorted.
func (s *heldSrc) offsets() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Sorted(slices.Values(s.offs))
}

// Evicting blocks that a fetch in flight is bringing drops that fetch: its bytes (here, those of a source that
// served the wrong range once) are never stored, and the next read fetches again instead of joining it.
func TestEvictDropsFetchInFlight(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	src := &wrongOnceSrc{streamSrc: streamSrc{memSrc: newSrc(16*testBS, 11), release: make(chan struct{})}}
	r := c.Reader(src.key(), int64(len(src.data)), src)
	p := make([]byte, 100)
	if _, err := r.ReadAt(p, 10); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(p, src.data[10:110]) {
		t.Fatal("the source's first read was not spoiled: the test tests nothing")
	}
	if err := r.Evict(0, testBS); err != nil { // the reader found the bytes bad
		t.Fatal(err)
	}
	// Fetched again, while the spoiled fetch still runs.
	if _, err := r.ReadAt(p, 10); err != nil || !bytes.Equal(p, src.data[10:110]) {
		t.Fatalf("the read after the eviction: %v, or the spoiled bytes again", err)
	}
	close(src.release)
	settle(c)
	checkRead(t, r, src.memSrc, 0, 16*testBS)
}

// wrongOnceSrc is a streamSrc whose first read delivers the bytes of another offset.
type wrongOnceSrc struct {
	streamSrc
	spoiled atomic.Bool
}

func (s *wrongOnceSrc) ReadAtProgress(p []byte, off int64, progress func(n int)) (int, error) {
	if s.spoiled.CompareAndSwap(false, true) {
		n, err := s.streamSrc.ReadAtProgress(p, off+testBS, progress)
		return n, err
	}
	s.calls.Add(1)
	return copy(p, s.data[off:]), nil
}
