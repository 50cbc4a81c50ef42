package lsmt

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// MaxROIndexEntries bounds the index of a read-only layer (entries, including padding).
const MaxROIndexEntries = 1_000_000

// Layer file kinds reported by Kind.
const (
	KindCommitted = "committed" // compacted read-only layer (overlaybd.commit)
	KindSealed    = "sealed"    // RW data file with its index appended (overlaybd.sealed)
	KindRWData    = "rw-data"   // append RW data file (writable_data)
	KindRWIndex   = "rw-index"  // append RW index file (writable_index)
	KindSparseRW  = "sparse-rw" // sparse RW data file
	KindWarp      = "warp"      // committed TurboOCI fs-meta layer whose entries point into a target
)

// File is an opened read-only layer (committed or sealed): an io.ReaderAt over its own virtual
// disk, where holes and zeroed extents read as zeros. It is safe for concurrent use when the
// underlying reader is.
type File struct {
	r       io.ReaderAt
	size    int64
	header  Header
	trailer Header
	idx     *segIndex
	readers []io.ReaderAt // by entry tag: {r}, or {r, target} for a warp layer
}

// Open opens a committed or sealed layer of the given size. It validates the header, the sealed
// trailer and every index entry (sorted, non-overlapping, data within the data area), skips
// padding entries and ignores the runtime tag bits.
func Open(r io.ReaderAt, size int64) (*File, error) {
	hdr, trl, err := readHeaderTrailer(r, size)
	if err != nil {
		return nil, err
	}
	if !hdr.IsDataFile() {
		return nil, errors.New("lsmt: this is the index file of a writable layer, not a committed or sealed layer")
	}
	if !trl.ok {
		return nil, errors.New("lsmt: no sealed trailer at the end of the file: a writable layer's data file, or a truncated layer")
	}
	ents, err := loadROIndex(r, size, trl.Header)
	if err != nil {
		return nil, err
	}
	return &File{r: r, size: size, header: hdr, trailer: trl.Header, idx: newSegIndex(ents), readers: []io.ReaderAt{r}}, nil
}

// Tags of a warp layer's entries (upstream's SegmentType): fs-meta data stored in the layer file, and data in the
// layer's target, the uncompressed tar of the original OCI layer, at moffset.
const (
	TagMeta   = 0
	TagTarget = 1
)

// OpenWarp opens a committed TurboOCI warp layer (upstream's fs-meta file) of the given size whose remote entries
// read from target, a stream of targetSize bytes (the uncompressed tar of the original layer). Entries are
// validated as by Open, remote ones against the target's size instead of the data area; tags are normalised as
// upstream does (the smallest becomes 0).
func OpenWarp(r io.ReaderAt, size int64, target io.ReaderAt, targetSize int64) (*File, error) {
	hdr, trl, err := readHeaderTrailer(r, size)
	if err != nil {
		return nil, err
	}
	if !hdr.IsDataFile() || !trl.ok {
		return nil, errors.New("lsmt: not a committed warp layer (no data header or sealed trailer)")
	}
	t := trl.Header
	raw, err := readRawIndex(r, size, t)
	if err != nil {
		return nil, err
	}
	ents := makeIndexSlice[mapping](countValid(raw))[:0]
	minTag := uint8(255)
	for i := 0; i < len(raw); i += EntrySize {
		m := unpack(binary.LittleEndian.Uint64(raw[i:]), binary.LittleEndian.Uint64(raw[i+8:]))
		if !m.invalid() {
			minTag = min(minTag, m.tag())
			ents = append(ents, m)
		}
	}
	meta := newValidator(HeaderSize/SectorSize, t.IndexOffset/SectorSize)
	remote := newValidator(0, uint64(targetSize)/SectorSize)
	order := newValidator(0, maxOffset)
	out := ents[:0]
	for i, m := range ents {
		m = m.withTag(m.tag() - minTag)
		v := meta
		switch m.tag() {
		case TagMeta:
		case TagTarget:
			v = remote
			if m.zeroed() {
				return nil, fmt.Errorf("lsmt: warp index entry %d: a zeroed remote entry", i)
			}
		default:
			return nil, fmt.Errorf("lsmt: warp index entry %d has tag %d (0: fs-meta, 1: remote data)", i, m.tag()+minTag)
		}
		if err := v.checkRange(i, m); err != nil {
			return nil, err
		}
		if err := order.check(i, m.withMOff(0)); err != nil {
			return nil, err
		}
		if m.length() > 0 {
			out = append(out, m)
		}
	}
	return &File{r: r, size: size, header: hdr, trailer: t, idx: newSegIndex(out), readers: []io.ReaderAt{r, target}}, nil
}

