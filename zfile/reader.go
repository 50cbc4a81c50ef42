package zfile

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
)

const (
	// chunkSize bounds the compressed bytes fetched by one underlying ReadAt (a single record,
	// at most maxRecord(maxBlockSize), always fits).
	chunkSize = 1 << 20
	// smallChunk is the size of the pooled buffers used for reads of a few blocks.
	smallChunk = 64 << 10
	// indexChunk is the unit in which the index is read, with indexReaders reads in flight.
	indexChunk   = 1 << 20
	indexReaders = 4
)

// Reader gives random access to the uncompressed content of a ZFile. It is safe for concurrent use.
type Reader struct {
	r         io.ReaderAt
	info      Info
	verify    bool     // check block CRCs on read
	crcLen    int      // 4 if block records end with a CRC, else 0
	bsShift   uint     // log2(block size)
	gShift    uint     // log2(blocks per jump-table group)
	partial   []int64  // record offset of the first block of each group (and of the end)
	deltas    []uint16 // record offset of each block (and of the end) relative to its group
	smallPool sync.Pool
	largePool sync.Pool
	blockPool sync.Pool
	id        uint64 // names the Reader in the decoded-block cache
	pre       atomic.Pointer[Predecoded]
}

// Open opens the ZFile of the given compressed size held by r. It validates the header, trailer
// (unless the header was overwritten with the final fields), digests and index, and builds the jump
// table. When verify is set, ReadAt checks the CRC of every block it decompresses (if the file has them).
func Open(r io.ReaderAt, size int64, verify bool) (*Reader, error) {
	if size < SlotSize {
		return nil, errorf(ErrFormat, "file too small (%d bytes)", size)
	}
	buf := make([]byte, SlotSize)
	if err := readFull(r, buf, 0, "header"); err != nil {
		return nil, err
	}
	hdr, err := parseSlot(buf)
	if err != nil {
		return nil, err
	}
	if hdr.flags&FlagHeader == 0 {
		return nil, errorf(ErrFormat, "header slot has the trailer flag (flags %#x)", hdr.flags)
	}
	if hdr.flags&FlagDigest != 0 {
		if c := slotDigest(buf); c != hdr.digest {
			return nil, errorf(ErrChecksum, "header digest mismatch (stored %08x, computed %08x)", hdr.digest, c)
		}
	}
	info := Info{Size: size, HeaderFlags: hdr.flags, HeaderOverwrite: hdr.flags&FlagHeaderOverwrite != 0}
	trailerOff := size - SlotSize
	sel := hdr
	if !info.HeaderOverwrite {
		if hdr.flags&FlagData == 0 {
			return nil, errorf(ErrFormat, "header flags %#x: not a data file", hdr.flags)
		}
		if size < 2*SlotSize {
			return nil, errorf(ErrFormat, "file too small for header and trailer (%d bytes)", size)
		}
		if err := readFull(r, buf, trailerOff, "trailer"); err != nil {
			return nil, err
		}
		t, err := parseSlot(buf)
		if err != nil {
			return nil, errorf(ErrFormat, "trailer: bad magic")
		}
		const want = FlagData | FlagSealed
		if t.flags&FlagHeader != 0 || t.flags&want != want {
			return nil, errorf(ErrFormat, "trailer flags %#x: want a sealed data-file trailer", t.flags)
		}
		if t.flags&FlagDigest != 0 {
			if c := slotDigest(buf); c != t.digest {
				return nil, errorf(ErrChecksum, "trailer digest mismatch (stored %08x, computed %08x)", t.digest, c)
			}
		}
		info.TrailerFlags = t.flags
		sel = t
	}
	z := &Reader{r: r, info: info, id: readerIDs.Add(1)}
	if err := z.setup(sel, trailerOff); err != nil {
		return nil, err
	}
	z.verify = verify && z.info.Verify
	return z, nil
}

