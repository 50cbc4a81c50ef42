package lsmt

import (
	"fmt"
	"io"
)

// commitChunk is the copy unit of upstream's compaction; each chunk yields one raw index entry
// before neighbours are merged, which decides where long extents are split.
const commitChunk = 32 << 10

// Source is a layer Commit can compact: *File, *RW (append or sparse) and *Stack.
type Source interface {
	// Header returns the header whose virtual size and parent UUID a commit inherits.
	Header() Header
	// commitView returns the sorted, non-overlapping index and the files its tags select.
	commitView() ([]mapping, []io.ReaderAt)
}

// CommitOptions configures Commit.
type CommitOptions struct {
	UUID       string // "" writes the null UUID
	ParentUUID string // "" inherits the source header's parent (null when it has none)
	UserTag    string // commit message, at most 256 bytes
	// Warp commits a TurboOCI warp layer as upstream's LSMTWarpFile does: fs-meta data (tag 0) compacted as usual,
	// remote entries (tag 1, see RW.MapTarget) kept as they are, the index not padded. Only an RW source has them.
	Warp bool
}

func (f *File) commitView() ([]mapping, []io.ReaderAt) { return f.idx.ents, f.readers }

func (w *RW) commitView() ([]mapping, []io.ReaderAt) { return w.dump(), w.readers() }

// Commit writes src as a compacted read-only layer to dst, byte for byte as upstream's
// compaction (overlaybd-commit) does: a header (flags 7), the live data in index order starting
// at 4096 (copied in 32 KiB chunks, one raw entry per chunk; zeroed extents keep their place with
// moffset = the current data position), the merged index (neighbours contiguous in LBA and file
// with equal flags merged while their length stays below 16383) padded with invalid entries to a
// multiple of 256, and a trailer (flags 6). Tags of a merged source are kept, as upstream does.
// It returns the number of bytes written. Sources must not change during the commit.
func Commit(dst io.Writer, src Source, opts CommitOptions) (int64, error) {
	cr, err := NewCommitReader(src, opts)
	if err != nil {
		return 0, err
	}
	return io.CopyBuffer(dst, cr, make([]byte, 1<<20))
}

// CommitReader reads the committed layer Commit would write, computing it as it is read: the
// data is read from the source's files straight into the caller's buffer, so a committed layer
// can be streamed into a compressor without being stored first.
type CommitReader struct {
	head, tail []byte // header; index and trailer
	data       []mapping
	readers    []io.ReaderAt
	size       int64
	pos        int64 // bytes read so far
	seg        int   // data[seg] holds the next data byte...
	segDone    int64 // ...at this byte offset within it
}

// NewCommitReader returns a reader of the committed form of src (see Commit). The index is
// built up front; the source must not change until the reader is done.
func NewCommitReader(src Source, opts CommitOptions) (*CommitReader, error) {
	hdr, err := commitHeader(src.Header(), opts)
	if err != nil {
		return nil, err
	}
	ents, readers := src.commitView()
	cr := &CommitReader{readers: readers}
	if cr.head, err = hdr.MarshalBinary(); err != nil {
		return nil, err
	}
	index := make([]mapping, 0, len(ents))
	moff := uint64(HeaderSize / SectorSize)
	for _, m := range ents {
		if opts.Warp && m.tag() == TagTarget {
			index = append(index, m)
			continue
		}
		if m.tag() != 0 && opts.Warp {
			return nil, fmt.Errorf("lsmt: warp commit of an entry with tag %d", m.tag())
		}
		if m.zeroed() {
			index = append(index, m.withMOff(moff))
			continue
		}
		for done := uint64(0); done < uint64(m.length()); done += commitChunk / SectorSize {
			n := min(uint64(m.length())-done, commitChunk/SectorSize)
			index = append(index, pack(m.off()+done, uint32(n), moff+done, false, m.tag()))
		}
		cr.data = append(cr.data, m)
		moff += uint64(m.length())
	}
	hdr.IndexOffset = moff * SectorSize
	index = compressIndex(index)
	if r := len(index) % (HeaderSize / EntrySize); r != 0 && !opts.Warp {
		for range HeaderSize/EntrySize - r {
			index = append(index, invalidMapping)
		}
	}
	hdr.IndexSize = uint64(len(index))
	hdr.Flags &^= FlagHeader
	cr.tail = make([]byte, 0, len(index)*EntrySize+HeaderSize)
	for _, m := range index {
		cr.tail = m.append(cr.tail)
	}
	trailer, err := hdr.MarshalBinary()
	if err != nil {
		return nil, err
	}
	cr.tail = append(cr.tail, trailer...)
	cr.size = int64(hdr.IndexOffset) + int64(len(cr.tail))
	return cr, nil
}

// Size returns the size of the committed layer.
func (cr *CommitReader) Size() int64 { return cr.size }

// Read reads the next bytes of the committed layer.
func (cr *CommitReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) && cr.pos < cr.size {
		var k int
		switch dataEnd := cr.size - int64(len(cr.tail)); {
		case cr.pos < int64(len(cr.head)):
			k = copy(p[n:], cr.head[cr.pos:])
		case cr.pos < dataEnd:
			m := cr.data[cr.seg]
			left := int64(m.length())*SectorSize - cr.segDone
			b := p[n:min(len(p), n+int(min(left, int64(len(p)-n))))]
			off := int64(m.moff())*SectorSize + cr.segDone
			if err := readFull(cr.readers[m.tag()], b, off); err != nil {
				return n, fmt.Errorf("lsmt: commit: reading %d bytes at %d (segment %v): %w", len(b), off, m, err)
			}
			k = len(b)
			if cr.segDone += int64(k); cr.segDone == int64(m.length())*SectorSize {
				cr.seg, cr.segDone = cr.seg+1, 0
			}
		default:
			k = copy(p[n:], cr.tail[cr.pos-dataEnd:])
		}
		n += k
		cr.pos += int64(k)
	}
	if n == 0 && cr.pos == cr.size {
		return 0, io.EOF
	}
	return n, nil
}

// commitHeader builds the committed header from the source header and the options.
func commitHeader(src Header, opts CommitOptions) (Header, error) {
	h := newHeader(FlagHeader | FlagDataFile | FlagSealed)
	h.VirtualSize = src.VirtualSize
	h.UserTag = opts.UserTag
	if len(opts.UserTag) > userTagSize {
		return h, fmt.Errorf("lsmt: user tag too long (%d bytes, at most %d)", len(opts.UserTag), userTagSize)
	}
	if opts.UUID != "" {
		u, ok := CanonicalUUID(opts.UUID)
		if !ok {
			return h, fmt.Errorf("lsmt: invalid uuid %q", opts.UUID)
		}
		h.UUID = u
	}
	h.ParentUUID = validOrNull(src.ParentUUID)
	if opts.ParentUUID != "" {
		u, ok := CanonicalUUID(opts.ParentUUID)
		if !ok {
			return h, fmt.Errorf("lsmt: invalid parent uuid %q", opts.ParentUUID)
		}
		h.ParentUUID = u
	}
	return h, nil
}
