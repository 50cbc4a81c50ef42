package lsmt

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"sync"

	"github.com/google/btree"
)

// MaxRWIndexEntries bounds the number of entries replayed from an RW index file.
const MaxRWIndexEntries = 128_000_000

// maxIOSize is the largest piece one write is recorded as (upstream MAX_IO_SIZE).
const maxIOSize = 4 << 20

// indexFlushSize is how many bytes of index entries are buffered before they are appended.
const indexFlushSize = 4096

// WriteAtFile is the storage of a writable layer's data or index file. *os.File satisfies it.
type WriteAtFile interface {
	io.ReaderAt
	io.WriterAt
	Stat() (fs.FileInfo, error)
	Truncate(size int64) error
}

// HoleFile is implemented by data files of sparse layers that are not *os.File (on Linux an
// *os.File is used through SEEK_DATA/SEEK_HOLE and fallocate).
type HoleFile interface {
	// SeekData returns the first offset >= off holding data, or io.EOF when there is none.
	SeekData(off int64) (int64, error)
	// SeekHole returns the first offset >= off in a hole (the file size counts as one).
	SeekHole(off int64) (int64, error)
	// PunchHole deallocates n bytes at off; they read back as zeros.
	PunchHole(off, n int64) error
}

// CreateOptions configures a new writable layer.
type CreateOptions struct {
	UUID       string // "" writes the null UUID
	ParentUUID string // "" writes the null UUID
	// Sparse makes a sparse data file (payload at 4096+LBA). Its index is rebuilt from the data file's extents;
	// an index file, if given, records only discarded ranges (zeroed entries), so that they still read as zeros
	// after the layer is opened again instead of showing the lower layers' data through the punched hole.
	Sparse bool
	// Warp makes a TurboOCI warp layer (upstream's create_warpfile), whose file data can be mapped to a target
	// (MapTarget) instead of stored.
	Warp bool
}

// ErrClosed is returned by operations on a closed or sealed RW layer.
var ErrClosed = errors.New("lsmt: RW layer is closed")

// RW is a writable layer: upstream's append layer (writable_data + writable_index, every write
// appended to the data file and its entry to the index file) or sparse layer (payload at
// 4096+LBA of the data file, index rebuilt from its extents, optional index file of discards). Its in-memory index is a B-tree
// with upstream's split-on-overlap semantics. Index entries are appended to the index file in
// 4 KiB batches and on Sync, Close and Seal (upstream appends each one at once): after a crash the
// latest entries may be missing, leaving their data as unreferenced garbage in the data file,
// never a dangling entry. It is safe for concurrent use.
type RW struct {
	// ioMu is held shared by sparse writes, which write their data outside mu (concurrent writes and reads go on
	// meanwhile), and exclusively by what ends the layer or changes its size (Close, Freeze, Seal, SetVirtualSize):
	// they see every write either done or not started. Taken before mu.
	ioMu    sync.RWMutex
	mu      sync.RWMutex
	data    WriteAtFile
	index   WriteAtFile // nil for a sparse layer without an index file
	holes   HoleFile    // sparse only
	header  Header      // data file header
	vsize   uint64
	tree    *btree.BTreeG[mapping]
	dataEnd int64  // append position in the data file
	idxEnd  int64  // append position in the index file
	pending []byte // index entries not yet appended
	closed  bool
	scratch []mapping
	warp    bool
	target  io.ReaderAt // what TagTarget entries (MapTarget) read; nil: reading them fails
}

// errNoTarget reads fail: a warp layer being built has no target to read remote data from.
type errNoTarget struct{}

func (errNoTarget) ReadAt([]byte, int64) (int, error) {
	return 0, errors.New("lsmt: read of remote (target) data in a layer opened without its target")
}

// readers returns the files the layer's entries read, by tag: its data file, and a warp layer's target.
func (w *RW) readers() []io.ReaderAt {
	switch {
	case !w.warp:
		return []io.ReaderAt{w.data}
	case w.target == nil:
		return []io.ReaderAt{w.data, errNoTarget{}}
	}
	return []io.ReaderAt{w.data, w.target}
}

// SetTarget sets what the layer's remote entries (MapTarget) read.
func (w *RW) SetTarget(r io.ReaderAt) {
	w.mu.Lock()
	w.target = r
	w.mu.Unlock()
}