// setup validates the fields of the selected slot, reads the index and builds the jump table.
func (z *Reader) setup(s slot, trailerOff int64) error {
	switch s.algo {
	case AlgoLZ4, AlgoZSTD:
	default:
		return errorf(ErrUnsupported, "algorithm %v not supported", s.algo)
	}
	bs := s.blockSize
	if bs < minBlockSize || bs > maxBlockSize || bs&(bs-1) != 0 {
		return errorf(ErrFormat, "block_size %d is not a power of two in [%d, %d]", bs, minBlockSize, maxBlockSize)
	}
	if s.indexSize > maxIndexSize {
		return errorf(ErrFormat, "index_size %d exceeds the limit of %d", s.indexSize, maxIndexSize)
	}
	dataStart := uint64(SlotSize) + uint64(s.dictSize)
	indexBytes := 4 * s.indexSize
	if s.indexOffset < dataStart || s.indexOffset > uint64(trailerOff) || indexBytes > uint64(trailerOff)-s.indexOffset {
		return errorf(ErrFormat, "index_size %d does not fit before trailer (index_offset %d, trailer at %d)",
			s.indexSize, s.indexOffset, trailerOff)
	}
	bsShift := log2(bs)
	if s.origSize > s.indexSize<<bsShift || s.indexSize != (s.origSize+uint64(bs)-1)>>bsShift {
		return errorf(ErrFormat, "index_size %d does not match original_file_size %d with block_size %d",
			s.indexSize, s.origSize, bs)
	}
	z.info.Algorithm = s.algo
	z.info.BlockSize = int(bs)
	z.info.Blocks = int64(s.indexSize)
	z.info.OriginalSize = int64(s.origSize)
	z.info.Verify = s.verify
	z.info.HasDigest = s.flags&FlagDigest != 0
	z.info.IndexOffset = int64(s.indexOffset)
	z.info.IndexCRC = s.indexCRC
	z.bsShift = bsShift
	z.gShift = 16 - bsShift
	if s.verify {
		z.crcLen = crcSize
	}

	// The trailer of a header-overwrite file is not needed, but when it follows the index (as
	// written by upstream and by this package) it comes with the same read and its flags are reported.
	var tail int64
	if z.info.HeaderOverwrite && s.indexOffset+indexBytes == uint64(trailerOff) {
		tail = SlotSize
	}
	index, err := readIndex(z.r, int64(s.indexOffset), int64(indexBytes)+tail)
	if err != nil {
		return err
	}
	if tail != 0 {
		if t, err := parseSlot(index[indexBytes:]); err == nil && t.flags&FlagHeader == 0 {
			z.info.TrailerFlags = t.flags
		}
		index = index[:indexBytes]
	}
	if z.info.HasDigest {
		if c := crc32c(0, index); c != s.indexCRC {
			return errorf(ErrChecksum, "index CRC mismatch (stored %08x, computed %08x)", s.indexCRC, c)
		}
	}
	return z.buildJumpTable(index, int64(dataStart))
}

// buildJumpTable validates the record lengths and builds upstream's jump table: an absolute
// offset every 64 KiB of uncompressed data and a 16-bit offset within the group for each block.
func (z *Reader) buildJumpTable(index []byte, dataStart int64) error {
	n := int64(len(index) / 4)
	gMask := int64(1)<<z.gShift - 1
	maxRec := uint32(maxRecord(z.info.BlockSize))
	z.partial = make([]int64, 0, n>>z.gShift+1)
	z.deltas = make([]uint16, n+1)
	pos := dataStart
	z.partial = append(z.partial, pos)
	var delta uint32
	for i := int64(1); i <= n; i++ {
		l := binary.LittleEndian.Uint32(index[4*(i-1):])
		if l <= uint32(z.crcLen) || l > maxRec {
			return blockErr(i-1, pos, ErrFormat, "index: record length %d out of range [%d, %d]", l, z.crcLen+1, maxRec)
		}
		pos += int64(l)
		if i&gMask == 0 {
			z.partial = append(z.partial, pos)
			delta = 0
			continue
		}
		delta += l
		if delta >= 0xffff {
			return blockErr(i-1, pos-int64(l), ErrFormat, "index: records of one 64 KiB group exceed 65535 bytes")
		}
		z.deltas[i] = uint16(delta)
	}
	if pos != z.info.IndexOffset {
		return errorf(ErrFormat, "compressed blocks end at %d but index_offset is %d", pos, z.info.IndexOffset)
	}
	return nil
}

