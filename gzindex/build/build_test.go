package build

import (
	"bytes"
	"compress/gzip"
	"compress/zlib"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"os/exec"
	"strings"
	"testing"

	"github.com/obdproject/obd/gzindex"
)

// sample returns n bytes that compress somewhat, like a tar of files.
func sample(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 7))
	words := []string{"usr/lib/python3/", "\x00\x00\x00\x00\x00\x00", "ELF", "import os\n", "def main():\n"}
	var b bytes.Buffer
	for b.Len() < n {
		if rng.IntN(4) == 0 {
			for range 1 + rng.IntN(64) {
				b.WriteByte(byte(rng.Uint32()))
			}
		} else {
			b.WriteString(words[rng.IntN(len(words))])
		}
	}
	return b.Bytes()[:n]
}

func gz(t testing.TB, data []byte, level int) []byte {
	var b bytes.Buffer
	w, err := gzip.NewWriterLevel(&b, level)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	w.Close()
	return b.Bytes()
}

// build indexes blob and checks that the builder returned the uncompressed stream data.
func build(t testing.TB, blob, data []byte, span int) []byte {
	t.Helper()
	b, err := New(bytes.NewReader(blob), span)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	got, err := io.ReadAll(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("builder returned %d bytes, not the %d of the stream", len(got), len(data))
	}
	idx, err := b.Index()
	if err != nil {
		t.Fatal(err)
	}
	return idx
}

func TestRoundTrip(t *testing.T) {
	data := sample(1, 9<<20+12345)
	for _, tc := range []struct {
		name string
		blob []byte
	}{
		{"go-default", gz(t, data, gzip.DefaultCompression)},
		{"go-best-speed", gz(t, data, gzip.BestSpeed)},
		{"go-stored", gz(t, data, gzip.NoCompression)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkIndex(t, tc.blob, data, gzindex.MinSpan*4)
		})
	}
}

// TestGzipTool indexes the output of gzip(1), whose zlib places block boundaries inside bytes.
func TestGzipTool(t *testing.T) {
	path, err := exec.LookPath("gzip")
	if err != nil {
		t.Skip("no gzip command")
	}
	data := sample(2, 5<<20)
	cmd := exec.Command(path, "-c", "-6")
	cmd.Stdin = bytes.NewReader(data)
	blob, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	ix := checkIndex(t, blob, data, gzindex.DefaultSpan)
	withBits := 0
	for _, e := range ix.Entries {
		if e.Bits != 0 {
			withBits++
		}
	}
	if withBits == 0 {
		t.Fatalf("no checkpoint inside a byte among %d: the bit-shifted path is untested", len(ix.Entries))
	}
}

