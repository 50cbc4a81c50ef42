package lsmt

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"sync"
)

// MaxMergedEntries bounds the merged index of a stack.
const MaxMergedEntries = 128 << 20

// ErrReadOnly is returned by writes to a stack without a writable upper layer.
var ErrReadOnly = errors.New("lsmt: stack has no writable layer")

// Stack is the merged view of read-only layers (bottom to top) and an optional writable upper
// layer, as upstream's open_files_ro + stack_files build it: the upper layer wins, then the lower
// layers from the top down. It is safe for concurrent use.
type Stack struct {
	lowers  []*File // bottom → top
	upper   *RW
	idx     *segIndex     // merged lowers; tags select readers
	readers []io.ReaderAt // by tag; the upper's files last
	owners  []Piece       // by tag of a lower layer's file: its Layer and Reader
	upper0  int           // tag of the upper's data file
	vsize   uint64

	byFile     sync.Once
	byFileEnts [][]mapping // by tag of a lower layer's file: its entries of the merged index, by offset in the file
}

// NewStack merges the indexes of lowers (bottom first, at most MaxLayers) and stacks upper (may be
// nil) on top. The virtual size is the topmost non-zero one of the lowers; an upper layer created
// with size 0 inherits it (written into its headers), otherwise the upper's size is used.
func NewStack(lowers []*File, upper *RW) (*Stack, error) {
	if len(lowers) > MaxLayers {
		return nil, fmt.Errorf("lsmt: %d layers, at most %d can be stacked", len(lowers), MaxLayers)
	}
	if len(lowers) == 0 && upper == nil {
		return nil, errors.New("lsmt: empty stack")
	}
	s := &Stack{lowers: lowers, upper: upper}
	n := len(lowers)
	layers := make([][]mapping, n) // top first
	bases := make([]int, n)        // the tag of each layer's first reader
	for i := n - 1; i >= 0; i-- {
		f := lowers[i]
		layers[n-1-i] = f.idx.ents
		bases[n-1-i] = len(s.readers)
		for r := range f.readers {
			s.owners = append(s.owners, Piece{Layer: i, Reader: r})
		}
		s.readers = append(s.readers, f.readers...)
		if f.trailer.VirtualSize > 0 && s.vsize == 0 {
			s.vsize = f.trailer.VirtualSize
		}
	}
	// Tags are 8 bits: the lowers' files, then the upper's data file and, for a warp upper, its target.
	limit := MaxLayers
	if upper != nil && upper.warp {
		limit--
	}
	s.upper0 = len(s.readers)
	if len(s.readers) > limit {
		return nil, fmt.Errorf("lsmt: %d layers read %d files, at most %d can be stacked", n, len(s.readers), limit)
	}
	merged, err := mergeLayers(layers, bases)
	if err != nil {
		return nil, err
	}
	s.idx = newSegIndex(merged)
	if upper != nil {
		if upper.VirtualSize() == 0 && s.vsize > 0 {
			if err := upper.SetVirtualSize(int64(s.vsize)); err != nil {
				return nil, err
			}
		}
		s.vsize = uint64(upper.VirtualSize())
		s.readers = append(s.readers, upper.readers()...)
	}
	return s, nil
}

// mergeLayers merges layer indexes given top first into one index whose tags select the stack's readers: an entry
// of layer i with tag t gets bases[i]+t. Overlaying is associative, so halves are merged recursively: each entry is copied
// O(log layers) times by linear sweeps.
func mergeLayers(layers [][]mapping, bases []int) ([]mapping, error) {
	var rec func(lo, hi int, final bool) ([]mapping, error)
	rec = func(lo, hi int, final bool) ([]mapping, error) {
		if hi-lo == 1 {
			out := alloc(len(layers[lo]), final)
			for _, m := range layers[lo] {
				out = append(out, m.withTag(uint8(bases[lo])+m.tag()))
			}
			return out, nil
		}
		mid := (lo + hi) / 2
		top, err := rec(lo, mid, false)
		if err != nil {
			return nil, err
		}
		bottom, err := rec(mid, hi, false)
		if err != nil {
			return nil, err
		}
		n := 0
		overlay(top, bottom, func(mapping) { n++ })
		if n > MaxMergedEntries {
			return nil, fmt.Errorf("lsmt: merged index would have %d entries, more than %d", n, MaxMergedEntries)
		}
		out := alloc(n, final)
		overlay(top, bottom, func(m mapping) { out = append(out, m) })
		return out, nil
	}
	if len(layers) == 0 {
		return nil, nil
	}
	return rec(0, len(layers), true)
}

