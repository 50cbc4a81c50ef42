package lz4c

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/pierrec/lz4/v4"

	"github.com/obdproject/obd/internal/testenv"
)

// TestLZ4CMatchesGo checks that liblz4's batches give the Go compressor's bytes, block by block, so that the
// output of a conversion does not depend on whether the machine has liblz4.
func TestLZ4CMatchesGo(t *testing.T) {
	if !Available() {
		testenv.Skip(t, "liblz4.so.1 is not installed: the Go compressor is used")
	}
	rng := rand.New(rand.NewPCG(11, 12))
	var data []byte
	for len(data) < 3<<20 {
		switch rng.IntN(4) {
		case 0:
			data = append(data, make([]byte, rng.IntN(20000))...)
		case 1:
			b := make([]byte, rng.IntN(20000))
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
			data = append(data, b...)
		case 2:
			data = append(data, bytes.Repeat([]byte("/usr/lib/x86_64-linux-gnu/libc.so.6\x00"), rng.IntN(500))...)
		default:
			words := []string{"usr", "lib", "python3", "site-packages", "__init__", ".py", "\x00\x01", "ELF"}
			for range rng.IntN(3000) {
				data = append(data, words[rng.IntN(len(words))]...)
			}
		}
	}
	for _, bs := range []int{4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10} {
		for _, n := range []int{len(data), 1 << 20, bs, bs - 1, 1, 3*bs + 77} {
			raw := data[:n]
			for _, gap := range []int{0, 4} {
				blocks := (n + bs - 1) / bs
				dst := make([]byte, 0, blocks*(lz4.CompressBlockBound(bs)+4))
				lens := make([]int32, blocks)
				used, ok := Batch(raw, bs, dst, gap, lens)
				if !ok {
					t.Fatalf("block size %d, %d bytes: liblz4 failed", bs, n)
				}
				dst = dst[:used]
				var c lz4.CompressorCCompat
				buf := make([]byte, lz4.CompressBlockBound(bs))
				pos := 0
				for i := range blocks {
					m, _ := c.CompressBlock(raw[i*bs:min(n, (i+1)*bs)], buf)
					if int(lens[i]) != m || !bytes.Equal(dst[pos:pos+m], buf[:m]) {
						t.Fatalf("block size %d, %d bytes, block %d: liblz4 gave %d bytes, Go %d, or other bytes", bs, n, i, lens[i], m)
					}
					pos += m + gap
				}
				if pos != used {
					t.Fatalf("block size %d: batch used %d bytes, records take %d", bs, used, pos)
				}
			}
		}
	}
	if _, ok := Batch(data[:1<<20], 4096, make([]byte, 0, 1000), 0, make([]int32, 256)); ok {
		t.Fatal("a batch into too small a buffer succeeded")
	}
}