func checkIndex(t *testing.T, blob, data []byte, span int) *gzindex.Index {
	t.Helper()
	file := build(t, blob, data, span)
	ix, err := gzindex.Open(bytes.NewReader(file), int64(len(file)), int64(len(blob)))
	if err != nil {
		t.Fatal(err)
	}
	if ix.UncompressedSize != int64(len(data)) || ix.GzipFileSize != int64(len(blob)) || ix.Span != int32(span) {
		t.Fatalf("header %+v", ix.Header)
	}
	// A checkpoint at the last block boundary at or before each multiple of the span: never past it, and the
	// gap between checkpoints no wider than a span plus a deflate block.
	for i, e := range ix.Entries {
		if i > 0 && e.Out-ix.Entries[i-1].Out > int64(span)+256<<10 {
			t.Errorf("checkpoints %d and %d are %d bytes apart", i-1, i, e.Out-ix.Entries[i-1].Out)
		}
	}
	if n := int64(len(data))/int64(span) + 1; int64(len(ix.Entries)) > n {
		t.Errorf("%d checkpoints for %d spans", len(ix.Entries), n)
	}
	r := gzindex.NewReader(ix, bytes.NewReader(blob))
	rng := rand.New(rand.NewPCG(3, 3))
	for range 200 {
		off := rng.Int64N(int64(len(data)))
		p := make([]byte, 1+rng.IntN(300<<10))
		n, err := r.ReadAt(p, off)
		end := min(off+int64(len(p)), int64(len(data)))
		if n != int(end-off) || (end < off+int64(len(p))) != (err == io.EOF) || (err != nil && err != io.EOF) {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", len(p), off, n, err)
		}
		if !bytes.Equal(p[:n], data[off:end]) {
			t.Fatalf("ReadAt(%d bytes at %d): wrong data", len(p), off)
		}
	}
	// A read fetches only the compressed range CompressedRange names.
	for range 50 {
		off := rng.Int64N(int64(len(data)))
		n := 1 + rng.Int64N(200<<10)
		start, length := ix.CompressedRange(off, n)
		only := make([]byte, len(blob))
		copy(only[start:start+length], blob[start:start+length])
		p := make([]byte, n)
		k, err := gzindex.NewReader(ix, bytes.NewReader(only)).ReadAt(p, off)
		if (err != nil && err != io.EOF) || !bytes.Equal(p[:k], data[off:off+int64(k)]) {
			t.Fatalf("read of %d bytes at %d from compressed range %d+%d alone: %v", n, off, start, length, err)
		}
	}
	// Sequential reads, which go through the spans one after another.
	var seq bytes.Buffer
	for off := int64(0); off < int64(len(data)); off += 100 << 10 {
		p := make([]byte, 100<<10)
		n, err := r.ReadAt(p, off)
		if err != nil && err != io.EOF {
			t.Fatal(err)
		}
		seq.Write(p[:n])
	}
	if !bytes.Equal(seq.Bytes(), data) {
		t.Fatal("sequential reads differ from the stream")
	}
	return ix
}

// cHeader is upstream's packed IndexFileHeader, field by field: encoding/binary lays structs out without padding,
// so this checks the offsets the marshaller hard-codes.
type cHeader struct {
	Magic                        [8]byte
	Major, Minor, Algo           uint8
	Level                        int8
	Flag                         uint8
	Span, Window, IndexSize      int32
	IndexNum, GzipSize, FileSize int64
	Uncompressed                 int64
	Reserved                     [256]byte
	IndexStart, IndexAreaLen     int64
	CRC                          uint32
}

type cEntry struct {
	DePos, EnPos, WinPos int64
	Bits                 uint8
	WinLen               uint32
}

func TestLayout(t *testing.T) {
	data := sample(4, 3<<20)
	blob := gz(t, data, 6)
	file := build(t, blob, data, gzindex.DefaultSpan)
	if binary.Size(cHeader{}) != gzindex.HeaderSize || binary.Size(cEntry{}) != gzindex.EntrySize {
		t.Fatalf("packed sizes %d, %d", binary.Size(cHeader{}), binary.Size(cEntry{}))
	}
	var h cHeader
	if err := binary.Read(bytes.NewReader(file), binary.LittleEndian, &h); err != nil {
		t.Fatal(err)
	}
	if string(h.Magic[:]) != "ddgzidx\x00" || h.Major != 1 || h.Minor != 0 || h.Algo != 1 || h.Level != 6 || h.Flag != 0 ||
		h.Span != gzindex.DefaultSpan || h.Window != 32768 || h.IndexSize != 29 || h.GzipSize != int64(len(blob)) ||
		h.FileSize != int64(len(file)) || h.Uncompressed != int64(len(data)) || h.IndexStart+h.IndexAreaLen != int64(len(file)) {
		t.Fatalf("header %+v", h)
	}
	if h.Reserved != [256]byte{} {
		t.Fatal("reserved bytes are not zero")
	}
	if crc32c(file[:gzindex.HeaderSize-4]) != h.CRC {
		t.Fatal("header CRC")
	}
	raw, err := inflateZlib(file[h.IndexStart:], h.IndexNum*gzindex.EntrySize)
	if err != nil {
		t.Fatal(err)
	}
	ents := make([]cEntry, h.IndexNum)
	if err := binary.Read(bytes.NewReader(raw), binary.LittleEndian, ents); err != nil {
		t.Fatal(err)
	}
	pos := int64(gzindex.HeaderSize)
	for i, e := range ents {
		if e.WinPos != pos {
			t.Fatalf("window %d at %d, want %d (windows follow one another from the header on)", i, e.WinPos, pos)
		}
		pos += int64(e.WinLen)
		w, err := inflateZlib(file[e.WinPos:e.WinPos+int64(e.WinLen)], gzindex.WindowSize)
		if err != nil || len(w) != gzindex.WindowSize {
			t.Fatalf("window %d: %d bytes, %v", i, len(w), err)
		}
		// The window is the 32 KiB before the checkpoint (zeros before the stream's start).
		lo := max(e.DePos-gzindex.WindowSize, 0)
		if !bytes.Equal(w[gzindex.WindowSize-(e.DePos-lo):], data[lo:e.DePos]) {
			t.Fatalf("window %d is not the output before offset %d", i, e.DePos)
		}
	}
	if pos != h.IndexStart {
		t.Fatalf("windows end at %d, entries start at %d", pos, h.IndexStart)
	}
	if ents[0].DePos != 0 || ents[0].EnPos != 10 {
		t.Fatalf("first checkpoint %+v, want the start of the deflate stream after the 10-byte header", ents[0])
	}
}

