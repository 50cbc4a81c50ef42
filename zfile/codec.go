package zfile

import (
	"fmt"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
)

// zstdDecoder is shared by all readers; DecodeAll is safe for concurrent use. DecodeAll is capped
// to the capacity of its destination, so a hostile frame cannot make it allocate.
var zstdDecoder = sync.OnceValues(func() (*zstd.Decoder, error) {
	return zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(0),
		zstd.WithDecoderMaxMemory(4*maxBlockSize),
		zstd.WithDecoderMaxWindow(4*maxBlockSize),
		zstd.WithDecodeAllCapLimit(true),
	)
})

// decodeBlock decompresses one block's compressed bytes src into dst, which has exactly the
// block's uncompressed length. The returned error (without block context) wraps ErrCorrupt.
func decodeBlock(algo Algorithm, src, dst []byte) error {
	switch algo {
	case AlgoLZ4:
		n, err := lz4.UncompressBlock(src, dst)
		if err != nil {
			return &kindError{msg: "lz4: corrupt input", kind: ErrCorrupt}
		}
		if n != len(dst) {
			return &kindError{msg: fmt.Sprintf("lz4: decompressed %d bytes, want %d", n, len(dst)), kind: ErrCorrupt}
		}
		return nil
	case AlgoZSTD:
		dec, err := zstdDecoder()
		if err != nil {
			return err
		}
		// The capacity limit keeps the decoder inside dst (and out of the rest of the caller's buffer).
		out, err := dec.DecodeAll(src, dst[:0:len(dst)])
		if err != nil {
			return &kindError{msg: "zstd: " + err.Error(), kind: ErrCorrupt}
		}
		if len(out) != len(dst) {
			return &kindError{msg: fmt.Sprintf("zstd: decompressed %d bytes, want %d", len(out), len(dst)), kind: ErrCorrupt}
		}
		if &out[0] != &dst[0] {
			copy(dst, out)
		}
		return nil
	}
	return &kindError{msg: "algorithm " + algo.String() + " not supported", kind: ErrUnsupported}
}

// blockEncoder compresses blocks for one goroutine.
type blockEncoder struct {
	algo Algorithm
	lz4  *lz4.CompressorCCompat // LZ4_compress_default's exact output
	zstd *zstd.Encoder          // shared, safe for concurrent EncodeAll
}

// appendBlock appends the compressed record of src (compressed bytes, then the CRC if withCRC) to dst.
// dst must have room for maxRecord(len(src)) more bytes.
func (e *blockEncoder) appendBlock(dst, src []byte, withCRC bool) []byte {
	start := len(dst)
	switch e.algo {
	case AlgoZSTD:
		dst = e.zstd.EncodeAll(src, dst)
	default:
		// With room for CompressBlockBound, LZ4 always succeeds; like LZ4_compress_default it
		// emits a literal-only block (slightly larger than src) for incompressible input.
		n, _ := e.lz4.CompressBlock(src, dst[start:start+lz4.CompressBlockBound(len(src))])
		dst = dst[:start+n]
	}
	if withCRC {
		c := crc32c(blockCRCSeed, dst[start:])
		dst = append(dst, byte(c), byte(c>>8), byte(c>>16), byte(c>>24))
	}
	return dst
}

// newZstdEncoder returns an encoder mimicking upstream's ZSTD_compress(level 3): no frame
// checksum, single-segment frames with the content size.
func newZstdEncoder(concurrency int) (*zstd.Encoder, error) {
	return zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.SpeedDefault),
		zstd.WithEncoderCRC(false),
		zstd.WithSingleSegment(true),
		zstd.WithWindowSize(2*maxBlockSize),
		zstd.WithEncoderConcurrency(concurrency),
	)
}