// trailerInfo is a parsed trailer slot and whether it is a valid sealed data trailer.
type trailerInfo struct {
	Header
	ok bool
}

// readHeaderTrailer reads the header at 0 and, when the file is large enough, the trailer at
// size-4096. Only the defined flag bits are tested.
func readHeaderTrailer(r io.ReaderAt, size int64) (Header, trailerInfo, error) {
	if size < HeaderSize {
		return Header{}, trailerInfo{}, fmt.Errorf("lsmt: file too small (%d bytes)", size)
	}
	hdr, err := readSlot(r, 0)
	if err != nil {
		return Header{}, trailerInfo{}, err
	}
	if !hdr.IsHeader() {
		return Header{}, trailerInfo{}, errors.New("lsmt: the slot at offset 0 is not a header")
	}
	var trl trailerInfo
	if size >= 2*HeaderSize {
		t, err := readSlot(r, size-HeaderSize)
		if err != nil && !errors.Is(err, ErrBadMagic) {
			return Header{}, trailerInfo{}, err
		}
		if err == nil {
			trl = trailerInfo{t, !t.IsHeader() && t.IsDataFile() && t.IsSealed()}
		}
	}
	return hdr, trl, nil
}

func readSlot(r io.ReaderAt, off int64) (Header, error) {
	buf := make([]byte, headerStructSize)
	if err := readFull(r, buf, off); err != nil {
		return Header{}, fmt.Errorf("lsmt: reading header at %d: %w", off, err)
	}
	h, err := ParseHeader(buf)
	if err != nil && off > 0 {
		return h, fmt.Errorf("%w in trailer", err)
	}
	return h, err
}

// readRawIndex reads the index entries trailer t describes, once their place is checked.
func readRawIndex(r io.ReaderAt, size int64, t Header) ([]byte, error) {
	if t.IndexSize > MaxROIndexEntries {
		return nil, fmt.Errorf("lsmt: index has %d entries, more than the read-only limit %d", t.IndexSize, MaxROIndexEntries)
	}
	trailerOff := uint64(size - HeaderSize)
	if t.IndexOffset < HeaderSize || t.IndexOffset > trailerOff || t.IndexSize*EntrySize > trailerOff-t.IndexOffset {
		return nil, fmt.Errorf("lsmt: index (offset %d, %d entries) does not fit between header and trailer (at %d)",
			t.IndexOffset, t.IndexSize, trailerOff)
	}
	raw := make([]byte, t.IndexSize*EntrySize)
	if err := readFull(r, raw, int64(t.IndexOffset)); err != nil {
		return nil, fmt.Errorf("lsmt: reading index: %w", err)
	}
	return raw, nil
}

// loadROIndex reads and validates the index described by trailer t.
func loadROIndex(r io.ReaderAt, size int64, t Header) ([]mapping, error) {
	raw, err := readRawIndex(r, size, t)
	if err != nil {
		return nil, err
	}
	v := newValidator(HeaderSize/SectorSize, t.IndexOffset/SectorSize)
	ents := makeIndexSlice[mapping](countValid(raw))[:0]
	for i := 0; i < len(raw); i += EntrySize {
		m := unpack(binary.LittleEndian.Uint64(raw[i:]), binary.LittleEndian.Uint64(raw[i+8:]))
		if m.invalid() {
			continue
		}
		m = m.withTag(0)
		if err := v.check(i/EntrySize, m); err != nil {
			return nil, err
		}
		if m.length() > 0 {
			ents = append(ents, m)
		}
	}
	return ents, nil
}

func countValid(raw []byte) int {
	n := 0
	for i := 0; i < len(raw); i += EntrySize {
		if binary.LittleEndian.Uint64(raw[i:])&maxOffset != invalidOffset {
			n++
		}
	}
	return n
}

// validator checks index entries in order: sorted, non-overlapping, mapped within
// [dataBegin, dataEnd) sectors (a zeroed entry only needs its moffset within the bounds).
type validator struct {
	dataBegin, dataEnd uint64
	prev               mapping
	prevPos            int
}

func newValidator(dataBegin, dataEnd uint64) *validator {
	return &validator{dataBegin: dataBegin, dataEnd: dataEnd, prevPos: -1}
}

func (v *validator) check(pos int, m mapping) error {
	if err := v.checkRange(pos, m); err != nil {
		return err
	}
	if v.prevPos >= 0 {
		switch {
		case m.off() < v.prev.off():
			return fmt.Errorf("lsmt: index entry %d (sector %d) is out of order after entry %d (sector %d)",
				pos, m.off(), v.prevPos, v.prev.off())
		case m.off() < v.prev.end():
			return fmt.Errorf("lsmt: index entry %d overlaps entry %d (sectors %d+%d and %d+%d)",
				pos, v.prevPos, m.off(), m.length(), v.prev.off(), v.prev.length())
		}
	}
	v.prev, v.prevPos = m, pos
	return nil
}