func TestBadStreams(t *testing.T) {
	data := sample(5, 1<<20)
	blob := gz(t, data, 6)
	for _, tc := range []struct {
		name, want string
		blob       []byte
	}{
		{"truncated", "unexpected EOF", blob[:len(blob)/2]},
		{"two-members", "after the end of the first member", append(append([]byte(nil), blob...), gz(t, []byte("x"), 6)...)},
		{"corrupt", "gzip", func() []byte {
			b := append([]byte(nil), blob...)
			for i := 100; i < 200; i++ {
				b[i] ^= 0x5a
			}
			return b
		}()},
		{"not-gzip", "gzip", []byte("this is not gzip at all, not at all")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := New(bytes.NewReader(tc.blob), 0)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			_, err = io.ReadAll(b)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one containing %q", err, tc.want)
			}
			if _, err := b.Index(); err == nil {
				t.Fatal("Index after a failed stream")
			}
		})
	}
}

func TestBadIndex(t *testing.T) {
	data := sample(6, 3<<20)
	blob := gz(t, data, 6)
	file := build(t, blob, data, gzindex.DefaultSpan)
	if _, err := gzindex.Open(bytes.NewReader(file), int64(len(file)), int64(len(blob))+1); err == nil {
		t.Fatal("an index of another blob size opened")
	}
	for _, off := range []int{0, 9, 30, 200, gzindex.HeaderSize - 1, gzindex.HeaderSize + 10, len(file) - 3} {
		b := append([]byte(nil), file...)
		b[off] ^= 0x40
		ix, err := gzindex.Open(bytes.NewReader(b), int64(len(b)), int64(len(blob)))
		if err != nil {
			continue
		}
		// A window damaged past the header parses; reading through it fails or detects it.
		r := gzindex.NewReader(ix, bytes.NewReader(blob))
		p := make([]byte, len(data))
		n, err := r.ReadAt(p, 0)
		if err == nil && !bytes.Equal(p[:n], data) && off < gzindex.HeaderSize {
			t.Fatalf("flip at %d: wrong data read without an error", off)
		}
	}
	if _, err := gzindex.Open(bytes.NewReader(file[:gzindex.HeaderSize-1]), gzindex.HeaderSize-1, int64(len(blob))); err == nil {
		t.Fatal("a truncated index opened")
	}
}

func TestReaderShortBlob(t *testing.T) {
	data := sample(7, 2<<20)
	blob := gz(t, data, 6)
	file := build(t, blob, data, gzindex.MinSpan)
	ix, err := gzindex.Open(bytes.NewReader(file), int64(len(file)), int64(len(blob)))
	if err != nil {
		t.Fatal(err)
	}
	// The blob behind the index lost its tail: reads past it fail, they never return made-up data.
	r := gzindex.NewReader(ix, bytes.NewReader(blob[:len(blob)/2]))
	p := make([]byte, 64<<10)
	if _, err := r.ReadAt(p, int64(len(data))-int64(len(p))); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("err = %v", err)
	}
}

