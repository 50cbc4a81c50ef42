// Package cache keeps fetched blob blocks on local disk, shared by all images and bounded in bytes, so lazily
// read layers are fetched from the registry once; its own bookkeeping survives restarts and works on any filesystem.
//
// Layout under Dir: <algorithm>/<hex>.data is a sparse file of the blob's size holding the present blocks at their
// offsets; <algorithm>/<hex>.state lists the present blocks (see state.go). A block is present only once its bytes
// were written and fsynced before a state file listing it was renamed into place, so a crash never exposes a block
// whose bytes are missing. Eviction is least recently used by blob; blocks being read are never evicted.
package cache

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
)

// Options configure a Cache.
type Options struct {
	Dir           string // cache directory, created if missing
	CapacityBytes int64  // bound on the bytes of present blocks
	BlockSize     int64  // unit in which blocks are cached, and Prefetch fetches, in bytes (default 64 KiB)
	// FetchBytes is the least a demand miss fetches (a multiple of BlockSize; at most BlockSize: BlockSize): the missing
	// blocks of the FetchBytes-aligned run around the read come with it in one request. Smaller blocks than fetch
	// units let a prefetch fetch just the blocks a recorded start reads while a miss still costs one request per
	// unit.
	FetchBytes int64
	// ReadaheadBytes bounds the window fetched ahead of a sequential reader of a blob (default 4 MiB; negative:
	// no readahead). The window starts at two fetch units and doubles with each sequential read.
	ReadaheadBytes int64
	Logger         *slog.Logger // default slog.Default()

	flushInterval time.Duration // tests: how often stored blocks are recorded (default flushInterval)
}

const (
	defaultBlockSize = 64 << 10
	// maxRun bounds the bytes of one coalesced source read of a demand miss.
	maxRun = 8 << 20
	// maxAheadRun bounds the bytes of one source read of readahead or Prefetch (at least one block).
	maxAheadRun = 1 << 20
	// defaultReadahead bounds the readahead window of a sequential reader.
	defaultReadahead = 4 << 20
	// flushInterval is how often newly stored blocks are made durable and recorded.
	flushInterval = 2 * time.Second
)

// Stats are a Cache's counters since Open.
type Stats struct {
	Hits          int64 // blocks served from disk
	Misses        int64 // blocks fetched from the source (or waited for while another reader fetched them)
	Evictions     int64 // blocks dropped for capacity or by Reader.Evict
	EvictedBytes  int64
	BytesFetched  int64 // bytes read from sources
	StoreFailures int64 // fetched runs that could not be stored (capacity held by active reads, disk errors)
	// Prefetched and ReadAhead count the blocks fetched by Prefetch and by readahead (not in Misses);
	// PrefetchHits counts reads of blocks that Prefetch or readahead brought, the first time each is read.
	Prefetched, ReadAhead, PrefetchHits int64
}

// Cache is a bounded on-disk block cache keyed by blob digest. It is safe for concurrent use.
type Cache struct {
	opts Options
	log  *slog.Logger

	mu           sync.Mutex // guards blobs, used, storeFailing; held during eviction
	blobs        map[digest.Digest]*blob
	used         int64 // bytes of present blocks plus bytes reserved for stores in progress
	storeFailing bool  // a store failure was logged and no store succeeded since
	closed       atomic.Bool

	hits, misses, evictions, evictedBytes, bytesFetched, storeFailures atomic.Int64
	prefetched, readAhead, prefetchHits                                atomic.Int64
	demand                                                             atomic.Int64 // source reads of demand misses in progress
	background                                                         atomic.Int64 // fills of demand misses and readahead in progress (tests wait for them)

	punchWarned  atomic.Bool   // the failure to punch holes was logged
	flushFailing atomic.Bool   // a failed state write was logged and none succeeded since
	stop, done   chan struct{} // the flusher goroutine
}

// Open opens (or creates) the cache in opts.Dir and loads the state of the blobs stored there. Blobs whose state
// is unreadable are dropped with a log line; if the stored bytes exceed the capacity, the least recently used
// blobs are evicted.
func Open(opts Options) (*Cache, error) {
	if opts.Dir == "" {
		return nil, errors.New("cache: no directory")
	}
	if opts.CapacityBytes <= 0 {
		return nil, fmt.Errorf("cache %s: capacity must be positive, got %d", opts.Dir, opts.CapacityBytes)
	}
	if opts.BlockSize <= 0 {
		opts.BlockSize = defaultBlockSize
	}
	if opts.flushInterval <= 0 {
		opts.flushInterval = flushInterval
	}
	if opts.ReadaheadBytes == 0 {
		opts.ReadaheadBytes = defaultReadahead
	}
	if opts.FetchBytes <= opts.BlockSize {
		opts.FetchBytes = opts.BlockSize
	} else if opts.FetchBytes%opts.BlockSize != 0 {
		return nil, fmt.Errorf("cache: fetch unit of %d bytes is not a multiple of the block size, %d", opts.FetchBytes, opts.BlockSize)
	}
	c := &Cache{opts: opts, log: opts.Logger, blobs: map[digest.Digest]*blob{}}
	if c.log == nil {
		c.log = slog.Default()
	}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	if err := c.load(); err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.used > opts.CapacityBytes {
		c.evictLocked(c.used-opts.CapacityBytes, nil)
	}
	c.mu.Unlock()
	c.startFlusher()
	return c, nil
}

