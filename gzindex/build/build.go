// Package build writes gzip indexes (gzindex) while it decompresses a gzip blob, with zlib as upstream does: the same
// checkpoints, and windows and entries compressed by the same zlib calls, so the index has upstream's bytes.
package build

/*
#cgo LDFLAGS: -lz
#include <stdlib.h>
#include <string.h>
#include "gzi.h"
*/
import "C"

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"unsafe"

	"github.com/obdproject/obd/gzindex"
)

// DefaultLevel is the zlib level upstream compresses windows and entries with.
const DefaultLevel = 6

// Builder decompresses a gzip stream and indexes it in the same pass: Read returns the uncompressed stream; once it
// has returned io.EOF, Index returns the index file, the bytes upstream's create_gz_index writes for the same blob
// (same checkpoints, windows and entries compressed with the same zlib). Close frees it.
type Builder struct {
	src     io.Reader
	s       *C.obd_gzi
	span    int64
	level   int
	buf     []byte // input staging
	pending []byte // output not yet returned (in the C window)
	in, out int64  // bytes consumed and produced so far
	srcEOF  bool
	done    bool
	err     error

	expected int64 // the next multiple of span to place a checkpoint at
	last     struct {
		valid   bool
		bits    uint8
		in, out int64
		left    int
		window  [gzindex.WindowSize]byte
	}
	entries []gzindex.Entry
	windows bytes.Buffer
	cbuf    []byte
}

// New returns a Builder reading the gzip stream src, with a checkpoint every span uncompressed bytes
// (gzindex.DefaultSpan if 0; at least 64 KiB).
func New(src io.Reader, span int) (*Builder, error) {
	if span == 0 {
		span = gzindex.DefaultSpan
	}
	if span < gzindex.MinSpan {
		return nil, fmt.Errorf("gzip index: span %d is below %d", span, gzindex.MinSpan)
	}
	s := C.obd_gzi_new()
	if s == nil {
		return nil, errors.New("gzip index: zlib inflateInit2 failed")
	}
	return &Builder{src: src, s: s, span: int64(span), level: DefaultLevel, buf: make([]byte, C.OBD_GZI_IN),
		cbuf: make([]byte, 2*gzindex.WindowSize)}, nil
}

// Close frees the decompressor.
func (b *Builder) Close() error {
	C.obd_gzi_free(b.s)
	b.s = nil
	return nil
}

// Size returns the uncompressed bytes produced so far; after io.EOF, the stream's size.
func (b *Builder) Size() int64 { return b.out }

// Read reads the uncompressed stream.
func (b *Builder) Read(p []byte) (int, error) {
	for len(b.pending) == 0 {
		if b.err != nil {
			return 0, b.err
		}
		if b.done {
			return 0, io.EOF
		}
		if b.s == nil {
			return 0, errors.New("gzip index: builder is closed")
		}
		if err := b.step(); err != nil {
			b.err = err
		}
	}
	n := copy(p, b.pending)
	b.pending = b.pending[n:]
	return n, nil
}

func (b *Builder) step() error {
	s := b.s
	if s.strm.avail_in == 0 {
		if b.srcEOF {
			return fmt.Errorf("gzip: %w after %d bytes", io.ErrUnexpectedEOF, b.in)
		}
		n, err := io.ReadFull(b.src, b.buf)
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			b.srcEOF, err = true, nil
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return fmt.Errorf("gzip: %w after %d bytes", io.ErrUnexpectedEOF, b.in)
		}
		C.memcpy(unsafe.Pointer(&s.in[0]), unsafe.Pointer(&b.buf[0]), C.size_t(n))
		C.obd_gzi_feed(s, C.unsigned(n))
	}
	availIn := int64(s.strm.avail_in)
	var off, n C.unsigned
	ret := C.obd_gzi_step(s, &off, &n)
	b.in += availIn - int64(s.strm.avail_in)
	b.out += int64(n)
	// The new output, read straight from the C window: Read returns it all before the next step overwrites it.
	b.pending = unsafe.Slice((*byte)(unsafe.Pointer(&s.win[off])), int(n))
	switch ret {
	case C.Z_STREAM_END:
		b.done = true
		return b.trailing()
	case C.Z_OK, C.Z_BUF_ERROR:
	case C.Z_DATA_ERROR:
		msg := "corrupt deflate data"
		if s.strm.msg != nil {
			msg = C.GoString(s.strm.msg)
		}
		return fmt.Errorf("gzip: %s at byte %d", msg, b.in)
	default:
		return fmt.Errorf("gzip: zlib inflate error %d at byte %d", int(ret), b.in)
	}
	dt := int(s.strm.data_type)
	if dt&128 != 0 && dt&64 == 0 {
		return b.record(uint8(dt&7), b.in, b.out, int(s.strm.avail_out))
	}
	return nil
}