func FuzzOpen(f *testing.F) {
	data := sample(8, 400<<10)
	blob := gz(f, data, 6)
	file := build(f, blob, data, gzindex.MinSpan)
	f.Add(file)
	f.Add(file[:gzindex.HeaderSize])
	f.Fuzz(func(t *testing.T, b []byte) {
		ix, err := gzindex.Open(bytes.NewReader(b), int64(len(b)), int64(len(blob)))
		if err != nil {
			return
		}
		r := gzindex.NewReader(ix, bytes.NewReader(blob))
		p := make([]byte, 4096)
		for _, e := range ix.Entries[:min(len(ix.Entries), 8)] {
			r.ReadAt(p, e.Out)
		}
	})
}

// BenchmarkBuild measures indexing while decompressing, against decompressing alone with Go's gzip.
func BenchmarkBuild(b *testing.B) {
	data := sample(9, 32<<20)
	blob := gz(b, data, 6)
	b.Run("index", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			bd, err := New(bytes.NewReader(blob), 0)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, bd); err != nil {
				b.Fatal(err)
			}
			if _, err := bd.Index(); err != nil {
				b.Fatal(err)
			}
			bd.Close()
		}
	})
	b.Run("gunzip", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			zr, err := gzip.NewReader(bytes.NewReader(blob))
			if err != nil {
				b.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, zr); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkReadAt4K measures random 4 KiB reads through the index, each from its checkpoint.
func BenchmarkReadAt4K(b *testing.B) {
	data := sample(10, 16<<20)
	blob := gz(b, data, 6)
	file := build(b, blob, data, gzindex.DefaultSpan)
	ix, err := gzindex.Open(bytes.NewReader(file), int64(len(file)), int64(len(blob)))
	if err != nil {
		b.Fatal(err)
	}
	r := gzindex.NewReader(ix, bytes.NewReader(blob))
	rng := rand.New(rand.NewPCG(1, 1))
	p := make([]byte, 4096)
	b.SetBytes(4096)
	for b.Loop() {
		if _, err := r.ReadAt(p, rng.Int64N(int64(len(data)-4096))); err != nil {
			b.Fatal(err)
		}
	}
}

// TestStoredBlocks indexes gzip(1) output of data that alternates between compressible and random stretches: zlib
// stores the random ones, and a stored block after a checkpoint that starts inside a byte must be read with the
// blob's byte alignment, not the checkpoint's.
func TestStoredBlocks(t *testing.T) {
	path, err := exec.LookPath("gzip")
	if err != nil {
		t.Skip("no gzip command")
	}
	rng := rand.New(rand.NewPCG(11, 11))
	var data []byte
	for i := 0; len(data) < 12<<20; i++ {
		chunk := make([]byte, 16<<10+rng.IntN(200<<10))
		if i%2 == 0 {
			for j := range chunk {
				chunk[j] = byte(rng.Uint32())
			}
		} else {
			copy(chunk, sample(uint64(i), len(chunk)))
		}
		data = append(data, chunk...)
	}
	cmd := exec.Command(path, "-c", "-6")
	cmd.Stdin = bytes.NewReader(data)
	blob, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	ix := checkIndex(t, blob, data, gzindex.MinSpan)
	r := gzindex.NewReader(ix, bytes.NewReader(blob))
	for i, e := range ix.Entries {
		p := make([]byte, 256<<10)
		n, err := r.ReadAt(p, e.Out)
		if (err != nil && err != io.EOF) || !bytes.Equal(p[:n], data[e.Out:e.Out+int64(n)]) {
			t.Fatalf("checkpoint %d (%+v): %v", i, e, err)
		}
	}
}

func crc32c(p []byte) uint32 {
	return ^crc32.Update(^uint32(0), crc32.MakeTable(crc32.Castagnoli), p)
}

func inflateZlib(b []byte, limit int64) ([]byte, error) {
	zr, err := zlib.NewReader(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	out, err := io.ReadAll(io.LimitReader(zr, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(out)) > limit {
		return nil, errors.New("zlib stream too long")
	}
	return out, nil
}
