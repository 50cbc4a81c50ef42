package lsmt

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"io"
	"os"
	"testing"

	"github.com/obdproject/obd/zfile"
)

const fixtureDir = "../testdata/upstream/"

// helloWorldLayer returns the decompressed LSMT of the upstream-converted hello-world layer.
func helloWorldLayer(t *testing.T) []byte {
	t.Helper()
	blob, err := os.ReadFile(fixtureDir + "hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d")
	if err != nil {
		t.Fatal("fixture (in the repository's testdata):", err)
	}
	return unzfile(t, blob[1536:1536+639491])
}

// ext4Layer returns the decompressed LSMT of upstream's ext4_64 base layer.
func ext4Layer(t *testing.T) []byte {
	t.Helper()
	f, err := os.Open(fixtureDir + "ext4_64.tar.gz")
	if err != nil {
		t.Fatal("fixture (in the repository's testdata):", err)
	}
	defer f.Close()
	gz, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(gz)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatal("ext4_64 not found in the archive:", err)
		}
		if h.Name == "ext4_64" {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			return unzfile(t, b)
		}
	}
}

func unzfile(t *testing.T, b []byte) []byte {
	t.Helper()
	z, err := zfile.Open(bytes.NewReader(b), int64(len(b)), true)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if _, err := zfile.Decompress(&out, z); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

type layerFacts struct {
	size, vsize            int64
	uuid, parent           string
	raw, valid, zeroed     int
	maxLen                 uint32
	dataSectors            int64
	indexEndIsTrailerStart bool
}

func checkFacts(t *testing.T, b []byte, want layerFacts) *File {
	t.Helper()
	if int64(len(b)) != want.size {
		t.Fatalf("size %d, want %d", len(b), want.size)
	}
	if k, err := Kind(bytes.NewReader(b), want.size); err != nil || k != KindCommitted {
		t.Fatalf("kind %q, %v", k, err)
	}
	f := openBytes(t, b)
	tr := f.Trailer()
	got := layerFacts{
		size: f.Size(), vsize: f.VirtualSize(), uuid: tr.UUID, parent: tr.ParentUUID,
		raw: f.RawIndexEntries(), valid: len(f.Index()), dataSectors: f.DataSectors(),
		indexEndIsTrailerStart: int64(tr.IndexOffset+tr.IndexSize*EntrySize) == want.size-HeaderSize,
	}
	for _, s := range f.Index() {
		got.maxLen = max(got.maxLen, s.Length)
		if s.Zeroed {
			got.zeroed++
		}
	}
	if want.zeroed < 0 {
		want.zeroed = got.zeroed
	}
	if want.dataSectors < 0 {
		want.dataSectors = got.dataSectors
	}
	if got != want {
		t.Fatalf("facts\n got %+v\nwant %+v", got, want)
	}
	if h := f.Header(); h.UUID != tr.UUID || h.Flags != 7 || tr.Flags&7 != 6 {
		t.Fatalf("header %+v trailer %+v", h, tr)
	}
	// The virtual disk holds an ext4 filesystem: superblock magic 0xEF53 at byte 1080.
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, 1024); err != nil {
		t.Fatal(err)
	}
	if binary.LittleEndian.Uint16(sb[56:]) != 0xEF53 {
		t.Fatal("no ext4 superblock")
	}
	return f
}

func TestFixtureHelloWorld(t *testing.T) {
	b := helloWorldLayer(t)
	f := checkFacts(t, b, layerFacts{
		size: 71528448, vsize: 64 << 30, uuid: "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31", parent: NullUUID,
		raw: 768, valid: 515, zeroed: -1, maxLen: 8448, dataSectors: -1, indexEndIsTrailerStart: true,
	})
	// Compacting upstream's committed layer again reproduces it byte for byte.
	h := f.Header()
	out := commitBytes(t, f, CommitOptions{UUID: h.UUID, ParentUUID: h.ParentUUID, UserTag: h.UserTag})
	if i := firstDiff(out, b); i >= 0 || len(out) != len(b) {
		t.Fatalf("re-commit differs from upstream at byte %d (sizes %d, %d)", i, len(out), len(b))
	}
}

func TestFixtureExt4(t *testing.T) {
	b := ext4Layer(t)
	f := checkFacts(t, b, layerFacts{
		size: 541937664, vsize: 64 << 30, uuid: "C02FB491-B4D4-4904-8684-A014D032AF78", parent: NullUUID,
		raw: 8448, valid: 8323, zeroed: 8209, maxLen: 16383, dataSectors: 1058192, indexEndIsTrailerStart: true,
	})
	// A writable layer on top of ext4_64: writes and discards show through, the rest is ext4_64.
	upper, err := CreateRW(&memFile{}, &memFile{}, 0, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewStack([]*File{f}, upper)
	if err != nil {
		t.Fatal(err)
	}
	orig := make([]byte, 1<<20)
	f.ReadAt(orig, 0)
	p := pattern(7, 4096)
	if _, err := s.WriteAt(p, 8192); err != nil {
		t.Fatal(err)
	}
	if err := s.Discard(0, 1024); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	if _, err := s.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(orig)
	clear(want[:1024])
	copy(want[8192:], p)
	if !bytes.Equal(got, want) {
		t.Fatalf("stacked read differs at %d", firstDiff(got, want))
	}
}
