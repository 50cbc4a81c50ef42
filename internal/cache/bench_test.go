package cache

import (
	"io"
	"log/slog"
	"math/rand/v2"
	"testing"
)

// benchCache returns a cache with the default block size and a fully cached 64 MiB blob.
func benchCache(b *testing.B, warm bool) (*Reader, *memSrc) {
	b.Helper()
	c, err := Open(Options{Dir: b.TempDir(), CapacityBytes: 1 << 30, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	src := newSrc(64<<20, 1)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	if warm {
		if _, err := r.ReadAt(make([]byte, len(src.data)), 0); err != nil {
			b.Fatal(err)
		}
	}
	return r, src
}

func BenchmarkHit4KRandom(b *testing.B) {
	r, src := benchCache(b, true)
	p := make([]byte, 4096)
	rng := rand.New(rand.NewPCG(1, 1))
	calls := src.calls.Load()
	b.SetBytes(int64(len(p)))
	b.ResetTimer()
	for range b.N {
		off := rng.Int64N(int64(len(src.data))/4096) * 4096
		if _, err := r.ReadAt(p, off); err != nil {
			b.Fatal(err)
		}
	}
	if src.calls.Load() != calls {
		b.Fatal("hits went to the source")
	}
}

func BenchmarkHit1MSequential(b *testing.B) {
	r, src := benchCache(b, true)
	p := make([]byte, 1<<20)
	b.SetBytes(int64(len(p)))
	b.ResetTimer()
	off := int64(0)
	for range b.N {
		if _, err := r.ReadAt(p, off); err != nil {
			b.Fatal(err)
		}
		off = (off + int64(len(p))) % int64(len(src.data))
	}
}

// BenchmarkMiss256K reads block after block from an in-memory source: fetch, store, serve.
func BenchmarkMiss256K(b *testing.B) {
	r, src := benchCache(b, false)
	p := make([]byte, defaultBlockSize)
	b.SetBytes(int64(len(p)))
	b.ResetTimer()
	off := int64(0)
	for range b.N {
		if off == 0 {
			b.StopTimer()
			if err := r.Evict(0, int64(len(src.data))); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		if _, err := r.ReadAt(p, off); err != nil {
			b.Fatal(err)
		}
		off = (off + int64(len(p))) % int64(len(src.data))
	}
}
