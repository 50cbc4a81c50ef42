package cache

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"math/bits"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
)

// BlobInfo describes a blob in the cache.
type BlobInfo struct {
	Digest      digest.Digest
	Size        int64
	CachedBytes int64
	Blocks      int64 // present blocks
	TotalBlocks int64
	LastUse     time.Time
}

// Blobs lists the blobs that have cached blocks, most recently used first.
func (c *Cache) Blobs() []BlobInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []BlobInfo
	for _, b := range c.blobs {
		b.mu.Lock()
		if b.presentBytes > 0 {
			var n int64
			for _, w := range b.present {
				n += int64(bits.OnesCount64(w))
			}
			out = append(out, BlobInfo{Digest: b.key, Size: b.size, CachedBytes: b.presentBytes, Blocks: n,
				TotalBlocks: b.nblocks, LastUse: time.Unix(0, b.lastAccess.Load())})
		}
		b.mu.Unlock()
	}
	slices.SortFunc(out, func(a, b BlobInfo) int { return b.LastUse.Compare(a.LastUse) })
	return out
}

// BlockSize returns the cache's block size: the unit of Blobs, snapshots and eviction.
func (c *Cache) BlockSize() int64 { return c.opts.BlockSize }

// EvictBlob drops the cached blocks of a blob, except those an ongoing read uses, and returns the bytes freed.
func (c *Cache) EvictBlob(key digest.Digest) (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.blobs[key]
	if b == nil {
		return 0, nil
	}
	b.mu.Lock()
	last := b.nblocks - 1
	b.mu.Unlock()
	if last < 0 {
		return 0, nil
	}
	freed, err := b.evict(0, last, -1, true, false)
	c.used -= freed
	if err != nil {
		return freed, fmt.Errorf("cache: blob %s: %w", key, err)
	}
	return freed, nil
}

