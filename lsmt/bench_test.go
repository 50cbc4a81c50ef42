package lsmt

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"math/rand"
	"testing"
)

// fixtures caches benchmark fixtures across -count repetitions (benchmarks run one at a time).
var fixtures = map[string]any{}

func cached[T any](key string, build func() T) T {
	if v, ok := fixtures[key]; ok {
		return v.(T)
	}
	v := build()
	fixtures[key] = v
	return v
}

type lookupFixture struct {
	x *segIndex
	q []uint64
}

func BenchmarkLookup(b *testing.B) {
	for _, n := range []int{1000, 100000, 1000000} {
		// Built outside b.Run, whose body runs several times: a steady-state index lives long.
		fx := cached(fmt.Sprint("lookup", n), func() lookupFixture {
			rng := rand.New(rand.NewSource(2))
			ms := randomIndex(rng, n)
			ents := makeIndexSlice[mapping](len(ms))
			copy(ents, ms)
			x := newSegIndex(ents)
			q := make([]uint64, 1<<16)
			for i := range q {
				q[i] = uint64(rng.Int63n(int64(x.maxEnd)))
			}
			return lookupFixture{x, q}
		})
		x, q := fx.x, fx.q
		b.Run(fmt.Sprintf("segments=%d", n), func(b *testing.B) {
			sum := 0
			for i := 0; i < b.N; i++ {
				// A lookup locates the segment and loads it.
				if j := x.find(q[i&(len(q)-1)]); j < len(x.ents) {
					sum += int(x.ents[j].moff())
				}
			}
			if sum < 0 {
				b.Fatal(sum)
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "lookups/s")
			b.ReportMetric(float64(x.memBytes())/float64(n), "bytes/segment")
		})
	}
}

// stackFixture builds n committed layers of random overlapping extents over a 64 MiB virtual
// disk, and a flat layer holding the same content.
func stackFixture(b *testing.B, n int) (*Stack, *File) {
	const vsize = 64 << 20
	rng := rand.New(rand.NewSource(3))
	var files []*File
	for i := 0; i < n; i++ {
		w, err := CreateRW(&memFile{}, &memFile{}, vsize, CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		for k := 0; k < 1000; k++ {
			l := (1 + rng.Intn(16)) * 4096
			off := rng.Intn((vsize-l)/SectorSize) * SectorSize
			if _, err := w.WriteAt(pattern(k, l), int64(off)); err != nil {
				b.Fatal(err)
			}
		}
		var buf bytes.Buffer
		if _, err := Commit(&buf, w, CommitOptions{}); err != nil {
			b.Fatal(err)
		}
		f, err := Open(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
		if err != nil {
			b.Fatal(err)
		}
		files = append(files, f)
	}
	s, err := NewStack(files, nil)
	if err != nil {
		b.Fatal(err)
	}
	// The flat layer: the same content written sequentially into one layer and committed.
	w, err := CreateRW(&memFile{}, &memFile{}, vsize, CreateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	for off := int64(0); off < vsize; off += int64(len(chunk)) {
		if _, err := s.ReadAt(chunk, off); err != nil {
			b.Fatal(err)
		}
		if _, err := w.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	var buf bytes.Buffer
	if _, err := Commit(&buf, w, CommitOptions{}); err != nil {
		b.Fatal(err)
	}
	flat, err := Open(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		b.Fatal(err)
	}
	return s, flat
}

type stackPair struct {
	s    *Stack
	flat *File
}

func BenchmarkStackSeqRead(b *testing.B) {
	fx := cached("stack64", func() stackPair {
		s, flat := stackFixture(b, 64)
		return stackPair{s, flat}
	})
	s, flat := fx.s, fx.flat
	for _, c := range []struct {
		name string
		r    io.ReaderAt
		segs int
	}{{"layers=64", s, s.Segments()}, {"flat", flat, len(flat.Index())}} {
		b.Run(c.name, func(b *testing.B) {
			buf := make([]byte, 1<<20)
			b.SetBytes(int64(len(buf)))
			for i := 0; i < b.N; i++ {
				off := int64(i%64) << 20
				if _, err := c.r.ReadAt(buf, off); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(c.segs), "segments")
		})
	}
}

func BenchmarkCommit(b *testing.B) {
	w := cached("commit", func() *RW {
		const vsize = 256 << 20
		rng := rand.New(rand.NewSource(4))
		w, err := CreateRW(&memFile{}, &memFile{}, vsize, CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		chunk := pattern(1, 64<<10)
		for k := 0; k < 2048; k++ { // about 64 MiB written at random
			off := rng.Intn((vsize-len(chunk))/4096) * 4096
			if _, err := w.WriteAt(chunk[:4096*(1+rng.Intn(16))], int64(off)); err != nil {
				b.Fatal(err)
			}
		}
		return w
	})
	var live int64
	for _, s := range w.Index() {
		live += int64(s.Length) * SectorSize
	}
	b.SetBytes(live)
	for i := 0; i < b.N; i++ {
		if _, err := Commit(io.Discard, w, CommitOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}

// sinkFile is a WriteAtFile that keeps only its size: it isolates the layer's own costs.
type sinkFile struct{ size int64 }

func (f *sinkFile) ReadAt(p []byte, off int64) (int, error) { clear(p); return len(p), nil }
func (f *sinkFile) WriteAt(p []byte, off int64) (int, error) {
	f.size = max(f.size, off+int64(len(p)))
	return len(p), nil
}
func (f *sinkFile) Truncate(n int64) error     { f.size = n; return nil }
func (f *sinkFile) Stat() (fs.FileInfo, error) { return memInfo(f.size), nil }

// BenchmarkRWWrite measures small random writes into an RW layer already holding about a million
// entries, as an ext4 writer issues them during conversion (the data and index files are sinks).
func BenchmarkRWWrite(b *testing.B) {
	const vsize = 64 << 30
	w, err := CreateRW(&sinkFile{}, &sinkFile{}, vsize, CreateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewSource(5))
	blk := make([]byte, 4096)
	for k := 0; k < 1<<20; k++ {
		w.WriteAt(blk, rng.Int63n(vsize/4096)*4096)
	}
	b.SetBytes(int64(len(blk)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := w.WriteAt(blk, rng.Int63n(vsize/4096)*4096); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "writes/s")
	b.ReportMetric(float64(w.Len()), "entries")
}