// startFlusher starts the goroutine that periodically records stored blocks; Close stops it.
func (c *Cache) startFlusher() {
	c.stop, c.done = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(c.done)
		t := time.NewTicker(c.opts.flushInterval)
		defer t.Stop()
		for {
			select {
			case <-c.stop:
				return
			case <-t.C:
				c.flush(false)
			}
		}
	}()
}

// load reads every state file under Dir.
func (c *Cache) load() error {
	algos, err := os.ReadDir(c.opts.Dir)
	if err != nil {
		return fmt.Errorf("cache: %w", err)
	}
	for _, a := range algos {
		if !a.IsDir() || !digest.Algorithm(a.Name()).Available() {
			continue
		}
		dir := filepath.Join(c.opts.Dir, a.Name())
		entries, err := os.ReadDir(dir)
		if err != nil {
			return fmt.Errorf("cache: %w", err)
		}
		names := map[string]bool{}
		for _, e := range entries {
			names[e.Name()] = true
		}
		for _, e := range entries {
			name := e.Name()
			switch {
			case strings.HasSuffix(name, ".tmp"):
				_ = os.Remove(filepath.Join(dir, name)) // an unfinished state write
			case strings.HasSuffix(name, ".data") && !names[strings.TrimSuffix(name, ".data")+".state"]:
				_ = os.Remove(filepath.Join(dir, name)) // no block of it was ever recorded
			case strings.HasSuffix(name, ".state"):
				c.loadBlob(digest.NewDigestFromEncoded(digest.Algorithm(a.Name()), strings.TrimSuffix(name, ".state")))
			}
		}
	}
	return nil
}

// loadBlob loads one blob's state, dropping the blob if the state is unusable.
func (c *Cache) loadBlob(key digest.Digest) {
	b := c.newBlob(key, 0)
	drop := func(why string, err error) {
		c.log.Warn("cache: dropping the cached blocks of a blob: "+why, "blob", key, "dir", c.opts.Dir, "err", err)
		_ = os.Remove(b.statePath)
		_ = os.Remove(b.dataPath)
	}
	if key.Validate() != nil {
		drop("bad file name", key.Validate())
		return
	}
	buf, err := os.ReadFile(b.statePath)
	if err != nil {
		drop("unreadable state file", err)
		return
	}
	st, err := decodeState(buf)
	if err != nil {
		drop("corrupt state file", err)
		return
	}
	if st.blockSize != c.opts.BlockSize {
		if st.blockSize%c.opts.BlockSize != 0 {
			drop("state recorded with another block size", fmt.Errorf("block size %d, configured %d", st.blockSize, c.opts.BlockSize))
			return
		}
		st = st.split(c.opts.BlockSize) // a smaller block size configured since: each block becomes several
		b.dirty = true
	}
	fi, err := os.Stat(b.dataPath)
	if err != nil || fi.Size() != st.size {
		if err == nil {
			err = fmt.Errorf("data file has %d bytes, blob has %d", fi.Size(), st.size)
		}
		drop("data file missing or of the wrong size", err)
		return
	}
	b.size, b.nblocks, b.present = st.size, numBlocks(st.size, st.blockSize), st.present
	b.presentBytes = st.presentBytes()
	b.lastAccess.Store(st.lastAccess)
	b.savedAccess = st.lastAccess
	c.blobs[key] = b
	c.used += b.presentBytes
}

// newBlob returns an empty blob entry for key.
func (c *Cache) newBlob(key digest.Digest, size int64) *blob {
	base := filepath.Join(c.opts.Dir, string(key.Algorithm()), key.Encoded())
	nb := numBlocks(size, c.opts.BlockSize)
	return &blob{
		c:         c,
		key:       key,
		dataPath:  base + ".data",
		statePath: base + ".state",
		size:      size,
		nblocks:   nb,
		present:   make([]uint64, (nb+63)/64),
		inflight:  map[int64]*fetch{},
	}
}

// Usage returns the bytes of present blocks and the number of blobs that have any.
func (c *Cache) Usage() (bytes int64, blobs int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, b := range c.blobs {
		b.mu.Lock()
		if b.presentBytes > 0 {
			bytes += b.presentBytes
			blobs++
		}
		b.mu.Unlock()
	}
	return bytes, blobs
}

