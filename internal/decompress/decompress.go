// Package decompress opens layer blobs of any compression obd reads: gzip (with ISA-L when the machine has it,
// see package gunzip), zstd, or none. It is the converter's: the node daemon never decompresses whole layers.
package decompress

import (
	"bufio"
	"bytes"
	"fmt"
	"io"

	"github.com/klauspost/compress/zstd"

	"github.com/obdproject/obd/internal/gunzip"
)

// Compression of a layer blob.
type Compression string

// Compressions obd reads.
const (
	Uncompressed Compression = "none"
	Gzip         Compression = "gzip"
	Zstd         Compression = "zstd"
)

// Layer returns the uncompressed stream of a layer blob, detecting gzip and zstd by their magic bytes
// (media types lie often enough that the bytes are the better witness). Gzip is read with ISA-L when the machine
// has it (see package gunzip).
func Layer(r io.Reader) (io.ReadCloser, Compression, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	magic, err := br.Peek(4)
	if err != nil && err != io.EOF {
		return nil, "", fmt.Errorf("read layer: %w", err)
	}
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		zr, err := gunzip.NewReader(br)
		if err != nil {
			return nil, Gzip, fmt.Errorf("gzip layer: %w", err)
		}
		return zr, Gzip, nil
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, Zstd, fmt.Errorf("zstd layer: %w", err)
		}
		return zr.IOReadCloser(), Zstd, nil
	default:
		return io.NopCloser(br), Uncompressed, nil
	}
}