// readIndex reads n bytes of index at off in chunks, several in flight.
func readIndex(r io.ReaderAt, off, n int64) ([]byte, error) {
	index := make([]byte, n)
	chunks := (n + indexChunk - 1) / indexChunk
	if chunks <= 1 {
		return index, readFull(r, index, off, "index")
	}
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs error
		sem  = make(chan struct{}, indexReaders)
	)
	for c := int64(0); c < chunks; c++ {
		lo, hi := c*indexChunk, min((c+1)*indexChunk, n)
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := readFull(r, index[lo:hi], off+lo, "index"); err != nil {
				mu.Lock()
				errs = errors.Join(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return index, errs
}

// readFull reads len(p) bytes at off, turning a short read into io.ErrUnexpectedEOF.
func readFull(r io.ReaderAt, p []byte, off int64, what string) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("zfile: read %s (%d bytes at %d): %w", what, len(p), off, err)
}

// offset returns the byte offset of block i's record; offset(Blocks) is the index offset.
func (z *Reader) offset(i int64) int64 {
	return z.partial[i>>z.gShift] + int64(z.deltas[i])
}

// CompressedRange returns the range of the file (offset, length) holding the compressed blocks of the
// uncompressed bytes [off, off+n) — what a cache below the Reader must hold to serve them. The range is clamped to
// the content; it is empty when nothing of [off, off+n) exists.
func (z *Reader) CompressedRange(off, n int64) (int64, int64) {
	end := min(off+n, z.info.OriginalSize)
	off = max(off, 0)
	if n <= 0 || end <= off {
		return 0, 0
	}
	first, last := off>>z.bsShift, (end-1)>>z.bsShift
	start := z.offset(first)
	return start, z.offset(last+1) - start
}

// Size returns the original (uncompressed) size.
func (z *Reader) Size() int64 { return z.info.OriginalSize }

// Info returns the file's parameters.
func (z *Reader) Info() Info { return z.info }

// Evicter is implemented by a cache under a Reader. When a block fails its check (CRC or decompression), the
// Reader evicts the block's compressed bytes from the cache and reads them again, at most MaxReloads times,
// before it reports the error: a corrupt cached range is refetched, never served.
type Evicter interface {
	Evict(off, n int64) error
}

// MaxReloads bounds how often ReadAt evicts and re-reads a bad block.
const MaxReloads = 2

// ReadAt reads len(p) uncompressed bytes at off, with io.ReaderAt semantics. The compressed bytes of
// consecutive blocks are fetched with one underlying ReadAt per chunk of at most 1 MiB.
func (z *Reader) ReadAt(p []byte, off int64) (int, error) {
	n, err := z.readAt(p, off, z.verify)
	ev, ok := z.r.(Evicter)
	for try := 0; ok && err != nil && try < MaxReloads; try++ {
		var be *BlockError
		if !errors.As(err, &be) || errors.Is(err, ErrFormat) {
			break
		}
		if ev.Evict(be.Offset, z.offset(be.Block+1)-be.Offset) != nil {
			break
		}
		n, err = z.readAt(p, off, z.verify)
	}
	return n, err
}

// Check verifies every block: its CRC (if the file has them) and that it decompresses to the
// expected length. The error names the first bad block (see BlockError).
func (z *Reader) Check() error {
	buf := make([]byte, chunkSize)
	for off := int64(0); off < z.info.OriginalSize; off += int64(len(buf)) {
		if _, err := z.readAt(buf, off, true); err != nil && err != io.EOF {
			return err
		}
	}
	return nil
}

// Decompress writes the whole uncompressed content of z to w and returns the number of bytes
// written. Block CRCs are checked if z was opened with verify.
func Decompress(w io.Writer, z *Reader) (int64, error) {
	buf := make([]byte, 4*chunkSize)
	var written int64
	for written < z.info.OriginalSize {
		n, err := z.ReadAt(buf, written)
		if n > 0 {
			m, werr := w.Write(buf[:n])
			written += int64(m)
			if werr != nil {
				return written, werr
			}
		}
		if err != nil && err != io.EOF {
			return written, err
		}
	}
	return written, nil
}

// getBuf returns a pooled buffer for n ≤ chunkSize compressed bytes: a small one (smallChunk)
// for the common reads of a few blocks, else a chunkSize one.
func (z *Reader) getBuf(n int) *[]byte {
	pool, size := &z.smallPool, smallChunk
	if n > smallChunk {
		pool, size = &z.largePool, chunkSize
	}
	if b, ok := pool.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, size)
	return &b
}

