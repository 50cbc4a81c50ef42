package cache

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
)

// blob is the cache's entry for one blob. Lock order: Cache.mu, then blob.stateMu, then blob.mu.
type blob struct {
	c                   *Cache
	key                 digest.Digest
	dataPath, statePath string
	lastAccess          atomic.Int64 // Unix nanoseconds

	stateMu     sync.Mutex // serializes state file writes and data file removal
	savedAccess int64      // lastAccess recorded in the state file; guarded by stateMu
	// writeMu is held (shared) by each store of fetched bytes; Reader.Evict takes it alone to wait for the stores
	// under way, so that no store of a fetch it dropped lands afterwards.
	writeMu sync.RWMutex

	mu           sync.Mutex
	size         int64
	nblocks      int64
	present      []uint64 // bitmap of blocks whose bytes are in the data file
	presentBytes int64
	drops        int64            // times blocks were dropped (evicted, or the blob reset): a digest taken as blocks arrived still holds if unchanged
	dirty        bool             // present has blocks the state file does not list yet
	inflight     map[int64]*fetch // block → the fetch bringing it
	pins         []pinRange       // block ranges of ongoing reads: never evicted
	file         *os.File         // data file, nil until needed
	ahead        []uint64         // blocks fetched by Prefetch or readahead and not read since (in memory only)
	aheadRA      []uint64         // those of ahead that readahead fetched
	streams      [4]stream        // recent sequential readers, for readahead
}

// stream is a sequential reader of a blob: the byte offset where its last read ended, the end of what was fetched
// ahead of it (a block index), and its readahead window in blocks.
type stream struct {
	end, aheadEnd, window int64
	used                  int64 // a counter value: the least recently used stream is replaced
}

// pinRange is the inclusive block range of one ongoing read.
type pinRange struct{ first, last int64 }

// fetch is one coalesced source read of blocks [first, last], shared by every reader that needs them. Its blocks
// are served as they arrive: a reader waits for the blocks it needs, not for the whole read.
type fetch struct {
	first, last int64 // fixed once another reader can see the fetch
	kind        fetchKind
	// direct is set for a store of bytes the caller holds (an import): they go straight to the data file, and
	// the readers waiting for them read them there once the fetch ends. Fixed at creation.
	direct bool
	// dropped is set (under the blob's mu) when Reader.Evict drops the fetch's blocks while it runs: its bytes are
	// suspect and never stored.
	dropped bool

	mu    sync.Mutex
	buf   []byte        // the bytes of the blocks, from first*BlockSize; set before the first block is ready
	ready int64         // blocks of buf that hold their bytes, from first
	ended bool          // the source read is over; err says how
	err   error         // why the blocks from first+ready on never arrive
	wake  chan struct{} // closed and replaced when ready or ended changes
}

func newFetch(first, last int64, kind fetchKind) *fetch {
	return &fetch{first: first, last: last, kind: kind, wake: make(chan struct{})}
}

// arrived records that the first n bytes of buf hold their bytes (bs: the block size) and wakes the readers
// when a block is complete.
func (f *fetch) arrived(n, bs int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	blocks := n / bs
	if n == int64(len(f.buf)) {
		blocks = f.last - f.first + 1
	}
	if blocks > f.ready {
		f.ready = blocks
		close(f.wake)
		f.wake = make(chan struct{})
	}
}

// end records that the source read is over, with err when it failed, and wakes the readers.
func (f *fetch) end(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ended, f.err = true, err
	close(f.wake)
	f.wake = make(chan struct{})
}

// wait waits until block i of the fetch has arrived and returns buf, or the error that stopped it from arriving.
// For a direct fetch it waits until the fetch ends and returns no bytes: the reader reads the data file again.
func (f *fetch) wait(i int64) ([]byte, error) {
	for {
		f.mu.Lock()
		ready, ended, err, wake := f.ready, f.ended, f.err, f.wake
		buf := f.buf
		f.mu.Unlock()
		switch {
		case f.direct && ended:
			return nil, nil
		case i-f.first < ready:
			return buf, nil
		case ended && err != nil:
			return nil, err
		case ended:
			return nil, errors.New("cache: internal error: a fetch ended without its blocks")
		}
		<-wake
	}
}

// blockBytes returns the size of block i (the last one may be short). b.size must be stable.
func (b *blob) blockBytes(i int64) int64 {
	bs := b.c.opts.BlockSize
	return min(bs, b.size-i*bs)
}