// trailing refuses bytes after the end of the stream: a second gzip member would be left out of the index.
func (b *Builder) trailing() error {
	extra := int64(b.s.strm.avail_in)
	if !b.srcEOF {
		n, err := io.Copy(io.Discard, b.src)
		if err != nil {
			return err
		}
		extra += n
	}
	if extra > 0 {
		return fmt.Errorf("gzip: %d bytes after the end of the first member at byte %d: a gzip index covers one member", extra, b.in)
	}
	return nil
}

// record mirrors upstream's IndexFilterRecorder: a checkpoint at the last block boundary at or before each
// multiple of the span.
func (b *Builder) record(bits uint8, in, out int64, left int) error {
	keep := func() {
		l := &b.last
		l.valid, l.bits, l.in, l.out, l.left = true, bits, in, out, left
		C.memcpy(unsafe.Pointer(&l.window[0]), unsafe.Pointer(&b.s.win[0]), gzindex.WindowSize)
	}
	if out < b.expected {
		keep()
		return nil
	}
	if out > b.expected {
		if b.last.valid {
			b.last.valid = false
			l := &b.last
			if err := b.add(l.bits, l.in, l.out, l.left, l.window[:]); err != nil {
				return err
			}
		}
		keep()
		for b.expected < out {
			b.expected += b.span
		}
	}
	if out == b.expected {
		b.last.valid = false
		if err := b.add(bits, in, out, left, unsafe.Slice((*byte)(unsafe.Pointer(&b.s.win[0])), gzindex.WindowSize)); err != nil {
			return err
		}
		b.expected += b.span
	}
	return nil
}

// add stores a checkpoint; window is the circular output buffer whose next write position is gzindex.WindowSize-left.
func (b *Builder) add(bits uint8, in, out int64, left int, window []byte) error {
	var dict [gzindex.WindowSize]byte
	n := copy(dict[:], window[gzindex.WindowSize-left:])
	copy(dict[n:], window[:gzindex.WindowSize-left])
	c, err := b.compress(dict[:])
	if err != nil {
		return err
	}
	b.entries = append(b.entries, gzindex.Entry{Out: out, In: in, WinPos: gzindex.HeaderSize + int64(b.windows.Len()), Bits: bits, WinLen: uint32(len(c))})
	b.windows.Write(c)
	return nil
}

func (b *Builder) compress(p []byte) ([]byte, error) {
	need := len(p) + len(p)/1000 + 64
	if len(b.cbuf) < need {
		b.cbuf = make([]byte, need)
	}
	dlen := C.ulong(len(b.cbuf))
	src := C.CBytes(p)
	defer C.free(src)
	dst := C.malloc(C.size_t(len(b.cbuf)))
	defer C.free(dst)
	if ret := C.obd_gzi_compress((*C.uchar)(src), C.ulong(len(p)), (*C.uchar)(dst), &dlen, C.int(b.level)); ret != C.Z_OK {
		return nil, fmt.Errorf("gzip index: zlib compress error %d", int(ret))
	}
	return C.GoBytes(dst, C.int(dlen)), nil
}

// Index returns the index file. The stream must have been read to io.EOF.
func (b *Builder) Index() ([]byte, error) {
	if b.err != nil {
		return nil, b.err
	}
	if !b.done || len(b.pending) > 0 {
		return nil, errors.New("gzip index: the stream has not been read to its end")
	}
	area, err := b.compress(gzindex.MarshalEntries(b.entries))
	if err != nil {
		return nil, err
	}
	h := gzindex.Header{Major: 1, DictAlgo: gzindex.AlgoZlib, DictLevel: int8(b.level), Span: int32(b.span), Window: gzindex.WindowSize,
		IndexSize: gzindex.EntrySize, IndexNum: int64(len(b.entries)), GzipFileSize: b.in, UncompressedSize: b.out,
		IndexStart: gzindex.HeaderSize + int64(b.windows.Len()), IndexAreaLen: int64(len(area))}
	h.IndexFileSize = h.IndexStart + h.IndexAreaLen
	out := make([]byte, 0, h.IndexFileSize)
	out = append(out, h.Marshal()...)
	out = append(out, b.windows.Bytes()...)
	return append(out, area...), nil
}
