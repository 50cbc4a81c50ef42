package gzindex

import (
	"errors"
	"fmt"
	"io"
	"sync"
)

// inChunk is how much compressed input a Reader reads ahead: little beyond what a read needs is fetched
// (CompressedRange allows for it).
const inChunk = 16 << 10

// idleCursors is how many decompressors a Reader keeps where earlier reads ended, so that sequential readers (one
// file each) continue instead of restarting from a checkpoint.
const idleCursors = 4

// Reader reads the uncompressed stream of a gzip blob at any offset: from the checkpoint at or before the offset, it
// reads the compressed bytes from the blob (an io.ReaderAt, e.g. a lazily fetched remote blob) and inflates.
type Reader struct {
	ix     *Index
	gz     io.ReaderAt
	mu     sync.Mutex
	cursor []*cursor
}

// cursor is an inflater positioned at uncompressed offset pos.
type cursor struct {
	fr  *inflater
	pos int64
}

func (c *cursor) Read(p []byte) (int, error) {
	n, err := c.fr.Read(p)
	c.pos += int64(n)
	return n, err
}

// NewReader returns a Reader of the blob gz, indexed by ix.
func NewReader(ix *Index, gz io.ReaderAt) *Reader { return &Reader{ix: ix, gz: gz} }

// Size returns the size of the uncompressed stream.
func (r *Reader) Size() int64 { return r.ix.UncompressedSize }

// ReadAt reads the uncompressed stream at off.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) {
	size := r.ix.UncompressedSize
	if off < 0 {
		return 0, fmt.Errorf("gzip index: read at negative offset %d", off)
	}
	if off >= size {
		return 0, io.EOF
	}
	want := p
	if int64(len(p)) > size-off {
		p = p[:size-off]
	}
	i := r.ix.find(off)
	c := r.take(off, r.ix.Entries[i].Out)
	if c == nil {
		var err error
		if c, err = r.open(i); err != nil {
			return 0, err
		}
	}
	if _, err := io.CopyN(io.Discard, c, off-c.pos); err != nil {
		return 0, r.streamErr(err, c.pos)
	}
	n, err := io.ReadFull(c, p)
	if err != nil {
		return n, r.streamErr(err, c.pos)
	}
	r.put(c)
	if len(p) < len(want) {
		return n, io.EOF
	}
	return n, nil
}

func (r *Reader) streamErr(err error, pos int64) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("gzip index: the deflate stream ends at %d, the index says %d: %w", pos, r.ix.UncompressedSize, io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("gzip index: inflating at %d: %w", pos, err)
}

// take returns an idle cursor at or before off with no checkpoint between it and off (cp is the checkpoint's
// offset), the nearest one; nil if none.
func (r *Reader) take(off, cp int64) *cursor {
	r.mu.Lock()
	defer r.mu.Unlock()
	best := -1
	for i, c := range r.cursor {
		if c.pos <= off && c.pos >= cp && (best < 0 || c.pos > r.cursor[best].pos) {
			best = i
		}
	}
	if best < 0 {
		return nil
	}
	c := r.cursor[best]
	r.cursor = append(r.cursor[:best], r.cursor[best+1:]...)
	return c
}

func (r *Reader) put(c *cursor) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.cursor) == idleCursors {
		r.cursor = r.cursor[1:]
	}
	r.cursor = append(r.cursor, c)
}

// open starts an inflater at checkpoint i.
func (r *Reader) open(i int) (*cursor, error) {
	e := r.ix.Entries[i]
	dict, err := r.ix.window(i)
	if err != nil {
		return nil, err
	}
	start := e.In
	if e.Bits > 0 {
		start--
	}
	src := io.NewSectionReader(r.gz, start, r.ix.GzipFileSize-start)
	var first byte
	if e.Bits > 0 {
		var b [1]byte
		if _, err := io.ReadFull(src, b[:]); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("gzip index: reading the blob at %d: %w", start, err)
		}
		first = b[0]
	}
	return &cursor{fr: newInflater(src, dict, e.Bits, first), pos: e.Out}, nil
}