// pinned reports whether block i is in an ongoing read. b.mu is held.
func (b *blob) pinned(i int64) bool {
	for _, p := range b.pins {
		if i >= p.first && i <= p.last {
			return true
		}
	}
	return false
}

// unpin ends the pin of an ongoing read.
func (b *blob) unpin(p pinRange) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, q := range b.pins {
		if q == p {
			last := len(b.pins) - 1
			b.pins[i] = b.pins[last]
			b.pins = b.pins[:last]
			return
		}
	}
}

// openFileLocked returns the data file, creating it (sparse, of the blob's size) if create is set. b.mu is held.
func (b *blob) openFileLocked(create bool) (*os.File, error) {
	if b.file != nil {
		return b.file, nil
	}
	flags := os.O_RDWR
	if create {
		flags |= os.O_CREATE
		if err := os.MkdirAll(filepath.Dir(b.dataPath), 0o700); err != nil {
			return nil, err
		}
	}
	f, err := os.OpenFile(b.dataPath, flags, 0o600)
	if err != nil {
		return nil, err
	}
	if fi, err := f.Stat(); err != nil || fi.Size() != b.size {
		if err == nil {
			err = f.Truncate(b.size)
		}
		if err != nil {
			f.Close()
			return nil, err
		}
	}
	b.file = f
	return f, nil
}

// markPresent records blocks [first, last] as stored.
func (b *blob) markPresent(f *fetch, first, last int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if f != nil && f.dropped {
		return false
	}
	for i := first; i <= last; i++ {
		if !bitSet(b.present, i) {
			b.present[i/64] |= 1 << (i % 64)
			b.presentBytes += b.blockBytes(i)
		}
	}
	b.dirty = true
	return true
}

// evict drops up to need bytes of present blocks in [first, last] (need < 0: all of them) and returns the bytes
// dropped. Blocks pinned by ongoing reads are skipped, unless force is set (Reader.Evict drops corrupt blocks);
// then they are forgotten but their bytes are left for the readers, and the next fetch overwrites them.
// The state file is rewritten durably before any data is discarded, so a crash in between loses blocks but never
// exposes discarded ones. whole lets it delete the files when the blob has no present, pinned or in-flight blocks
// left. The caller holds Cache.mu and adjusts Cache.used.
func (b *blob) evict(first, last, need int64, whole, force bool) (int64, error) {
	b.stateMu.Lock()
	defer b.stateMu.Unlock()
	b.mu.Lock()
	defer b.mu.Unlock()
	var freed, blocks int64
	var runs []pinRange // dropped unpinned block runs, to punch
	for i := first; i <= last && (need < 0 || freed < need); i++ {
		if !bitSet(b.present, i) {
			continue
		}
		pinned := b.pinned(i)
		if pinned && !force {
			continue
		}
		b.present[i/64] &^= 1 << (i % 64)
		n := b.blockBytes(i)
		b.presentBytes -= n
		freed += n
		blocks++
		if pinned {
			continue
		}
		if k := len(runs) - 1; k >= 0 && runs[k].last == i-1 {
			runs[k].last = i
		} else {
			runs = append(runs, pinRange{i, i})
		}
	}
	if blocks == 0 {
		return 0, nil
	}
	b.drops++
	b.c.evictions.Add(blocks)
	b.c.evictedBytes.Add(freed)
	if err := b.writeStateLocked(); err != nil {
		// The old state may still list the dropped blocks: their bytes must stay. Memory and the capacity
		// accounting already forget them; the next successful state write makes it durable.
		b.c.log.Warn("cache: cannot record evicted blocks; keeping their bytes", "blob", b.key, "err", err)
		return freed, err
	}
	if whole && b.presentBytes == 0 && len(b.pins) == 0 && len(b.inflight) == 0 {
		if b.file != nil {
			b.file.Close()
			b.file = nil
		}
		if err := os.Remove(b.dataPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			b.c.log.Warn("cache: cannot remove an evicted data file", "path", b.dataPath, "err", err)
		}
		return freed, nil
	}
	f, err := b.openFileLocked(false)
	if err != nil {
		return freed, nil // nothing to punch
	}
	bs := b.c.opts.BlockSize
	for _, r := range runs {
		off := r.first * bs
		end := min((r.last+1)*bs, b.size)
		if err := punchHole(f, off, end-off); err != nil && b.c.punchWarned.CompareAndSwap(false, true) {
			b.c.log.Warn("cache: cannot punch holes in data files; evicted bytes keep their disk space until refetched",
				"dir", b.c.opts.Dir, "err", err)
		}
	}
	return freed, nil
}