// alloc returns an empty slice with room for n entries; the final index gets lookup-friendly memory.
func alloc(n int, final bool) []mapping {
	if final {
		return makeIndexSlice[mapping](n)[:0]
	}
	return make([]mapping, 0, n)
}

// overlay emits, in order, the entries of top and the pieces of bottom that fall into its gaps.
func overlay(top, bottom []mapping, emit func(mapping)) {
	j := 0
	fill := func(g0, g1 uint64) {
		for j < len(bottom) && bottom[j].end() <= g0 {
			j++
		}
		for k := j; k < len(bottom) && bottom[k].off() < g1; k++ {
			emit(bottom[k].trim(g0, g1))
		}
	}
	prev := uint64(0)
	for _, m := range top {
		if m.off() > prev {
			fill(prev, m.off())
		}
		emit(m)
		prev = m.end()
	}
	fill(prev, ^uint64(0))
}

// VirtualSize returns the stack's virtual size in bytes.
func (s *Stack) VirtualSize() int64 { return int64(s.vsize) }

// Segments returns the number of entries of the merged lower index plus the upper layer's.
func (s *Stack) Segments() int {
	n := s.idx.len()
	if s.upper != nil {
		n += s.upper.Len()
	}
	return n
}

// MemBytes returns the memory used by the merged lower index, in bytes.
func (s *Stack) MemBytes() int { return s.idx.memBytes() }

// ReadAt reads the merged virtual disk. Each contiguous piece is one ReadAt on the owning layer's
// file; holes and zeroed extents are filled with zeros without reading.
func (s *Stack) ReadAt(p []byte, off int64) (int, error) {
	q, eof := clampRead(p, off, s.vsize)
	if len(q) == 0 {
		return 0, eof
	}
	fl := newFiller(q, off, s.readers)
	var err error
	if s.upper == nil {
		if err = fl.fromIndex(s.idx, fl.end()); err == nil {
			err = fl.flush()
		}
	} else {
		// Hold the upper's lock until its pieces are read: its index may change meanwhile.
		s.upper.mu.RLock()
		err = s.upper.fillTree(fl, s.upper0, fl.end(), func(stop uint64) error {
			return fl.fromIndex(s.idx, stop)
		})
		if err == nil {
			err = fl.flush()
		}
		s.upper.mu.RUnlock()
	}
	if err != nil {
		return 0, err
	}
	return len(q), eof
}

// Piece is a part of a lower layer's file that the virtual disk shows at byte At: Length bytes at Offset of file
// Reader of layer Layer (bottom first), where Reader is 0 for the layer's own data and 1 for a warp layer's target.
type Piece struct {
	Layer, Reader      int
	At, Offset, Length int64
}

// Locate calls fn, in order, for the pieces of the lower layers' files that a read of the n bytes at off of the
// virtual disk reads (holes and zeroed extents are left out; so is the upper layer, which may cover some of them).
func (s *Stack) Locate(off, n int64, fn func(Piece)) {
	if off < 0 || n <= 0 || off >= int64(s.vsize) {
		return
	}
	pos, stop := uint64(off), uint64(min(off+n, int64(s.vsize)))
	for i := s.idx.find(pos / SectorSize); i < len(s.idx.ents) && pos < stop; i++ {
		m := s.idx.ents[i]
		start, end := max(pos, m.off()*SectorSize), min(m.end()*SectorSize, stop)
		if start >= stop {
			break
		}
		if end > start && !m.zeroed() {
			p := s.owners[m.tag()]
			p.At, p.Offset, p.Length = int64(start), int64(m.moff()*SectorSize+start-m.off()*SectorSize), int64(end-start)
			fn(p)
		}
		pos = max(pos, end)
	}
}