// putBuf returns a buffer from getBuf to its pool.
func (z *Reader) putBuf(b *[]byte) {
	if len(*b) == smallChunk {
		z.smallPool.Put(b)
	} else {
		z.largePool.Put(b)
	}
}

// readAt is ReadAt, checking block CRCs if verify (and the file has them).
func (z *Reader) readAt(p []byte, off int64, verify bool) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("zfile: ReadAt: negative offset %d", off)
	}
	size := z.info.OriginalSize
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	end := off + int64(len(p))
	var eof error
	if end > size || end < off {
		end, eof = size, io.EOF
	}
	if end == off {
		return 0, nil
	}
	first, last := off>>z.bsShift, (end-1)>>z.bsShift
	pre := z.pre.Load()
	for b := first; b <= last; {
		if pre != nil {
			bStart := b << z.bsShift
			from, to := max(off, bStart), min(end, bStart+int64(1)<<z.bsShift)
			if pre.get(predecodedKey{z.id, b}, p[from-off:to-off], from-bStart) {
				b++
				continue
			}
			pre.missed.Add(1)
		}
		start := z.offset(b)
		e := b + 1
		for e <= last && z.offset(e+1)-start <= chunkSize && (pre == nil || !pre.has(predecodedKey{z.id, e})) {
			e++
		}
		clen := int(z.offset(e) - start)
		cbuf := z.getBuf(clen)
		comp := (*cbuf)[:clen]
		if err := readFull(z.r, comp, start, "blocks"); err != nil {
			z.putBuf(cbuf)
			return 0, fmt.Errorf("%w (blocks %d..%d)", err, b, e-1)
		}
		block := func(i int64) error {
			rs, re := z.offset(i)-start, z.offset(i+1)-start
			return z.decodeInto(i, comp[rs:re], start+rs, p, off, end, verify)
		}
		var err error
		if e-b == 1 || decodeWorkers < 2 {
			for i := b; i < e && err == nil; i++ {
				err = block(i)
			}
		} else {
			err = decodeParallel(b, e, block)
		}
		z.putBuf(cbuf)
		if err != nil {
			return 0, err
		}
		b = e
	}
	return int(end - off), eof
}

// decodeWorkers is how many blocks of one read are decoded at once: a read of several blocks (a device's
// read-ahead, a page fault's cluster) uses every core instead of one, which shortens the wait of the reader that
// faulted.
var decodeWorkers = runtime.GOMAXPROCS(0)

