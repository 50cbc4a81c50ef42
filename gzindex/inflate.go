package gzindex

/*
#include <stdlib.h>
#include <string.h>
#include "gzi.h"
*/
import "C"

import (
	"fmt"
	"io"
	"runtime"
	"unsafe"
)

// inChunk is how much compressed input an inflater reads at a time: little beyond what a read needs is fetched
// (CompressedRange allows for it).
const inChunk = 16 << 10

// inflater inflates the raw deflate stream of a gzip blob from a checkpoint, with zlib: Go's flate cannot start
// inside a byte and keep the stream's byte alignment, which stored blocks after the checkpoint depend on.
type inflater struct {
	s       *C.obd_gzr
	src     io.Reader // compressed bytes from the checkpoint's first whole byte on
	buf     []byte
	pending []byte
	end     bool
	err     error
	cleanup runtime.Cleanup
}

// newInflater starts at a checkpoint whose first bits (0–7) are the top bits of first, then src, with dict as the
// window. Its C memory is freed by Close, or when it is collected.
func newInflater(src io.Reader, dict []byte, bits uint8, first byte) (*inflater, error) {
	var code C.int
	s := C.obd_gzr_new((*C.uchar)(unsafe.Pointer(&dict[0])), C.unsigned(len(dict)), C.int(bits), C.int(first>>(8-bits)), &code)
	if s == nil {
		return nil, fmt.Errorf("gzip index: zlib cannot resume at the checkpoint (error %d)", int(code))
	}
	in := &inflater{s: s, src: src, buf: make([]byte, inChunk)}
	in.cleanup = runtime.AddCleanup(in, func(s *C.obd_gzr) { C.obd_gzr_free(s) }, s)
	return in, nil
}

func (in *inflater) Read(p []byte) (int, error) {
	for len(in.pending) == 0 {
		if in.err != nil {
			return 0, in.err
		}
		if in.end {
			return 0, io.EOF
		}
		in.err = in.step()
	}
	n := copy(p, in.pending)
	in.pending = in.pending[n:]
	return n, nil
}

func (in *inflater) step() error {
	s := in.s
	if s == nil {
		return fmt.Errorf("gzip index: inflater closed")
	}
	if s.strm.avail_in == 0 {
		n, err := io.ReadFull(in.src, in.buf)
		if n == 0 {
			if err == io.EOF || err == nil {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		C.memcpy(unsafe.Pointer(&s.in[0]), unsafe.Pointer(&in.buf[0]), C.size_t(n))
		C.obd_gzr_feed(s, C.unsigned(n))
	}
	var n C.unsigned
	ret := C.obd_gzr_step(s, &n)
	in.pending = append(in.pending[:0], unsafe.Slice((*byte)(unsafe.Pointer(&s.out[0])), int(n))...)
	switch ret {
	case C.Z_STREAM_END:
		in.end = true
	case C.Z_OK, C.Z_BUF_ERROR:
	default:
		msg := "corrupt deflate data"
		if s.strm.msg != nil {
			msg = C.GoString(s.strm.msg)
		}
		return fmt.Errorf("inflate: %s (zlib %d)", msg, int(ret))
	}
	return nil
}

// Close frees the zlib state.
func (in *inflater) Close() error {
	if in.s == nil {
		return nil
	}
	in.cleanup.Stop()
	C.obd_gzr_free(in.s)
	in.s = nil
	return nil
}
