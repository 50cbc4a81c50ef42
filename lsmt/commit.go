package lsmt

import (
	"bufio"
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
}

func (f *File) commitView() ([]mapping, []io.ReaderAt) { return f.idx.ents, f.readers }

func (w *RW) commitView() ([]mapping, []io.ReaderAt) { return w.dump(), []io.ReaderAt{w.data} }

// Commit writes src as a compacted read-only layer to dst, byte for byte as upstream's
// compaction (overlaybd-commit) does: a header (flags 7), the live data in index order starting
// at 4096 (copied in 32 KiB chunks, one raw entry per chunk; zeroed extents keep their place with
// moffset = the current data position), the merged index (neighbours contiguous in LBA and file
// with equal flags merged while their length stays below 16383) padded with invalid entries to a
// multiple of 256, and a trailer (flags 6). Tags of a merged source are kept, as upstream does.
// It returns the number of bytes written. Sources must not change during the commit.
func Commit(dst io.Writer, src Source, opts CommitOptions) (int64, error) {
	hdr, err := commitHeader(src.Header(), opts)
	if err != nil {
		return 0, err
	}
	ents, readers := src.commitView()
	cw := &countWriter{w: dst}
	out := bufio.NewWriterSize(cw, 1<<20)
	if err := writeHeaderTo(out, hdr); err != nil {
		return cw.n, err
	}
	index := make([]mapping, 0, len(ents))
	moff := uint64(HeaderSize / SectorSize)
	buf := make([]byte, 1<<20)
	for _, m := range ents {
		if m.zeroed() {
			index = append(index, m.withMOff(moff))
			continue
		}
		for done := uint64(0); done < uint64(m.length()); done += commitChunk / SectorSize {
			n := min(uint64(m.length())-done, commitChunk/SectorSize)
			index = append(index, pack(m.off()+done, uint32(n), moff+done, false, m.tag()))
		}
		if err := copyData(out, readers[m.tag()], buf, m); err != nil {
			return cw.n, err
		}
		moff += uint64(m.length())
	}
	hdr.IndexOffset = moff * SectorSize
	index = compressIndex(index)
	if r := len(index) % (HeaderSize / EntrySize); r != 0 {
		for range HeaderSize/EntrySize - r {
			index = append(index, invalidMapping)
		}
	}
	hdr.IndexSize = uint64(len(index))
	raw := make([]byte, 0, HeaderSize)
	for i, m := range index {
		raw = m.append(raw)
		if len(raw) == cap(raw) || i == len(index)-1 {
			if _, err := out.Write(raw); err != nil {
				return cw.n, err
			}
			raw = raw[:0]
		}
	}
	hdr.Flags &^= FlagHeader
	if err := writeHeaderTo(out, hdr); err != nil {
		return cw.n, err
	}
	err = out.Flush()
	return cw.n, err
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

func writeHeaderTo(w io.Writer, h Header) error {
	b, err := h.MarshalBinary()
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// copyData copies the data of mapping m from r to w.
func copyData(w io.Writer, r io.ReaderAt, buf []byte, m mapping) error {
	off := int64(m.moff()) * SectorSize
	for left := int64(m.length()) * SectorSize; left > 0; {
		b := buf[:min(left, int64(len(buf)))]
		if err := readFull(r, b, off); err != nil {
			return fmt.Errorf("lsmt: commit: reading %d bytes at %d (segment %v): %w", len(b), off, m, err)
		}
		if _, err := w.Write(b); err != nil {
			return err
		}
		off += int64(len(b))
		left -= int64(len(b))
	}
	return nil
}

// countWriter counts the bytes written through it and annotates write errors.
type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	if err != nil {
		err = fmt.Errorf("lsmt: commit: writing output: %w", err)
	}
	return n, err
}