// decodeParallel runs block for blocks [b, e) on up to decodeWorkers goroutines and returns the error of the lowest
// block that failed.
func decodeParallel(b, e int64, block func(i int64) error) error {
	errs := make([]error, e-b)
	var next atomic.Int64
	next.Store(b)
	work := func() {
		for i := next.Add(1) - 1; i < e; i = next.Add(1) - 1 {
			errs[i-b] = block(i)
		}
	}
	var wg sync.WaitGroup
	for range min(int64(decodeWorkers), e-b) - 1 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			work()
		}()
	}
	work()
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// decodeInto checks the record rec of block i (at recOff in the file) if verify, and decodes the block's bytes in
// [off, end) into p, which holds [off, off+len(p)). A block p holds only in part is decoded aside and kept in the
// decoded-block cache.
func (z *Reader) decodeInto(i int64, rec []byte, recOff int64, p []byte, off, end int64, verify bool) error {
	data := rec[:len(rec)-z.crcLen]
	if verify && z.crcLen != 0 {
		stored := binary.LittleEndian.Uint32(rec[len(data):])
		if c := crc32c(blockCRCSeed, data); c != stored {
			return blockErr(i, recOff, ErrChecksum, "CRC mismatch (stored %08x, computed %08x)", stored, c)
		}
	}
	bStart := i << z.bsShift
	bLen := min(int64(1)<<z.bsShift, z.info.OriginalSize-bStart)
	from, to := max(off, bStart), min(end, bStart+bLen)
	var err error
	pre := z.pre.Load()
	if from == bStart && to == bStart+bLen {
		if err = decodeBlock(z.info.Algorithm, data, p[from-off:to-off]); err == nil && pre != nil {
			pre.offer(predecodedKey{z.id, i}, p[from-off:to-off])
		}
	} else if !decoded.get(z.id, i, p[from-off:to-off], from-bStart) {
		scratch := z.getBlock()
		blk := (*scratch)[:bLen]
		if err = decodeBlock(z.info.Algorithm, data, blk); err == nil {
			copy(p[from-off:to-off], blk[from-bStart:to-bStart])
			decoded.put(z.id, i, blk)
			if pre != nil {
				pre.offer(predecodedKey{z.id, i}, blk)
			}
		}
		z.blockPool.Put(scratch)
	}
	if err != nil {
		return &BlockError{Block: i, Offset: recOff, Err: err}
	}
	return nil
}

// readerIDs numbers the Readers for the decoded-block cache.
var readerIDs atomic.Uint64

// decoded holds the blocks that reads used only part of, most recent last. A device reads a block in pieces when the
// layer's extents (LSMT maps 512-byte sectors) split it, so that a warm start decoded 1,058 blocks for 578 distinct
// ones; the pieces of a block come close together, so a few slots catch them.
var decoded blockCache

// blockCacheSlots bounds the decoded-block cache: 32 blocks, 2 MiB of 64 KiB blocks, shared by every Reader.
const blockCacheSlots = 32

type blockCache struct {
	mu    sync.Mutex
	slots [blockCacheSlots]cachedBlock
	next  int
}

type cachedBlock struct {
	reader uint64 // 0: empty
	block  int64
	data   []byte
}

// get copies the bytes of a cached block from off into p and reports whether it had them.
func (c *blockCache) get(reader uint64, block int64, p []byte, off int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range c.slots {
		s := &c.slots[i]
		if s.reader == reader && s.block == block && off+int64(len(p)) <= int64(len(s.data)) {
			copy(p, s.data[off:])
			return true
		}
	}
	return false
}

// put keeps a copy of a decoded block, in place of the oldest.
func (c *blockCache) put(reader uint64, block int64, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := &c.slots[c.next]
	c.next = (c.next + 1) % len(c.slots)
	s.reader, s.block = reader, block
	s.data = append(s.data[:0], data...)
}

// getBlock returns a pooled buffer of one block.
func (z *Reader) getBlock() *[]byte {
	if b, ok := z.blockPool.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, z.info.BlockSize)
	return &b
}