// MapTarget maps n bytes at off of the virtual disk to the bytes at toff of the layer's target (all multiples of
// 512) instead of storing data: a TurboOCI warp layer's file data, which stays in the original layer's tar. Like a
// write, it hides what was mapped there before. Committed with CommitOptions.Warp, the entries are kept as they are.
func (w *RW) MapTarget(off, n, toff int64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.checkIO("map", off, n); err != nil {
		return err
	}
	if !w.warp {
		return errors.New("lsmt: only a layer created with CreateOptions.Warp maps target data")
	}
	if toff < 0 || toff%SectorSize != 0 || uint64(toff+n)/SectorSize > maxMOffset {
		return fmt.Errorf("lsmt: target offset %d is not a multiple of %d within the format's range", toff, SectorSize)
	}
	for lba, moff, left := uint64(off)/SectorSize, uint64(toff)/SectorSize, uint64(n)/SectorSize; left > 0; {
		k := min(left, MaxSegmentLength)
		m := pack(lba, uint32(k), moff, false, TagTarget)
		w.insert(m)
		if err := w.appendIndex(m); err != nil {
			return err
		}
		lba, moff, left = lba+k, moff+k, left-k
	}
	return nil
}

// newTree returns an empty index tree. Entries are ordered by their end sector: they never
// overlap, so this is also offset order, and "the first entry ending after x" (where a lookup or
// an overlap search starts) is a single AscendGreaterOrEqual.
func newTree() *btree.BTreeG[mapping] {
	return btree.NewG(32, func(a, b mapping) bool { return a.end() < b.end() })
}

// endKey returns a pivot that sorts with the entries ending at end.
func endKey(end uint64) mapping { return pack(end, 0, 0, false, 0) }

// CreateRW initialises a new writable layer in data (and index, unless opts.Sparse) of virtual
// size vsize bytes (0: inherited from the lower layers when stacked). Existing content is
// discarded. The caller keeps ownership of the files.
func CreateRW(data, index WriteAtFile, vsize int64, opts CreateOptions) (*RW, error) {
	if vsize < 0 || vsize%SectorSize != 0 {
		return nil, fmt.Errorf("lsmt: virtual size %d is not a non-negative multiple of %d", vsize, SectorSize)
	}
	if opts.Warp && opts.Sparse {
		return nil, errors.New("lsmt: a warp layer cannot be sparse")
	}
	w := &RW{data: data, vsize: uint64(vsize), tree: newTree(), dataEnd: HeaderSize, warp: opts.Warp}
	flags := uint32(FlagHeader | FlagDataFile)
	if opts.Sparse {
		flags |= FlagSparseRW
		h, err := holeFile(data)
		if err != nil {
			return nil, err
		}
		w.holes = h
	} else if index == nil {
		return nil, errors.New("lsmt: an append RW layer needs an index file")
	}
	if index != nil {
		w.index, w.idxEnd = index, HeaderSize
	}
	w.header = newHeader(flags)
	w.header.VirtualSize = uint64(vsize)
	w.header.UUID, w.header.ParentUUID = opts.UUID, opts.ParentUUID
	if err := writeSlot(data, w.header, 0, true); err != nil {
		return nil, err
	}
	// Keep the UUIDs the way they were written.
	w.header.UUID, _ = formatUUID(opts.UUID)
	w.header.ParentUUID, _ = formatUUID(opts.ParentUUID)
	if opts.Sparse {
		if err := data.Truncate(int64(HeaderSize) + vsize); err != nil {
			return nil, fmt.Errorf("lsmt: sizing sparse data file: %w", err)
		}
	}
	if index == nil {
		return w, nil
	}
	ih := w.header
	ih.Flags = FlagHeader
	ih.IndexOffset = HeaderSize
	if err := writeSlot(index, ih, 0, true); err != nil {
		return nil, err
	}
	return w, nil
}

// writeSlot writes a header slot at off, optionally truncating the file to it first.
func writeSlot(f WriteAtFile, h Header, off int64, truncate bool) error {
	b, err := h.MarshalBinary()
	if err != nil {
		return err
	}
	if truncate {
		if err := f.Truncate(off); err != nil {
			return fmt.Errorf("lsmt: truncating layer file: %w", err)
		}
	}
	if _, err := f.WriteAt(b, off); err != nil {
		return fmt.Errorf("lsmt: writing header: %w", err)
	}
	return nil
}

func fileSize(f WriteAtFile) (int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("lsmt: stat layer file: %w", err)
	}
	return fi.Size(), nil
}

