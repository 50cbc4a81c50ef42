package main

import (
	"bytes"
	"io"
	"testing"

	"github.com/pierrec/lz4/v4"
)

// TestBigDataRatio checks that the big file's content is deterministic and compresses about 2× with LZ4 in 4 KiB
// blocks, as the ZFile stores it.
func TestBigDataRatio(t *testing.T) {
	a, err := io.ReadAll(newBigData(16<<20, 1))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(io.LimitReader(newBigData(16<<20, 1), 1<<20))
	if len(a) != 16<<20 || !bytes.Equal(a[:1<<20], b) {
		t.Fatalf("content is not deterministic or has the wrong size (%d bytes)", len(a))
	}
	dst := make([]byte, lz4.CompressBlockBound(dataBlock))
	var out int
	var c lz4.Compressor
	for off := 0; off < len(a); off += dataBlock {
		n, _ := c.CompressBlock(a[off:off+dataBlock], dst)
		if n == 0 || n > dataBlock {
			n = dataBlock
		}
		out += n
	}
	ratio := float64(len(a)) / float64(out)
	t.Logf("LZ4 ratio in 4 KiB blocks: %.2f", ratio)
	if ratio < 1.7 || ratio > 2.3 {
		t.Errorf("LZ4 ratio %.2f, want about 2", ratio)
	}
}
