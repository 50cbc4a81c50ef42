package gzindex

import (
	"bytes"
	"compress/flate"
	"io"
	"math/rand/v2"
	"testing"
)

// inflateAll inflates a whole raw deflate stream with the package's inflater.
func inflateAll(stream []byte, limit int) ([]byte, error) {
	in := newInflater(bytes.NewReader(stream), nil, 0, 0)
	return io.ReadAll(io.LimitReader(in, int64(limit)))
}

func deflate(t testing.TB, data []byte, level int) []byte {
	var b bytes.Buffer
	w, err := flate.NewWriter(&b, level)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	w.Close()
	return b.Bytes()
}

// TestInflate decodes streams of every block type Go's compressor writes (stored, fixed and dynamic Huffman).
func TestInflate(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	random := make([]byte, 300<<10)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	text := bytes.Repeat([]byte("the quick brown fox jumps over the lazy dog 0123456789\n"), 8000)
	mixed := append(append(append([]byte(nil), text[:100<<10]...), random[:70<<10]...), text...)
	for _, data := range [][]byte{nil, {1}, random, text, mixed, bytes.Repeat([]byte{0}, 1<<20)} {
		for _, level := range []int{flate.NoCompression, flate.BestSpeed, flate.DefaultCompression, flate.BestCompression, flate.HuffmanOnly} {
			got, err := inflateAll(deflate(t, data, level), len(data)+1)
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("level %d, %d bytes: got %d bytes, %v", level, len(data), len(got), err)
			}
		}
	}
	// A truncated stream is an error, never a short success.
	s := deflate(t, text, flate.DefaultCompression)
	if _, err := inflateAll(s[:len(s)/2], len(text)+1); err == nil {
		t.Fatal("a truncated stream inflated without an error")
	}
}

// FuzzInflate compares the inflater with compress/flate on arbitrary streams: whatever flate decodes, the inflater
// decodes to the same bytes; it never panics.
func FuzzInflate(f *testing.F) {
	f.Add(deflate(f, []byte("hello, hello, hello"), flate.DefaultCompression))
	f.Add(deflate(f, bytes.Repeat([]byte("ab"), 1000), flate.NoCompression))
	f.Add(deflate(f, bytes.Repeat([]byte("abc"), 1000), flate.HuffmanOnly))
	f.Fuzz(func(t *testing.T, stream []byte) {
		const limit = 1 << 20
		got, err := inflateAll(stream, limit)
		want, werr := io.ReadAll(io.LimitReader(flate.NewReader(bytes.NewReader(stream)), limit))
		if werr == nil && err == nil && !bytes.Equal(got, want) {
			t.Fatalf("inflated %d bytes, flate %d, and they differ", len(got), len(want))
		}
		if werr == nil && len(want) < limit && err != nil {
			t.Fatalf("flate decodes the stream (%d bytes), the inflater fails: %v", len(want), err)
		}
	})
}