// OpenRW opens an existing writable layer, replaying its index: entries are applied in order,
// later ones win and partially overlapped ones are split; padding entries are skipped. For a
// sparse layer (flag in the data header) the index is rebuilt from the data file's extents
// (split at MaxSegmentLength sectors) over the discarded ranges of its index file, which may be nil.
func OpenRW(data, index WriteAtFile) (*RW, error) {
	dsize, err := fileSize(data)
	if err != nil {
		return nil, err
	}
	hdr, err := readSlot(data, 0)
	if err != nil {
		return nil, err
	}
	if !hdr.IsHeader() || !hdr.IsDataFile() {
		return nil, fmt.Errorf("lsmt: not an RW data file (flags %#x)", hdr.Flags)
	}
	w := &RW{data: data, header: hdr, vsize: hdr.VirtualSize, tree: newTree()}
	if hdr.IsSparse() {
		if w.holes, err = holeFile(data); err != nil {
			return nil, err
		}
		if index != nil {
			// Discarded ranges first: data written after a discard lies in the data file and wins.
			w.index = index
			if err := w.replay(dsize, true); err != nil {
				return nil, err
			}
			w.vsize = hdr.VirtualSize
		}
		if err := w.loadSparse(dsize); err != nil {
			return nil, err
		}
		return w, nil
	}
	if index == nil {
		return nil, errors.New("lsmt: an append RW layer needs its index file")
	}
	w.index = index
	w.dataEnd = (dsize + SectorSize - 1) / SectorSize * SectorSize
	if err := w.replay(dsize, false); err != nil {
		return nil, err
	}
	return w, nil
}

// replay loads the index file; zeroedOnly keeps only its discarded ranges (a sparse layer's).
func (w *RW) replay(dataSize int64, zeroedOnly bool) error {
	isize, err := fileSize(w.index)
	if err != nil {
		return err
	}
	ih, err := readSlot(w.index, 0)
	if err != nil {
		return err
	}
	if !ih.IsHeader() || ih.IsDataFile() || ih.IsSealed() {
		return fmt.Errorf("lsmt: not an RW index file (flags %#x)", ih.Flags)
	}
	if ih.IndexOffset != HeaderSize {
		return fmt.Errorf("lsmt: RW index offset is %d, want %d", ih.IndexOffset, HeaderSize)
	}
	w.vsize = ih.VirtualSize
	n := (isize - HeaderSize) / EntrySize // a torn last entry is ignored and overwritten
	if n > MaxRWIndexEntries {
		return fmt.Errorf("lsmt: RW index has %d entries, more than the limit %d", n, MaxRWIndexEntries)
	}
	w.idxEnd = HeaderSize + n*EntrySize
	v := newValidator(HeaderSize/SectorSize, uint64(dataSize)/SectorSize)
	buf := make([]byte, 64<<10)
	for i := int64(0); i < n; {
		chunk := buf[:min(int64(len(buf)), (n-i)*EntrySize)]
		if err := readFull(w.index, chunk, HeaderSize+i*EntrySize); err != nil {
			return fmt.Errorf("lsmt: reading RW index: %w", err)
		}
		for j := 0; j < len(chunk); j += EntrySize {
			m := unpack(binary.LittleEndian.Uint64(chunk[j:]), binary.LittleEndian.Uint64(chunk[j+8:]))
			if !m.invalid() && (!zeroedOnly || m.zeroed()) {
				m = m.withTag(0)
				if err := v.checkRange(int(i), m); err != nil {
					return err
				}
				w.insert(m)
			}
			i++
		}
	}
	return nil
}

// loadSparse rebuilds the index of a sparse layer from the data file's extents.
func (w *RW) loadSparse(dataSize int64) error {
	pos := int64(HeaderSize)
	for pos < dataSize {
		begin, err := w.holes.SeekData(pos)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("lsmt: sparse layer: seeking data: %w", err)
		}
		end, err := w.holes.SeekHole(begin)
		if err != nil {
			return fmt.Errorf("lsmt: sparse layer: seeking hole: %w", err)
		}
		if begin < HeaderSize || end <= begin {
			return fmt.Errorf("lsmt: sparse layer: bad extent [%d, %d)", begin, end)
		}
		lba := uint64(begin-HeaderSize) / SectorSize
		for total := uint64(end-begin) / SectorSize; total > 0; {
			n := min(total, MaxSegmentLength)
			w.insert(pack(lba, uint32(n), lba+HeaderSize/SectorSize, false, 0))
			lba += n
			total -= n
		}
		pos = end
	}
	return nil
}

