//go:build cgo

package gunzip

/*
#include <stdint.h>
#include <stdlib.h>
#include <dlfcn.h>

#if __has_include(<isa-l/igzip_lib.h>)
#include <isa-l/igzip_lib.h>

static void (*obd_isal_init)(struct inflate_state *);
static int (*obd_isal_inflate)(struct inflate_state *);

// obd_isal_load loads ISA-L (the soname of its stable ABI) and returns 1 when it can be used.
static int obd_isal_load(void) {
	void *h = dlopen("libisal.so.2", RTLD_NOW | RTLD_LOCAL);
	if (!h)
		return 0;
	obd_isal_init = (void (*)(struct inflate_state *))dlsym(h, "isal_inflate_init");
	obd_isal_inflate = (int (*)(struct inflate_state *))dlsym(h, "isal_inflate");
	return obd_isal_init && obd_isal_inflate;
}

// obd_isal_new allocates a state set up to read the rest of a gzip member whose header was read: deflate data and
// a checked trailer.
static void *obd_isal_new(void) {
	struct inflate_state *s = calloc(1, sizeof *s);
	if (s) {
		obd_isal_init(s);
		s->crc_flag = ISAL_GZIP_NO_HDR_VER;
	}
	return s;
}

static void obd_isal_restart(void *p) {
	struct inflate_state *s = p;
	obd_isal_init(s);
	s->crc_flag = ISAL_GZIP_NO_HDR_VER;
}

// obd_isal_inflate_step runs the inflater over in and out and reports how much of each it used and whether the
// member ended. It keeps no pointer to the buffers.
static int obd_isal_inflate_step(void *p, uint8_t *in, uint32_t in_len, uint8_t *out, uint32_t out_len,
				 uint32_t *in_used, uint32_t *out_used, int *finished) {
	struct inflate_state *s = p;
	s->next_in = in;
	s->avail_in = in_len;
	s->next_out = out;
	s->avail_out = out_len;
	int ret = obd_isal_inflate(s);
	*in_used = in_len - s->avail_in;
	*out_used = out_len - s->avail_out;
	*finished = s->block_state == ISAL_BLOCK_FINISH;
	s->next_in = NULL;
	s->avail_in = 0;
	s->next_out = NULL;
	s->avail_out = 0;
	return ret;
}

// obd_isal_bad_checksum tells whether an error of isal_inflate is a checksum or size mismatch (else: bad data).
static int obd_isal_bad_checksum(int ret) { return ret == ISAL_INCORRECT_CHECKSUM; }
#else
static int obd_isal_load(void) { return 0; }
static void *obd_isal_new(void) { return NULL; }
static void obd_isal_restart(void *p) {}
static int obd_isal_inflate_step(void *p, uint8_t *in, uint32_t in_len, uint8_t *out, uint32_t out_len,
				 uint32_t *in_used, uint32_t *out_used, int *finished) { return -100; }
static int obd_isal_bad_checksum(int ret) { return 0; }
#endif
*/
import "C"

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"unsafe"
)

var isalAvailable = sync.OnceValue(func() bool { return C.obd_isal_load() == 1 })

const isalInput = 256 << 10

// isalMinInput is the least input handed to ISA-L before the source's end: given only a few bytes at a time, its
// inflate sometimes misreads a stream (seen with 1–3 bytes per call, never with 7 or more).
const isalMinInput = 64

// isalReader decompresses a gzip stream with ISA-L.
type isalReader struct {
	src      io.Reader
	state    unsafe.Pointer
	in       []byte
	pos, end int   // in[pos:end] is read but not yet consumed
	srcErr   error // src's error, once it returned one (io.EOF at its end)
	ended    bool  // the current member ended: another may follow
	total    int64 // bytes of input consumed, for error messages
	err      error // sticky
}

