//go:build cgo

// Package lz4c compresses batches of LZ4 blocks with the system's liblz4 (loaded at run time, never required):
// the same bytes as the Go compressor (pierrec/lz4's C-compatible mode), about 1.5 times faster. The converter
// hands Batch to zfile.Options.LZ4Batch; the node daemon, which only decompresses, does not link it.
package lz4c

/*
#include <dlfcn.h>

static int (*obd_lz4_compress)(const char *, char *, int, int);

// obd_lz4_load loads liblz4 (the soname of its stable ABI) and returns 1 when LZ4_compress_default can be used.
static int obd_lz4_load(void) {
	void *h = dlopen("liblz4.so.1", RTLD_NOW | RTLD_LOCAL);
	if (!h)
		return 0;
	obd_lz4_compress = (int (*)(const char *, char *, int, int))dlsym(h, "LZ4_compress_default");
	return obd_lz4_compress != 0;
}

// obd_lz4_batch compresses src in blocks of bs bytes (the last may be shorter) into dst one after another, leaving
// gap bytes after each (for its CRC), and stores each block's compressed length in lens. It returns the bytes of
// dst used, or -1 when dst is too small or a block fails.
static int obd_lz4_batch(const char *src, int srclen, int bs, char *dst, int dstcap, int gap, int *lens) {
	int pos = 0;
	for (int off = 0, i = 0; off < srclen; off += bs, i++) {
		int n = srclen - off < bs ? srclen - off : bs;
		int bound = n + n / 255 + 16; // LZ4_COMPRESSBOUND
		if (pos + bound + gap > dstcap)
			return -1;
		int c = obd_lz4_compress(src + off, dst + pos, n, bound);
		if (c <= 0)
			return -1;
		lens[i] = c;
		pos += c + gap;
	}
	return pos;
}
*/
import "C"

import (
	"sync"
	"unsafe"
)

// Available says whether the system's liblz4 is loaded. Its LZ4_compress_default gives the same bytes as the Go
// compressor (tested).
var Available = sync.OnceValue(func() bool { return C.obd_lz4_load() == 1 })

// Batch compresses raw in blocks of bs bytes into dst[:cap(dst)], leaving gap bytes after each record, and sets
// lens[i] to the compressed size of block i. It returns the bytes used, or false without liblz4 or when dst is too
// small.
func Batch(raw []byte, bs int, dst []byte, gap int, lens []int32) (int, bool) {
	if !Available() || len(raw) == 0 || cap(dst) == 0 || len(lens) < (len(raw)+bs-1)/bs {
		return 0, false
	}
	dst = dst[:cap(dst)]
	n := C.obd_lz4_batch((*C.char)(unsafe.Pointer(&raw[0])), C.int(len(raw)), C.int(bs),
		(*C.char)(unsafe.Pointer(&dst[0])), C.int(len(dst)), C.int(gap), (*C.int)(unsafe.Pointer(&lens[0])))
	return int(n), n >= 0
}
