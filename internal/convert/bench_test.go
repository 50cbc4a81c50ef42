package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/obdproject/obd/internal/ext4"
)

// syntheticLayer builds a deterministic layer of about total bytes with a
// realistic mix: mostly small files, some medium and a few large ones.
func syntheticLayer(tb testing.TB, total int64) []byte {
	rng := rand.New(rand.NewPCG(1, 2))
	pool := make([]byte, 32<<20)
	for i := range pool {
		pool[i] = byte(rng.Uint32())
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	write := func(h *tar.Header, body []byte) {
		h.ModTime = tBase
		if err := tw.WriteHeader(h); err != nil {
			tb.Fatal(err)
		}
		if _, err := tw.Write(body); err != nil {
			tb.Fatal(err)
		}
	}
	var data int64
	for d := 0; data < total; d++ {
		dir := fmt.Sprintf("usr/share/d%03d/s%02d/", d/16, d%16)
		write(&tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755}, nil)
		for f := 0; f < 50 && data < total; f++ {
			var size int
			switch p := rng.IntN(1000); {
			case p < 700:
				size = rng.IntN(4 << 10)
			case p < 950:
				size = 4<<10 + rng.IntN(60<<10)
			case p < 998:
				size = 64<<10 + rng.IntN(960<<10)
			default:
				size = 1<<20 + rng.IntN(15<<20)
			}
			off := rng.IntN(len(pool) - size)
			write(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%sf%03d.bin", dir, f), Mode: 0o644, Size: int64(size)}, pool[off:off+size])
			data += int64(size)
		}
		write(&tar.Header{Typeflag: tar.TypeSymlink, Name: dir + "link", Linkname: "f000.bin"}, nil)
	}
	if err := tw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// BenchmarkApply measures Apply plus Close of a ~200 MB layer into a fresh
// 64 GiB filesystem on a sparse file; MB/s are of tar bytes.
func BenchmarkApply(b *testing.B) {
	layer := syntheticLayer(b, 200<<20)
	b.SetBytes(int64(len(layer)))
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		dev, _ := newImage(b, 64<<30)
		b.StartTimer()
		fsys, err := ext4.Open(dev, true)
		if err != nil {
			b.Fatal(err)
		}
		st, err := Apply(context.Background(), fsys, bytes.NewReader(layer), ApplyOptions{})
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(st.Files), "files/op")
		if err := fsys.Close(); err != nil {
			b.Fatal(err)
		}
	}
}