func newISAL(r io.Reader) (io.ReadCloser, error) {
	if !isalAvailable() {
		return nil, errors.New("gunzip: ISA-L (libisal.so.2) is not installed")
	}
	state := C.obd_isal_new()
	if state == nil {
		return nil, errors.New("gunzip: out of memory")
	}
	// The input buffer has 64 bytes of zeros after its end that no read fills: the inflater may load a few
	// bytes past its input, and they must be memory of ours.
	z := &isalReader{src: r, state: state, in: make([]byte, isalInput+64)[:isalInput]}
	if err := readHeader(z.readByte); err != nil {
		z.Close()
		return nil, err
	}
	return z, nil
}

// readByte returns the next input byte, for reading member headers.
func (z *isalReader) readByte() (byte, error) {
	if z.pos == z.end {
		z.fill(1)
		if z.pos == z.end {
			return 0, z.inputEnd(io.EOF)
		}
	}
	c := z.in[z.pos]
	z.pos++
	z.total++
	return c, nil
}

// fill reads more input after what is left unconsumed, until at least want bytes are there or src has ended.
func (z *isalReader) fill(want int) {
	if z.pos > 0 {
		z.end = copy(z.in, z.in[z.pos:z.end])
		z.pos = 0
	}
	for z.srcErr == nil && z.end < want {
		n, err := z.src.Read(z.in[z.end:])
		z.end += n
		if err != nil {
			z.srcErr = err
		}
	}
}

func (z *isalReader) Read(p []byte) (int, error) {
	if z.err != nil {
		return 0, z.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	n, err := z.read(p)
	if err != nil {
		z.err = err
	}
	return n, err
}

func (z *isalReader) read(p []byte) (int, error) {
	for {
		if z.ended {
			if err := readHeader(z.readByte); err != nil {
				return 0, err // io.EOF: no other member follows
			}
			C.obd_isal_restart(z.state)
			z.ended = false
		}
		if z.end-z.pos < isalMinInput && z.srcErr == nil {
			z.fill(isalMinInput)
		}
		out := (*C.uint8_t)(unsafe.Pointer(&p[0]))
		var in *C.uint8_t
		if z.end > z.pos {
			in = (*C.uint8_t)(unsafe.Pointer(&z.in[z.pos]))
		}
		var inUsed, outUsed C.uint32_t
		var finished C.int
		ret := C.obd_isal_inflate_step(z.state, in, C.uint32_t(z.end-z.pos), out, C.uint32_t(min(len(p), 1<<30)),
			&inUsed, &outUsed, &finished)
		z.pos += int(inUsed)
		z.total += int64(inUsed)
		if ret < 0 {
			return int(outUsed), z.failure(int(ret))
		}
		z.ended = finished != 0
		if outUsed > 0 {
			return int(outUsed), nil
		}
		if z.ended {
			continue
		}
		if z.pos < z.end {
			if inUsed == 0 {
				// Input left, room for output, no progress: cannot happen with a sound library.
				return 0, fmt.Errorf("gunzip: ISA-L made no progress at input byte %d", z.total)
			}
			continue
		}
		if z.srcErr != nil {
			return 0, z.inputEnd(io.ErrUnexpectedEOF)
		}
	}
}

// inputEnd is the error at the end of the input: atEnd when it came where expected, or src's own error.
func (z *isalReader) inputEnd(atEnd error) error {
	if z.srcErr != nil && z.srcErr != io.EOF {
		return z.srcErr
	}
	return atEnd
}

func (z *isalReader) failure(ret int) error {
	if C.obd_isal_bad_checksum(C.int(ret)) != 0 {
		return ErrChecksum
	}
	return fmt.Errorf("%w (ISA-L error %d near input byte %d)", ErrCorrupt, ret, z.total)
}

// Close frees the inflater.
func (z *isalReader) Close() error {
	if z.state != nil {
		C.free(z.state)
		z.state = nil
	}
	if z.err == nil {
		z.err = errors.New("gunzip: read after Close")
	}
	return nil
}