// insert adds m to the in-memory index, trimming, splitting or removing what it overlaps.
func (w *RW) insert(m mapping) {
	if m.length() == 0 {
		return
	}
	o, e := m.off(), m.end()
	w.scratch = w.scratch[:0]
	w.tree.AscendGreaterOrEqual(endKey(o+1), func(q mapping) bool {
		if q.off() >= e {
			return false
		}
		w.scratch = append(w.scratch, q)
		return true
	})
	for _, q := range w.scratch {
		w.tree.Delete(q)
		if q.off() < o {
			w.tree.ReplaceOrInsert(q.trim(q.off(), o))
		}
		if q.end() > e {
			w.tree.ReplaceOrInsert(q.trim(e, q.end()))
		}
	}
	w.tree.ReplaceOrInsert(m)
}

// checkIO validates the alignment and range of a write or discard.
func (w *RW) checkIO(op string, off, n int64) error {
	if off < 0 || n < 0 || off%SectorSize != 0 || n%SectorSize != 0 {
		return fmt.Errorf("lsmt: %s at %d of %d bytes: offset and length must be multiples of %d", op, off, n, SectorSize)
	}
	if w.closed {
		return ErrClosed
	}
	if w.vsize > 0 && uint64(off+n) > w.vsize {
		return fmt.Errorf("lsmt: %s at %d of %d bytes goes beyond the virtual size %d", op, off, n, w.vsize)
	}
	if uint64(off+n)/SectorSize > maxOffset {
		return fmt.Errorf("lsmt: %s at %d of %d bytes goes beyond the format's address space", op, off, n)
	}
	return nil
}