// Stats returns the cache's counters.
func (c *Cache) Stats() Stats {
	return Stats{
		Hits:          c.hits.Load(),
		Misses:        c.misses.Load(),
		Evictions:     c.evictions.Load(),
		EvictedBytes:  c.evictedBytes.Load(),
		BytesFetched:  c.bytesFetched.Load(),
		StoreFailures: c.storeFailures.Load(),
		Prefetched:    c.prefetched.Load(),
		ReadAhead:     c.readAhead.Load(),
		PrefetchHits:  c.prefetchHits.Load(),
	}
}

// DemandFetches returns the number of source reads for demand misses in progress: prefetchers yield to them.
func (c *Cache) DemandFetches() int64 { return c.demand.Load() }

// Close records every stored block and the LRU order, and closes the data files. Readers keep working after
// Close, reading straight from their sources.
func (c *Cache) Close() error {
	if !c.closed.CompareAndSwap(false, true) {
		return nil
	}
	close(c.stop)
	<-c.done
	err := c.flush(true)
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, b := range c.blobs {
		b.stateMu.Lock()
		b.mu.Lock()
		if b.file != nil {
			if cerr := b.file.Close(); cerr != nil && err == nil {
				err = cerr
			}
			b.file = nil
		}
		b.mu.Unlock()
		b.stateMu.Unlock()
	}
	return err
}

// flush makes stored blocks durable and records them. all also records blobs whose only change is their last
// access time. It returns the first error; blobs that failed stay dirty.
func (c *Cache) flush(all bool) error {
	c.mu.Lock()
	blobs := make([]*blob, 0, len(c.blobs))
	for _, b := range c.blobs {
		blobs = append(blobs, b)
	}
	c.mu.Unlock()
	var first error
	for _, b := range blobs {
		if err := b.flush(all); err != nil && first == nil {
			first = err
			if c.flushFailing.CompareAndSwap(false, true) {
				c.log.Warn("cache: cannot record stored blocks; they stay unrecorded (and are fetched again after a restart) until it works",
					"blob", b.key, "err", err)
			}
		}
	}
	if first == nil && c.flushFailing.CompareAndSwap(true, false) {
		c.log.Info("cache: recording stored blocks again", "dir", c.opts.Dir)
	}
	return first
}

// reserve accounts n bytes for a store into b, evicting least recently used blocks (never pinned ones) to make
// room if evict is set. It returns false when the bytes cannot fit.
func (c *Cache) reserve(b *blob, n int64, evict bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() || n > c.opts.CapacityBytes {
		return false
	}
	if over := c.used + n - c.opts.CapacityBytes; over > 0 && evict {
		// Free some slack too, so that a full cache records an eviction every few stores, not at every one.
		c.evictLocked(over+c.opts.CapacityBytes/32, b)
	}
	if c.used+n > c.opts.CapacityBytes {
		return false
	}
	c.used += n
	return true
}

// fits reports whether n more bytes fit in the free capacity.
func (c *Cache) fits(n int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.used+n <= c.opts.CapacityBytes
}

// release returns reserved bytes that were not stored.
func (c *Cache) release(n int64) {
	c.mu.Lock()
	c.used -= n
	c.mu.Unlock()
}

// evictLocked frees at least need bytes if it can, least recently used blobs first. It visits every blob at most
// once, so it always terminates; it frees less when the rest is pinned by ongoing reads. c.mu is held.
func (c *Cache) evictLocked(need int64, requester *blob) {
	type victim struct {
		b    *blob
		last int64
	}
	var victims []victim
	for _, b := range c.blobs {
		b.mu.Lock()
		if b.presentBytes > 0 {
			victims = append(victims, victim{b, b.lastAccess.Load()})
		}
		b.mu.Unlock()
	}
	slices.SortFunc(victims, func(x, y victim) int {
		// The requester goes last: its other blocks are evicted only when nothing else is left.
		if (x.b == requester) != (y.b == requester) {
			if x.b == requester {
				return 1
			}
			return -1
		}
		return cmp.Compare(x.last, y.last)
	})
	for _, v := range victims {
		if need <= 0 {
			return
		}
		freed, _ := v.b.evict(0, v.b.nblocks-1, need, v.b != requester, false)
		c.used -= freed
		need -= freed
	}
}

// noteStore logs the first store failure after a success, and the first success after failures.
func (c *Cache) noteStore(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case err != nil && !c.storeFailing:
		c.storeFailing = true
		c.log.Warn("cache: cannot store fetched blocks; serving reads from the source without caching until it works again",
			"dir", c.opts.Dir, "err", err)
	case err == nil && c.storeFailing:
		c.storeFailing = false
		c.log.Info("cache: storing fetched blocks again", "dir", c.opts.Dir)
	}
}

// syncDir fsyncs a directory so that renames and removals in it are durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, fs.ErrInvalid) {
		return err
	}
	return nil
}
