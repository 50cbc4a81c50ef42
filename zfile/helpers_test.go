package zfile

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// Fixture locations, relative to the package directory: the repository's copy first, then the
// shared one of the workspace.
var fixtureDirs = []string{"../testdata/upstream"}

const (
	helloBlob   = "hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
	helloOffset = 1536
	helloSize   = 639491
)

func fixturePath(t testing.TB, name string) string {
	t.Helper()
	for _, d := range fixtureDirs {
		p := filepath.Join(d, name)
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	t.Fatalf("fixture %s not found in %v", name, fixtureDirs)
	return ""
}

var ext4Once = sync.OnceValues(func() ([]byte, error) {
	var path string
	for _, d := range fixtureDirs {
		if p := filepath.Join(d, "ext4_64.tar.gz"); fileExists(p) {
			path = p
			break
		}
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		return nil, err
	}
	tr := tar.NewReader(gz)
	if _, err := tr.Next(); err != nil {
		return nil, err
	}
	return io.ReadAll(tr)
})

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// ext4Fixture returns the bytes of the ext4_64 ZFile.
func ext4Fixture(t testing.TB) []byte {
	t.Helper()
	b, err := ext4Once()
	if err != nil {
		t.Fatalf("ext4_64 fixture: %v", err)
	}
	return b
}

// helloFixture returns the hello-world layer's ZFile as a section of the tar-wrapped blob.
func helloFixture(t testing.TB) *io.SectionReader {
	t.Helper()
	f, err := os.Open(fixturePath(t, helloBlob))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return io.NewSectionReader(f, helloOffset, helloSize)
}

// memFile is an in-memory io.WriterAt.
type memFile struct{ b []byte }

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if end := int(off) + len(p); end > len(m.b) {
		m.b = append(m.b, make([]byte, end-len(m.b))...)
	}
	copy(m.b[off:], p)
	return len(p), nil
}

// compressBytes returns the ZFile of src written by Compress, or by CompressOverwrite if overwrite.
func compressBytes(t testing.TB, src []byte, opts Options, overwrite bool) []byte {
	t.Helper()
	if overwrite {
		m := &memFile{}
		n, err := CompressOverwrite(m, bytes.NewReader(src), opts)
		if err != nil {
			t.Fatalf("CompressOverwrite: %v", err)
		}
		if n != int64(len(m.b)) {
			t.Fatalf("CompressOverwrite returned %d, wrote %d bytes", n, len(m.b))
		}
		return m.b
	}
	var buf bytes.Buffer
	n, err := Compress(&buf, bytes.NewReader(src), opts)
	if err != nil {
		t.Fatalf("Compress: %v", err)
	}
	if n != int64(buf.Len()) {
		t.Fatalf("Compress returned %d, wrote %d bytes", n, buf.Len())
	}
	return buf.Bytes()
}

func openBytes(t testing.TB, zf []byte, verify bool) *Reader {
	t.Helper()
	z, err := Open(bytes.NewReader(zf), int64(len(zf)), verify)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return z
}

// Test data generators.

func randomData(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(r.Uint32())
	}
	return b
}

var words = []string{"overlaybd", "layer", "block", "the", "of", "zfile", "index", "compress", "container",
	"image", "snapshot", "\n", "registry", "lazy", "data", "read", "0x1f", "{", "}", "func", "return"}

// textData returns text-like (well compressible) data.
func textData(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 2))
	b := make([]byte, 0, n+16)
	for len(b) < n {
		b = append(b, words[r.IntN(len(words))]...)
		b = append(b, ' ')
	}
	return b[:n]
}

// mixedData interleaves runs of text, zeros and random bytes of random lengths.
func mixedData(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 3))
	b := make([]byte, 0, n)
	for len(b) < n {
		l := min(1+r.IntN(20000), n-len(b))
		switch r.IntN(3) {
		case 0:
			b = append(b, textData(l, r.Uint64())...)
		case 1:
			b = append(b, make([]byte, l)...)
		default:
			b = append(b, randomData(l, r.Uint64())...)
		}
	}
	return b
}