// WriteAt writes p at off (both multiples of 512). In an append layer the data is appended to the
// data file, in pieces of at most 4 MiB, and one index entry per piece to the index file.
func (w *RW) WriteAt(p []byte, off int64) (int, error) {
	if w.holes != nil {
		return w.writeSparse(p, off)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.checkIO("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	done := 0
	for done < len(p) {
		chunk := p[done:min(len(p), done+maxIOSize)]
		lba := uint64(off+int64(done)) / SectorSize
		if _, err := w.data.WriteAt(chunk, w.dataEnd); err != nil {
			return done, fmt.Errorf("lsmt: appending data: %w", err)
		}
		m := pack(lba, uint32(len(chunk)/SectorSize), uint64(w.dataEnd)/SectorSize, false, 0)
		w.dataEnd += int64(len(chunk))
		w.insert(m)
		if err := w.appendIndex(m); err != nil {
			return done, err
		}
		done += len(chunk)
	}
	return done, nil
}

// writeSparse writes p at its place in a sparse layer's data file, then maps it. The data is written without
// holding mu, so writes to different places (a device's queue) proceed in parallel, and reads of other places
// are not held up; until it is mapped, a read of the range sees what was there before.
func (w *RW) writeSparse(p []byte, off int64) (int, error) {
	w.ioMu.RLock()
	defer w.ioMu.RUnlock()
	if err := w.checkIO("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if _, err := w.data.WriteAt(p, HeaderSize+off); err != nil {
		return 0, fmt.Errorf("lsmt: writing sparse data: %w", err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for done := 0; done < len(p); {
		n := min(len(p)-done, maxIOSize)
		lba := uint64(off+int64(done)) / SectorSize
		w.insert(pack(lba, uint32(n/SectorSize), lba+HeaderSize/SectorSize, false, 0))
		done += n
	}
	return len(p), nil
}

// Discard records n bytes at off (multiples of 512) as zeroed, masking lower layers. In a sparse
// layer the range is also punched out of the data file and, if it has an index file, recorded there at once
// (a reopened layer then still reads zeros there).
func (w *RW) Discard(off, n int64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.checkIO("discard", off, n); err != nil {
		return err
	}
	for n > 0 {
		step := min(n, MaxSegmentLength*SectorSize)
		lba := uint64(off) / SectorSize
		if w.holes != nil {
			m := pack(lba, uint32(step/SectorSize), lba+HeaderSize/SectorSize, true, 0)
			w.insert(m)
			if err := w.holes.PunchHole(HeaderSize+off, step); err != nil {
				return fmt.Errorf("lsmt: punching hole: %w", err)
			}
			// At once, not batched: nothing else records that the hole is not the lower layers' data.
			if err := w.appendIndex(m); err != nil {
				return err
			}
			if err := w.flushIndex(); err != nil {
				return err
			}
		} else {
			m := pack(lba, uint32(step/SectorSize), uint64(w.dataEnd)/SectorSize, true, 0)
			w.insert(m)
			if err := w.appendIndex(m); err != nil {
				return err
			}
		}
		off += step
		n -= step
	}
	return nil
}

// appendIndex buffers an index entry for the index file.
func (w *RW) appendIndex(m mapping) error {
	if w.index == nil {
		return nil
	}
	w.pending = m.append(w.pending)
	if len(w.pending) >= indexFlushSize {
		return w.flushIndex()
	}
	return nil
}

func (w *RW) flushIndex() error {
	if len(w.pending) == 0 || w.index == nil {
		return nil
	}
	if _, err := w.index.WriteAt(w.pending, w.idxEnd); err != nil {
		return fmt.Errorf("lsmt: appending index: %w", err)
	}
	w.idxEnd += int64(len(w.pending))
	w.pending = w.pending[:0]
	return nil
}

// limit returns the readable size: the virtual size, or the end of the last write when unset.
func (w *RW) limit() uint64 {
	if w.vsize > 0 {
		return w.vsize
	}
	if m, ok := w.tree.Max(); ok {
		return m.end() * SectorSize
	}
	return 0
}

// ReadAt reads the layer's own view: written data, zeros for discarded ranges and gaps.
func (w *RW) ReadAt(p []byte, off int64) (int, error) {
	w.mu.RLock()
	defer w.mu.RUnlock()
	q, eof := clampRead(p, off, w.limit())
	if len(q) == 0 {
		return 0, eof
	}
	fl := newFiller(q, off, w.readers())
	if err := w.fillTree(fl, 0, fl.end(), nil); err != nil {
		return 0, err
	}
	if err := fl.flush(); err != nil {
		return 0, err
	}
	return len(q), eof
}

// fillTree fills fl up to stop from the tree, reading mapped pieces as reader rd (its data file; rd+1 is its
// target); gaps are filled by gap (zeros when nil). The caller holds w.mu.
func (w *RW) fillTree(fl *filler, rd int, stop uint64, gap func(stop uint64) error) error {
	if gap == nil {
		gap = func(stop uint64) error { fl.zeroTo(stop); return nil }
	}
	start := endKey(fl.pos/SectorSize + 1)
	var err error
	w.tree.AscendGreaterOrEqual(start, func(m mapping) bool {
		s := m.off() * SectorSize
		if s >= stop {
			return false
		}
		if s > fl.pos {
			if err = gap(s); err != nil {
				return false
			}
		}
		err = fl.mapped(rd+int(m.tag()), m, min(m.end()*SectorSize, stop))
		return err == nil && fl.pos < stop
	})
	if err != nil {
		return err
	}
	if fl.pos < stop {
		return gap(stop)
	}
	return nil
}

// Index returns the current index, sorted by offset.
func (w *RW) Index() []Segment {
	return segments(w.dump())
}

// dump returns a copy of the in-memory index.
func (w *RW) dump() []mapping {
	w.mu.RLock()
	defer w.mu.RUnlock()
	out := make([]mapping, 0, w.tree.Len())
	w.tree.Ascend(func(m mapping) bool {
		out = append(out, m)
		return true
	})
	return out
}

// Len returns the number of entries in the index.
func (w *RW) Len() int {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return w.tree.Len()
}

// Header returns the data file's header.
func (w *RW) Header() Header {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return w.header
}

// VirtualSize returns the virtual size in bytes (0 when not yet known).
func (w *RW) VirtualSize() int64 {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return int64(w.vsize)
}

// SetVirtualSize changes the virtual size recorded in the layer's headers (and, for a sparse
// layer, the data file's size), as upstream does when stacking a layer created with size 0.
func (w *RW) SetVirtualSize(vsize int64) error {
	w.ioMu.Lock()
	defer w.ioMu.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return ErrClosed
	}
	if vsize < 0 || vsize%SectorSize != 0 {
		return fmt.Errorf("lsmt: virtual size %d is not a non-negative multiple of %d", vsize, SectorSize)
	}
	files := []WriteAtFile{w.data}
	if w.index != nil {
		files = append(files, w.index)
	}
	for _, f := range files {
		h, err := readSlot(f, 0)
		if err != nil {
			return err
		}
		h.VirtualSize = uint64(vsize)
		if err := writeSlot(f, h, 0, false); err != nil {
			return err
		}
	}
	w.vsize, w.header.VirtualSize = uint64(vsize), uint64(vsize)
	if w.holes != nil {
		return w.data.Truncate(HeaderSize + vsize)
	}
	return nil
}

// Sync appends buffered index entries and syncs both files when they support it.
func (w *RW) Sync() error {
	w.mu.Lock()
	err := w.flushIndex()
	w.mu.Unlock()
	if err != nil {
		return err
	}
	// Not under mu: the files' syncs cover every write done so far and hold up no other.
	for _, f := range []WriteAtFile{w.data, w.index} {
		if s, ok := f.(interface{ Sync() error }); ok {
			if err := s.Sync(); err != nil {
				return fmt.Errorf("lsmt: sync: %w", err)
			}
		}
	}
	return nil
}

// Close appends buffered index entries. It does not close the underlying files.
func (w *RW) Close() error {
	w.ioMu.Lock()
	defer w.ioMu.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	w.closed = true
	return w.flushIndex()
}

// Freeze closes the layer for writing and returns it as a read-only layer to stack others on,
// reading the data file in place: no copy is made, so the layer can be committed (from w) while
// layers above it are written. The files must stay open while the returned File is used.
func (w *RW) Freeze() (*File, error) {
	w.ioMu.Lock()
	defer w.ioMu.Unlock()
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return nil, ErrClosed
	}
	err := w.flushIndex()
	w.closed = true
	w.mu.Unlock()
	if err != nil {
		return nil, err
	}
	h := w.Header()
	t := newHeader(FlagDataFile | FlagSealed | h.Flags&FlagSparseRW)
	t.VirtualSize, t.UUID, t.ParentUUID = h.VirtualSize, validOrNull(h.UUID), validOrNull(h.ParentUUID)
	size, err := fileSize(w.data)
	if err != nil {
		return nil, err
	}
	ents := w.dump()
	t.IndexSize = uint64(len(ents))
	return &File{r: w.data, size: size, header: h, trailer: t, idx: newSegIndex(ents), readers: w.readers()}, nil
}

// Seal closes the layer and turns its data file into a read-only layer (upstream
// `overlaybd-commit --seal`): the in-memory index is appended at the end of the data file
// (padded to 512 bytes with invalid entries; index_size counts only the real ones), followed by
// a sealed trailer carrying the header's UUIDs and virtual size. It returns the new size of the
// data file, which Open then accepts. The index file is no longer needed.
func (w *RW) Seal() (int64, error) {
	w.ioMu.Lock()
	defer w.ioMu.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return 0, ErrClosed
	}
	if err := w.flushIndex(); err != nil {
		return 0, err
	}
	w.closed = true
	pos := w.dataEnd
	if w.holes != nil {
		size, err := fileSize(w.data)
		if err != nil {
			return 0, err
		}
		pos = (size + SectorSize - 1) / SectorSize * SectorSize
	}
	n := w.tree.Len()
	buf := make([]byte, 0, (n*EntrySize+SectorSize-1)/SectorSize*SectorSize)
	w.tree.Ascend(func(m mapping) bool {
		buf = m.append(buf)
		return true
	})
	for len(buf)%SectorSize != 0 {
		buf = invalidMapping.append(buf)
	}
	if _, err := w.data.WriteAt(buf, pos); err != nil {
		return 0, fmt.Errorf("lsmt: sealing: writing index: %w", err)
	}
	hdr, err := readSlot(w.data, 0)
	if err != nil {
		return 0, err
	}
	t := newHeader(FlagDataFile | FlagSealed | hdr.Flags&FlagSparseRW)
	t.IndexOffset, t.IndexSize = uint64(pos), uint64(n)
	t.VirtualSize, t.UUID, t.ParentUUID = hdr.VirtualSize, validOrNull(hdr.UUID), validOrNull(hdr.ParentUUID)
	tpos := pos + int64(len(buf))
	if err := writeSlot(w.data, t, tpos, false); err != nil {
		return 0, err
	}
	return tpos + HeaderSize, nil
}

// validOrNull returns u when it is a valid UUID and "" (the null UUID) otherwise.
func validOrNull(u string) string {
	if c, ok := CanonicalUUID(u); ok {
		return c
	}
	return ""
}