// ExportedBlob describes the blocks of one blob written by ExportBlob: the data that follows is the blocks listed,
// in that order, each BlockSize bytes long but the blob's last block, which may be short.
type ExportedBlob struct {
	Digest    digest.Digest `json:"digest"`
	Size      int64         `json:"size"`
	BlockSize int64         `json:"block_size"`
	Blocks    []int64       `json:"blocks"`
	// CRCs are the CRC32C (Castagnoli) of each block's bytes: they guard the snapshot's transport, the blob's
	// digest its content. Snapshots written before had Sums (sha256 of each block) instead; both are read.
	CRCs []uint32        `json:"crc32c,omitempty"`
	Sums []digest.Digest `json:"sums,omitempty"`
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// blockOK reports whether the k-th block listed, blk, matches its CRC or sum.
func (e ExportedBlob) blockOK(k int, blk []byte) bool {
	if e.CRCs != nil {
		return crc32.Checksum(blk, crcTable) == e.CRCs[k]
	}
	return digest.Digest(fmt.Sprintf("sha256:%x", sha256.Sum256(blk))) == e.Sums[k]
}

// DataSize returns the bytes of the blocks e lists.
func (e ExportedBlob) DataSize() int64 {
	var n int64
	for _, i := range e.Blocks {
		n += min(e.BlockSize, e.Size-i*e.BlockSize)
	}
	return n
}

// Whole reports whether e holds every block of its blob.
func (e ExportedBlob) Whole() bool { return int64(len(e.Blocks)) == numBlocks(e.Size, e.BlockSize) }

// Validate checks that e describes blocks of its blob in ascending order, one sum each.
func (e ExportedBlob) Validate() error {
	if err := e.Digest.Validate(); err != nil {
		return fmt.Errorf("cache snapshot: blob %q: %w", e.Digest, err)
	}
	if e.Size <= 0 || e.BlockSize <= 0 || e.BlockSize > 64<<20 {
		return fmt.Errorf("cache snapshot: blob %s: size %d, block size %d", e.Digest, e.Size, e.BlockSize)
	}
	switch {
	case e.CRCs != nil && e.Sums != nil:
		return fmt.Errorf("cache snapshot: blob %s: both crc32c and sums", e.Digest)
	case e.CRCs != nil && len(e.CRCs) != len(e.Blocks):
		return fmt.Errorf("cache snapshot: blob %s: %d CRCs for %d blocks", e.Digest, len(e.CRCs), len(e.Blocks))
	case e.CRCs == nil && len(e.Sums) != len(e.Blocks):
		return fmt.Errorf("cache snapshot: blob %s: %d sums for %d blocks", e.Digest, len(e.Sums), len(e.Blocks))
	}
	nb := numBlocks(e.Size, e.BlockSize)
	for k, i := range e.Blocks {
		if i < 0 || i >= nb || k > 0 && i <= e.Blocks[k-1] {
			return fmt.Errorf("cache snapshot: blob %s: block %d out of order or range (%d blocks)", e.Digest, i, nb)
		}
		if e.Sums == nil {
			continue
		}
		if err := e.Sums[k].Validate(); err != nil || e.Sums[k].Algorithm() != digest.SHA256 {
			return fmt.Errorf("cache snapshot: blob %s: block %d: bad sum %q", e.Digest, i, e.Sums[k])
		}
	}
	return nil
}

// ExportBlob writes up to limit cached blocks of a blob (all of them when limit < 0) to w, and returns what it wrote
// and the digest of those bytes. Before the first byte it calls begin, if not nil, with their number (a tar header
// needs it ahead); a blob without cached blocks writes nothing. It runs beside reads and evictions: the blob's
// blocks are pinned while it runs, so none is evicted meanwhile and no block is torn.
func (c *Cache) ExportBlob(key digest.Digest, w io.Writer, limit int, begin func(size int64) error) (ExportedBlob, digest.Digest, error) {
	c.mu.Lock()
	b := c.blobs[key]
	c.mu.Unlock()
	bs := c.opts.BlockSize
	e := ExportedBlob{Digest: key, BlockSize: bs}
	if b == nil {
		return e, "", fmt.Errorf("cache: blob %s is not cached", key)
	}
	b.mu.Lock()
	e.Size = b.size
	pin := pinRange{0, b.nblocks - 1}
	b.pins = append(b.pins, pin)
	for i := int64(0); i < b.nblocks && (limit < 0 || len(e.Blocks) < limit); i++ {
		if bitSet(b.present, i) {
			e.Blocks = append(e.Blocks, i)
		}
	}
	b.mu.Unlock()
	defer b.unpin(pin)
	if len(e.Blocks) == 0 {
		return e, "", nil
	}
	if begin != nil {
		if err := begin(e.DataSize()); err != nil {
			return e, "", err
		}
	}
	r := &Reader{c: c, b: b, key: key, size: e.Size}
	// Runs of consecutive blocks, up to importRun bytes, are read with one system call each. On another goroutine,
	// the blocks' CRCs are computed and w takes the run, and a third hashes the runs w took; meanwhile the next runs
	// are read.
	e.CRCs = make([]uint32, 0, len(e.Blocks))
	h := sha256.New()
	var werr error
	var failed atomic.Bool
	p := newBufPipe(max(bs, importRun/bs*bs), exportDepth, func(_ int64, run []byte) {
		for o := 0; o < len(run); o += int(bs) {
			e.CRCs = append(e.CRCs, crc32.Checksum(run[o:min(len(run), o+int(bs))], crcTable))
		}
		if werr == nil {
			if _, werr = w.Write(run); werr != nil {
				failed.Store(true)
			}
		}
	}, func(_ int64, run []byte) { h.Write(run) })
	defer p.close()
	for k := 0; k < len(e.Blocks) && !failed.Load(); {
		first := e.Blocks[k]
		run := p.buffer()[:0]
		for ; k < len(e.Blocks) && e.Blocks[k] == first+int64(len(run))/bs && int64(len(run))+bs <= int64(cap(run)); k++ {
			run = run[:len(run)+int(b.blockBytes(e.Blocks[k]))]
		}
		if err := r.readDisk(run, first*bs); err != nil {
			p.release(run)
			return e, "", fmt.Errorf("cache: blob %s: blocks from %d: %w", key, first, err)
		}
		p.send(0, run)
	}
	p.close()
	if werr != nil {
		return e, "", werr
	}
	return e, digest.NewDigest(digest.SHA256, h), nil
}

// bufPipe passes buffers through stages of work, each on a goroutine of its own, while the caller goes on: the
// caller takes a buffer, fills it and sends it (with an offset); each stage works on the buffers in the order sent,
// the first stage first; a buffer is taken back once the last stage is done with it. A slow stage (hashing) thus
// overlaps with the stages before it on other buffers, up to depth buffers in all.
type bufPipe struct {
	free chan []byte
	in   chan pipeJob
	done chan struct{}
}

type pipeJob struct {
	off int64
	buf []byte
}

// The buffers of an export and of an import, measured (BenchmarkCacheSnapshot of internal/node): an export, whose
// reads are as fast as its hashing, ran at 630–670 MB/s with 3 and 560–590 with 6; an import, whose hashing trails
// its stores, at 900 with 6 and 655 with 3.
const (
	exportDepth = 3
	importDepth = 6
)

func newBufPipe(size int64, depth int, stages ...func(off int64, buf []byte)) *bufPipe {
	p := &bufPipe{free: make(chan []byte, depth), in: make(chan pipeJob, depth), done: make(chan struct{})}
	for range depth {
		p.free <- make([]byte, size)
	}
	in := p.in
	for k, work := range stages {
		var out chan pipeJob
		if k < len(stages)-1 {
			out = make(chan pipeJob, depth)
		}
		go func(in <-chan pipeJob) {
			if out == nil {
				defer close(p.done)
			} else {
				defer close(out)
			}
			for j := range in {
				work(j.off, j.buf)
				if out != nil {
					out <- j
				} else {
					p.free <- j.buf[:cap(j.buf)]
				}
			}
		}(in)
		in = out
	}
	return p
}

func (p *bufPipe) buffer() []byte             { return <-p.free }
func (p *bufPipe) release(buf []byte)         { p.free <- buf[:cap(buf)] }
func (p *bufPipe) send(off int64, buf []byte) { p.in <- pipeJob{off, buf} }

// close waits for the work on every buffer sent; it may be called again.
func (p *bufPipe) close() {
	select {
	case <-p.done:
	default:
		close(p.in)
		<-p.done
	}
}

// ImportResult says what ImportBlob did.
type ImportResult struct {
	Imported int64 // blocks stored
	Present  int64 // blocks that were cached already
	Dropped  int64 // blocks whose bytes did not match their sum
	// Full is set when the cache had no room for more blocks: the rest were not stored.
	Full bool
	// Verified is set when the blob is complete and matches its digest; a complete blob that does not match is
	// dropped whole (ErrDigestMismatch).
	Verified bool
}

// ImportBlob stores the blocks e lists, read from data, into the cache: each is checked against its CRC (one that
// fails is dropped, never stored), none evicts cached blocks (the import stops at the cache's bound), and a blob
// that is then complete is checked against its digest.
func (c *Cache) ImportBlob(ctx context.Context, e ExportedBlob, data io.Reader) (ImportResult, error) {
	finish, res, err := c.StartImport(ctx, e, data)
	if err != nil {
		return res, err
	}
	return finish()
}

// StartImport is ImportBlob in two steps: it returns once data is read, and finish waits for the rest (the last
// blocks stored, the digest of a complete blob checked) and returns the result. The caller may read the next
// blob's data meanwhile: the hashing of one blob then overlaps with the storing of the next. finish must be
// called; when StartImport fails, res says what was done.
func (c *Cache) StartImport(ctx context.Context, e ExportedBlob, data io.Reader) (finish func() (ImportResult, error), res ImportResult, err error) {
	if err := e.Validate(); err != nil {
		return nil, res, err
	}
	if e.BlockSize%c.opts.BlockSize != 0 {
		return nil, res, fmt.Errorf("cache snapshot: blob %s: blocks of %d bytes, which this cache's blocks of %d do not divide", e.Digest,
			e.BlockSize, c.opts.BlockSize)
	}
	c.mu.Lock()
	if b := c.blobs[e.Digest]; b != nil {
		b.mu.Lock()
		size := b.size
		b.mu.Unlock()
		if size != e.Size {
			c.mu.Unlock()
			return nil, res, fmt.Errorf("cache snapshot: blob %s has %d bytes, the cache knows it with %d", e.Digest, e.Size, size)
		}
	}
	c.mu.Unlock()
	r := c.Reader(e.Digest, e.Size, noSource{})
	if r.b == nil {
		return nil, res, fmt.Errorf("cache: blob %s cannot be cached (closed cache)", e.Digest)
	}
	// Blocks are stored in runs of consecutive blocks, up to importRun bytes each, straight from the buffer they
	// were read into, on another goroutine while the next run is read and its blocks checked. A snapshot of the
	// whole blob is hashed there too, run by run: when every block is stored from the stream, that hash verifies
	// the blob without reading it back.
	nb := numBlocks(e.Size, e.BlockSize)
	runCap := max(e.BlockSize, importRun/e.BlockSize*e.BlockSize)
	all := e.Whole() // every block stored from the stream, so far
	var wholeHash hash.Hash
	if all {
		wholeHash = e.Digest.Algorithm().Hash()
	}
	var st importState
	store := func(off int64, run []byte) {
		if full, err := st.get(); full || err != nil {
			return
		}
		err := r.storeDirect(off, run)
		stored := numBlocks(int64(len(run)), e.BlockSize)
		if err != nil {
			stored = 0
		}
		if errors.Is(err, ErrFull) && len(run) > int(e.BlockSize) {
			// Near the bound: store what fits, block by block.
			for o := int64(0); o < int64(len(run)); o += e.BlockSize {
				if err = r.storeDirect(off+o, run[o:min(o+e.BlockSize, int64(len(run)))]); err != nil {
					break
				}
				stored++
			}
		}
		if err != nil && !errors.Is(err, ErrFull) {
			err = fmt.Errorf("cache: blob %s: blocks at %d: %w", e.Digest, off, err)
		}
		st.add(stored, err)
	}
	// The runs are hashed on a goroutine of their own, behind the one storing them: on two cores, hashing and
	// storing in turn made one goroutine the import's bottleneck.
	stages := []func(int64, []byte){store}
	if wholeHash != nil {
		stages = append(stages, func(_ int64, run []byte) { wholeHash.Write(run) })
	}
	p := newBufPipe(runCap, importDepth, stages...)
	closed := false // the pipe is handed to finishImport
	defer func() {
		if !closed {
			p.close()
		}
	}()
	run, runOff := p.buffer()[:0], int64(0)
	// flush hands the run over to be stored, and fails when the import cannot go on.
	flush := func() error {
		if len(run) > 0 {
			p.send(runOff, run)
			run = p.buffer()[:0]
		}
		_, err := st.get()
		return err
	}
	skip := make([]byte, e.BlockSize)
	for k, i := range e.Blocks {
		if err := ctx.Err(); err != nil {
			return nil, res, err
		}
		off, n := i*e.BlockSize, min(e.BlockSize, e.Size-i*e.BlockSize)
		if len(run) > 0 && (runOff+int64(len(run)) != off || int64(len(run))+n > runCap) {
			if err := flush(); err != nil {
				return nil, res, err
			}
		}
		if full, _ := st.get(); full {
			if _, err := io.ReadFull(data, skip[:n]); err != nil { // read past the rest
				return nil, res, fmt.Errorf("cache snapshot: blob %s: block %d: %w", e.Digest, i, err)
			}
			continue
		}
		if len(run) == 0 {
			runOff = off
		}
		blk := run[len(run) : len(run)+int(n)]
		if _, err := io.ReadFull(data, blk); err != nil {
			return nil, res, fmt.Errorf("cache snapshot: blob %s: block %d: %w", e.Digest, i, err)
		}
		if !e.blockOK(k, blk) {
			res.Dropped++
			all = false
			if err := flush(); err != nil {
				return nil, res, err
			}
			continue
		}
		switch missing := r.missingBytes(off, n); {
		case missing == 0:
			res.Present++
			all = false
			if err := flush(); err != nil {
				return nil, res, err
			}
			continue
		case missing < n:
			all = false // some of the cache's smaller blocks were there: not all bytes come from the stream
		}
		run = run[:len(run)+int(n)]
	}
	if err := flush(); err != nil {
		return nil, res, err
	}
	closed = true
	done := make(chan struct{})
	var fres ImportResult
	var ferr error
	go func() {
		defer close(done)
		fres, ferr = c.finishImport(ctx, p, r, &st, e, res, all, nb, wholeHash)
	}()
	return func() (ImportResult, error) {
		<-done
		return fres, ferr
	}, res, nil
}

// finishImport waits for the runs of an import to be stored and hashed, and checks the blob once complete.
func (c *Cache) finishImport(ctx context.Context, p *bufPipe, r *Reader, st *importState, e ExportedBlob, res ImportResult,
	all bool, nb int64, wholeHash hash.Hash) (ImportResult, error) {
	p.close()
	full, err := st.get()
	st.mu.Lock()
	res.Imported, res.Full = st.imported, full
	st.mu.Unlock()
	if err != nil {
		return res, err
	}
	if full {
		all = false
	}
	if r.presentBytes() != e.Size {
		return res, nil
	}
	if all && res.Imported == nb {
		// Every block in the cache is a block just hashed.
		if got := digest.NewDigest(e.Digest.Algorithm(), wholeHash); got != e.Digest {
			_ = r.Evict(0, e.Size)
			return res, fmt.Errorf("%w: blob %s hashes to %s; its cached blocks were dropped", ErrDigestMismatch, e.Digest, got)
		}
	} else if err := r.Download(ctx, DownloadOptions{}); err != nil {
		return res, err
	}
	res.Verified = true
	return res, nil
}

// importRun bounds the bytes of consecutive blocks an import stores at once.
const importRun = 1 << 20

// importState is what the storing goroutine of an import tells the reading one.
type importState struct {
	mu       sync.Mutex
	imported int64 // blocks stored
	full     bool  // the cache had no room for a block: nothing more is stored
	err      error // a failure that ends the import
}

func (s *importState) get() (full bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.full, s.err
}

// add counts stored blocks and records how the storing of a run ended.
func (s *importState) add(stored int64, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.imported += stored
	switch {
	case errors.Is(err, ErrFull):
		s.full = true
	case err != nil && s.err == nil:
		s.err = err
	}
}

// noSource is the source of an import's Reader: the import stores every block it brings, and nothing is fetched.
type noSource struct{}

func (noSource) ReadAt(p []byte, off int64) (int, error) {
	return 0, fmt.Errorf("cache import: bytes %d+%d are not in the snapshot", off, len(p))
}
