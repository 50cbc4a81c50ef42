package zfile

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"runtime"
	"sync"
	"testing"
)

// benchData is 32 MiB of realistic data: 1 MiB pieces of the test binary (machine code, tables,
// strings) alternating with 1 MiB of text-like data; LZ4 compresses it about 2x.
var benchData = sync.OnceValue(func() []byte {
	const size = 32 << 20
	exe := textData(1<<20, 99)
	if p, err := os.Executable(); err == nil {
		if b, err := os.ReadFile(p); err == nil && len(b) >= 1<<20 {
			exe = b
		}
	}
	out := make([]byte, 0, size)
	for i := 0; len(out) < size; i++ {
		if i%2 == 0 {
			start := (i / 2 << 20) % (len(exe) - 1<<20 + 1)
			out = append(out, exe[start:start+1<<20]...)
		} else {
			out = append(out, textData(1<<20, uint64(i))...)
		}
	}
	return out
})

func BenchmarkReadRandom4K(b *testing.B) {
	data := benchData()
	zf := compressBytes(b, data, Options{Workers: 2}, false)
	z := openBytes(b, zf, true)
	blocks := int64(len(data) / 4096)
	r := rand.New(rand.NewPCG(1, 2))
	offs := make([]int64, 4096)
	for i := range offs {
		offs[i] = r.Int64N(blocks) * 4096
	}
	p := make([]byte, 4096)
	b.SetBytes(4096)
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, err := z.ReadAt(p, offs[i&4095]); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(data))/float64(len(zf)), "ratio")
}

func BenchmarkReadRandom4KParallel(b *testing.B) {
	data := benchData()
	z := openBytes(b, compressBytes(b, data, Options{Workers: 2}, false), true)
	blocks := int64(len(data) / 4096)
	b.SetBytes(4096)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		r := rand.New(rand.NewPCG(rand.Uint64(), 2))
		p := make([]byte, 4096)
		for pb.Next() {
			if _, err := z.ReadAt(p, r.Int64N(blocks)*4096); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func BenchmarkReadSequential1M(b *testing.B) {
	data := benchData()
	z := openBytes(b, compressBytes(b, data, Options{Workers: 2}, false), true)
	p := make([]byte, 1<<20)
	b.SetBytes(int64(len(p)))
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, err := z.ReadAt(p, int64(i%32)<<20); err != nil {
			b.Fatal(err)
		}
	}
}

func benchCompress(b *testing.B, algo Algorithm) {
	data := benchData()
	for _, workers := range []int{1, 2} {
		b.Run(fmt.Sprintf("workers=%d", workers), func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				if _, err := Compress(io.Discard, bytes.NewReader(data), Options{Algorithm: algo, Workers: workers}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkCompressLZ4(b *testing.B)  { benchCompress(b, AlgoLZ4) }
func BenchmarkCompressZSTD(b *testing.B) { benchCompress(b, AlgoZSTD) }

// BenchmarkReadZSTD128K reads 128 KiB (a device's read-ahead) at 4 KiB-aligned offsets of a file of 64 KiB zstd
// blocks, so that each read spans two or three blocks, decoded one after another (decoders=1) or at once.
func BenchmarkReadZSTD128K(b *testing.B) {
	data := benchData()
	z := openBytes(b, compressBytes(b, data, Options{Algorithm: AlgoZSTD, BlockSize: 64 << 10, Workers: 2}, false), true)
	p := make([]byte, 128<<10)
	for _, workers := range []int{1, runtime.GOMAXPROCS(0)} {
		b.Run(fmt.Sprintf("decoders=%d", workers), func(b *testing.B) {
			defer func(w int) { decodeWorkers = w }(decodeWorkers)
			decodeWorkers = workers
			b.SetBytes(int64(len(p)))
			r := rand.New(rand.NewPCG(1, 2))
			for b.Loop() {
				off := r.Int64N(int64(len(data)-len(p))/4096) * 4096
				if _, err := z.ReadAt(p, off); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