// Shows calls fn, in order of the file, for the ranges of the virtual disk that show the n bytes at off of lower
// layer layer's own data file (Reader 0 of Locate's pieces); the bytes an upper layer hides are still shown. It
// is Locate's inverse: the bytes a record of a layer's reads (a trace) stand for on the disk. The first call
// sorts the merged index by file offset (memory: the index's size again).
func (s *Stack) Shows(layer int, off, n int64, fn func(at, length int64)) {
	s.byFile.Do(func() {
		s.byFileEnts = make([][]mapping, len(s.owners))
		for _, m := range s.idx.ents {
			if !m.zeroed() {
				s.byFileEnts[m.tag()] = append(s.byFileEnts[m.tag()], m)
			}
		}
		for _, ents := range s.byFileEnts {
			slices.SortFunc(ents, func(a, b mapping) int { return cmp.Compare(a.moff(), b.moff()) })
		}
	})
	tag := slices.Index(s.owners, Piece{Layer: layer})
	if tag < 0 || off < 0 || n <= 0 {
		return
	}
	ents := s.byFileEnts[tag]
	lo, hi := uint64(off), uint64(off+n)
	// An entry holds at most MaxSegmentLength sectors: none that starts before lo-max reaches lo.
	from := uint64(0)
	if lo > MaxSegmentLength*SectorSize {
		from = (lo - MaxSegmentLength*SectorSize) / SectorSize
	}
	i, _ := slices.BinarySearchFunc(ents, from, func(m mapping, t uint64) int { return cmp.Compare(m.moff(), t) })
	for ; i < len(ents) && ents[i].moff()*SectorSize < hi; i++ {
		m := ents[i]
		fstart, fend := m.moff()*SectorSize, m.mend()*SectorSize
		a, b := max(lo, fstart), min(hi, fend)
		if b > a {
			fn(int64(m.off()*SectorSize+a-fstart), int64(b-a))
		}
	}
}

// WriteAt writes to the upper layer.
func (s *Stack) WriteAt(p []byte, off int64) (int, error) {
	if err := s.checkWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	return s.upper.WriteAt(p, off)
}

// Discard discards a range in the upper layer, masking the lower layers.
func (s *Stack) Discard(off, n int64) error {
	if err := s.checkWrite(off, n); err != nil {
		return err
	}
	return s.upper.Discard(off, n)
}

func (s *Stack) checkWrite(off, n int64) error {
	if s.upper == nil {
		return ErrReadOnly
	}
	if off < 0 || n < 0 || uint64(off+n) > s.vsize {
		return fmt.Errorf("lsmt: write at %d of %d bytes goes beyond the virtual size %d", off, n, s.vsize)
	}
	return nil
}

// Header returns the header a commit of the whole stack inherits (upstream merge_files_ro): the
// virtual size of the top layer's header and the parent UUID of the bottom layer.
func (s *Stack) Header() Header {
	if s.upper != nil {
		h := s.upper.Header()
		if len(s.lowers) > 0 {
			h.ParentUUID = s.lowers[0].header.ParentUUID
		}
		return h
	}
	h := s.lowers[len(s.lowers)-1].header
	h.ParentUUID = s.lowers[0].header.ParentUUID
	return h
}

func (s *Stack) commitView() ([]mapping, []io.ReaderAt) {
	if s.upper == nil {
		return s.idx.ents, s.readers
	}
	up := s.upper.dump()
	base := uint8(s.upper0)
	for i := range up {
		up[i] = up[i].withTag(base + up[i].tag())
	}
	var out []mapping
	overlay(up, s.idx.ents, func(m mapping) { out = append(out, m) })
	return out, s.readers
}

// Extents returns the stack's data extents in LBA order, neighbours joined: the parts of the virtual disk that
// hold data (holes and zeroed extents, which read as zeros, are left out). Segment MOffset and Tag are zero.
func (s *Stack) Extents() []Segment {
	ms, _ := s.commitView()
	var out []Segment
	for _, m := range ms {
		if m.zeroed() {
			continue
		}
		if n := len(out); n > 0 && out[n-1].End() == m.off() && uint64(out[n-1].Length)+uint64(m.length()) <= math.MaxUint32 {
			out[n-1].Length += m.length()
			continue
		}
		out = append(out, Segment{Offset: m.off(), Length: m.length()})
	}
	return out
}
