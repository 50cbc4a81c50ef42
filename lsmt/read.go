package lsmt

import (
	"errors"
	"fmt"
	"io"
)

// filler assembles a read of the virtual disk into p: mapped pieces become ReadAt calls on the
// owning file, coalesced while they stay contiguous in the buffer and in the same file; holes and
// zeroed extents are cleared without reading.
type filler struct {
	p       []byte
	base    uint64 // virtual byte offset of p[0]
	pos     uint64 // next virtual byte to fill
	readers []io.ReaderAt

	has   bool // a read is pending
	rd    int  // its reader
	foff  uint64
	boff  uint64
	count uint64
}

func newFiller(p []byte, off int64, readers []io.ReaderAt) *filler {
	return &filler{p: p, base: uint64(off), pos: uint64(off), readers: readers}
}

// end returns the virtual byte offset just past p.
func (f *filler) end() uint64 { return f.base + uint64(len(f.p)) }

// zeroTo clears the buffer up to virtual offset e.
func (f *filler) zeroTo(e uint64) {
	if e > f.pos {
		clear(f.p[f.pos-f.base : e-f.base])
		f.pos = e
	}
}

// mapped fills [pos, e) from mapping m (which covers it), reading from readers[rd].
func (f *filler) mapped(rd int, m mapping, e uint64) error {
	if m.zeroed() {
		f.zeroTo(e)
		return nil
	}
	foff := m.moff()*SectorSize + (f.pos - m.off()*SectorSize)
	boff := f.pos - f.base
	n := e - f.pos
	f.pos = e
	if f.has && f.rd == rd && f.foff+f.count == foff && f.boff+f.count == boff {
		f.count += n
		return nil
	}
	if err := f.flush(); err != nil {
		return err
	}
	f.has, f.rd, f.foff, f.boff, f.count = true, rd, foff, boff, n
	return nil
}

// fromIndex fills the buffer up to virtual byte offset stop from index x.
func (f *filler) fromIndex(x *segIndex, stop uint64) error {
	for i := x.find(f.pos / SectorSize); i < len(x.ents) && f.pos < stop; i++ {
		m := x.ents[i]
		s := m.off() * SectorSize
		if s >= stop {
			break
		}
		f.zeroTo(s)
		if err := f.mapped(int(m.tag()), m, min(m.end()*SectorSize, stop)); err != nil {
			return err
		}
	}
	f.zeroTo(stop)
	return nil
}

// flush issues the pending read.
func (f *filler) flush() error {
	if !f.has {
		return nil
	}
	f.has = false
	buf := f.p[f.boff : f.boff+f.count]
	err := readFull(f.readers[f.rd], buf, int64(f.foff))
	if err == nil {
		return nil
	}
	return fmt.Errorf("lsmt: reading %d bytes at %d of layer file %d: %w", len(buf), f.foff, f.rd, err)
}

// readFull reads len(p) bytes at off; a complete read that reports io.EOF is a success.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// clampRead bounds a read at off of len(p) bytes to a virtual disk of size vsize. It returns the
// part of p to fill and the error to return with it (io.EOF when the read was cut short).
func clampRead(p []byte, off int64, vsize uint64) ([]byte, error) {
	if off < 0 {
		return nil, fmt.Errorf("lsmt: negative read offset %d", off)
	}
	if uint64(off) >= vsize {
		if len(p) == 0 {
			return p, nil
		}
		return nil, io.EOF
	}
	if rest := vsize - uint64(off); uint64(len(p)) > rest {
		return p[:rest], io.EOF
	}
	return p, nil
}