// flush makes the stored blocks durable and records them in the state file. all also records a changed last
// access time. Reads of the blob go on meanwhile: only the snapshot of the bitmap is taken under b.mu.
func (b *blob) flush(all bool) error {
	b.stateMu.Lock()
	defer b.stateMu.Unlock()
	b.mu.Lock()
	if !b.dirty && !(all && b.presentBytes > 0 && b.lastAccess.Load() != b.savedAccess) {
		b.mu.Unlock()
		return nil
	}
	snap := b.snapshotLocked()
	b.mu.Unlock()
	err := b.persist(snap, false)
	if err != nil {
		b.mu.Lock()
		b.dirty = true
		b.mu.Unlock()
	}
	return err
}

// writeStateLocked records the present bitmap durably, directory included: evictions need that, as an older
// state listing the dropped blocks must not reappear after a crash. b.stateMu and b.mu are held.
func (b *blob) writeStateLocked() error {
	err := b.persist(b.snapshotLocked(), true)
	if err != nil {
		b.dirty = true
	}
	return err
}

// stateSnapshot is what persist writes.
type stateSnapshot struct {
	file       *os.File // data file to fsync first, nil if not open (then nothing unsynced is in it)
	buf        []byte   // encoded state, nil when no block is present
	lastAccess int64
}

// snapshotLocked captures the state to persist and clears dirty. b.mu is held.
func (b *blob) snapshotLocked() stateSnapshot {
	b.dirty = false
	s := stateSnapshot{file: b.file, lastAccess: b.lastAccess.Load()}
	if b.presentBytes > 0 {
		s.buf = encodeState(&state{blockSize: b.c.opts.BlockSize, size: b.size, lastAccess: s.lastAccess, present: b.present})
	}
	return s
}

// persist fsyncs the data file, then atomically replaces the state file (or removes it when no block is
// present); syncDirectory also fsyncs the directory. b.stateMu is held, which keeps s.file open.
func (b *blob) persist(s stateSnapshot, syncDirectory bool) error {
	dir := filepath.Dir(b.statePath)
	if s.buf == nil {
		if err := os.Remove(b.statePath); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	} else {
		if s.file != nil {
			if err := s.file.Sync(); err != nil {
				return fmt.Errorf("sync data file: %w", err)
			}
		}
		tmp := b.statePath + ".tmp"
		if err := writeFileSync(tmp, s.buf); err != nil {
			_ = os.Remove(tmp)
			return err
		}
		if err := os.Rename(tmp, b.statePath); err != nil {
			_ = os.Remove(tmp)
			return err
		}
	}
	b.savedAccess = s.lastAccess
	if syncDirectory {
		return syncDir(dir)
	}
	return nil
}

// writeFileSync writes a new file and fsyncs it.
func writeFileSync(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// resetLocked empties the blob and gives it a new size. The caller holds b.stateMu and b.mu and made sure no
// block is present, pinned or in flight.
func (b *blob) resetLocked(size int64) {
	if b.file != nil {
		b.file.Close()
		b.file = nil
	}
	b.drops++
	b.size, b.nblocks = size, numBlocks(size, b.c.opts.BlockSize)
	b.present = make([]uint64, (b.nblocks+63)/64)
	b.ahead, b.aheadRA, b.streams = nil, nil, [4]stream{}
}

// setAhead marks block i as fetched ahead of its readers, by readahead or by Prefetch. b.mu is held.
func (b *blob) setAhead(i int64, readahead bool) {
	if b.ahead == nil {
		b.ahead, b.aheadRA = make([]uint64, (b.nblocks+63)/64), make([]uint64, (b.nblocks+63)/64)
	}
	b.ahead[i/64] |= 1 << (i % 64)
	if readahead {
		b.aheadRA[i/64] |= 1 << (i % 64)
	} else {
		b.aheadRA[i/64] &^= 1 << (i % 64)
	}
}

// takeAhead clears the fetched-ahead marks of block i and reports whether it was fetched ahead, and whether by
// readahead. b.mu is held.
func (b *blob) takeAhead(i int64) (ahead, byReadahead bool) {
	if b.ahead == nil || !bitSet(b.ahead, i) {
		return false, false
	}
	b.ahead[i/64] &^= 1 << (i % 64)
	byReadahead = bitSet(b.aheadRA, i)
	b.aheadRA[i/64] &^= 1 << (i % 64)
	return true, byReadahead
}

// touch records an access now.
func (b *blob) touch() { b.lastAccess.Store(time.Now().UnixNano()) }
