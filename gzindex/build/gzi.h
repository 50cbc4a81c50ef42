// The zlib side of the gzip index builder: an inflate that stops at deflate block boundaries (as zlib's zran example),
// with its input and output buffers in C memory so that no Go pointer outlives a call.
#ifndef OBD_GZINDEX_GZI_H
#define OBD_GZINDEX_GZI_H

#include <stdint.h>
#include <zlib.h>

#define OBD_GZI_IN 65536
#define OBD_GZI_WIN 32768

typedef struct obd_gzi {
	z_stream strm;
	int inited;
	unsigned char in[OBD_GZI_IN];
	unsigned char win[OBD_GZI_WIN];
} obd_gzi;

obd_gzi *obd_gzi_new(void);
void obd_gzi_free(obd_gzi *s);
// obd_gzi_feed makes the first n bytes of s->in the input.
void obd_gzi_feed(obd_gzi *s, unsigned n);
// obd_gzi_step runs inflate(Z_BLOCK) once into the circular window; *out_off and *out_len tell where the new output is.
int obd_gzi_step(obd_gzi *s, unsigned *out_off, unsigned *out_len);
// obd_gzi_compress zlib-compresses n bytes at src into dst (cap *dlen) at level, as deflateInit + deflate(Z_FINISH).
int obd_gzi_compress(const unsigned char *src, unsigned long n, unsigned char *dst, unsigned long *dlen, int level);

#endif