// checkRange checks only that m's data lies within the data area.
func (v *validator) checkRange(pos int, m mapping) error {
	if m.end() > maxOffset {
		return fmt.Errorf("lsmt: index entry %d (sector %d+%d) goes beyond the address space", pos, m.off(), m.length())
	}
	moff := m.moff()
	ok := moff >= v.dataBegin && moff <= v.dataEnd
	if !m.zeroed() {
		ok = ok && moff+uint64(m.length()) <= v.dataEnd
	}
	if !ok {
		return fmt.Errorf("lsmt: index entry %d points outside data (moffset %d, length %d, data sectors [%d, %d))",
			pos, moff, m.length(), v.dataBegin, v.dataEnd)
	}
	return nil
}

// ReadAt reads the layer's virtual disk. Reads need not be sector aligned; a read crossing the
// virtual size returns the bytes before it and io.EOF.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	q, eof := clampRead(p, off, f.trailer.VirtualSize)
	if len(q) == 0 {
		return 0, eof
	}
	fl := newFiller(q, off, f.readers)
	err := fl.fromIndex(f.idx, fl.end())
	if err == nil {
		err = fl.flush()
	}
	if err != nil {
		return 0, err
	}
	return len(q), eof
}

// Header returns the header at offset 0.
func (f *File) Header() Header { return f.header }

// Trailer returns the trailer at the end of the file, which is authoritative for the index
// location, the virtual size and the UUID.
func (f *File) Trailer() Header { return f.trailer }

// Index returns the valid index entries, sorted by offset (tags are 0, or TagTarget for a warp layer's remote data).
func (f *File) Index() []Segment { return segments(f.idx.ents) }

// RawIndexEntries returns the number of entries stored in the file, padding included.
func (f *File) RawIndexEntries() int { return int(f.trailer.IndexSize) }

// VirtualSize returns the size of the layer's virtual disk in bytes.
func (f *File) VirtualSize() int64 { return int64(f.trailer.VirtualSize) }

// DataSectors returns the number of sectors mapped to data (zeroed extents excluded).
func (f *File) DataSectors() int64 { return int64(f.idx.data) }

// Size returns the size of the layer file in bytes.
func (f *File) Size() int64 { return f.size }

func segments(ms []mapping) []Segment {
	out := make([]Segment, len(ms))
	for i, m := range ms {
		out[i] = m.segment()
	}
	return out
}

// Kind classifies a layer file by its header, trailer and (for committed files) index: one of
// KindCommitted, KindSealed, KindRWData, KindRWIndex, KindSparseRW or KindWarp.
func Kind(r io.ReaderAt, size int64) (string, error) {
	hdr, trl, err := readHeaderTrailer(r, size)
	switch {
	case err != nil:
		return "", err
	case !hdr.IsDataFile():
		return KindRWIndex, nil
	case trl.ok && hdr.IsSealed():
		if isWarp(r, size, trl.Header) {
			return KindWarp, nil
		}
		return KindCommitted, nil
	case trl.ok:
		return KindSealed, nil
	case hdr.IsSparse():
		return KindSparseRW, nil
	}
	return KindRWData, nil
}

// isWarp tells a TurboOCI warp layer from a normal committed one. Warp commits carry meaningful
// tags (fs-meta vs remote data), remote entries point past the data area, and their index is not
// padded to 256 entries; normal (possibly merged) commits are padded and point inside.
func isWarp(r io.ReaderAt, size int64, t Header) bool {
	trailerOff := uint64(size - HeaderSize)
	if t.IndexSize > MaxROIndexEntries || t.IndexOffset > trailerOff || t.IndexSize*EntrySize > trailerOff-t.IndexOffset {
		return false
	}
	raw := make([]byte, t.IndexSize*EntrySize)
	if err := readFull(r, raw, int64(t.IndexOffset)); err != nil {
		return false
	}
	v := newValidator(HeaderSize/SectorSize, t.IndexOffset/SectorSize)
	tags := map[uint8]bool{}
	outside := false
	for i := 0; i < len(raw); i += EntrySize {
		m := unpack(binary.LittleEndian.Uint64(raw[i:]), binary.LittleEndian.Uint64(raw[i+8:]))
		if m.invalid() {
			continue
		}
		tags[m.tag()] = true
		outside = outside || v.checkRange(0, m) != nil
	}
	return (len(tags) > 1 || outside) && (t.IndexSize%256 != 0 || outside)
}
