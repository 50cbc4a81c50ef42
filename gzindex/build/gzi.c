#include <stdlib.h>
#include <string.h>
#include "gzi.h"

obd_gzi *obd_gzi_new(void)
{
	obd_gzi *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	// 47: a gzip or zlib header, detected.
	if (inflateInit2(&s->strm, 47) != Z_OK) {
		free(s);
		return NULL;
	}
	s->inited = 1;
	return s;
}

void obd_gzi_free(obd_gzi *s)
{
	if (!s)
		return;
	if (s->inited)
		inflateEnd(&s->strm);
	free(s);
}

void obd_gzi_feed(obd_gzi *s, unsigned n)
{
	s->strm.next_in = s->in;
	s->strm.avail_in = n;
}

int obd_gzi_step(obd_gzi *s, unsigned *out_off, unsigned *out_len)
{
	if (s->strm.avail_out == 0) {
		s->strm.avail_out = OBD_GZI_WIN;
		s->strm.next_out = s->win;
	}
	unsigned before = s->strm.avail_out;
	*out_off = OBD_GZI_WIN - before;
	int ret = inflate(&s->strm, Z_BLOCK);
	*out_len = before - s->strm.avail_out;
	return ret;
}

int obd_gzi_compress(const unsigned char *src, unsigned long n, unsigned char *dst, unsigned long *dlen, int level)
{
	return compress2(dst, dlen, src, n, level);
}
