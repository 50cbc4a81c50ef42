package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/testenv"

	"github.com/obdproject/obd/internal/ext4"
)

// fileDev is an ext4.Device backed by a sparse file.
type fileDev struct {
	*os.File
	size int64
}

func (d *fileDev) Size() int64 { return d.size }

var mkfsOpts = ext4.MkfsOptions{UUID: "5f1d2c3b-4a59-4687-9a1b-2c3d4e5f6071", Timestamp: 1700000000}

// newImage makes a fresh filesystem of the given size in a sparse file.
func newImage(t testing.TB, size int64) (*fileDev, string) {
	t.Helper()
	testenv.Tools(t, "mke2fs")
	p := filepath.Join(t.TempDir(), "fs.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	dev := &fileDev{File: f, size: size}
	if err := ext4.Mkfs(context.Background(), dev, mkfsOpts); err != nil {
		t.Fatal(err)
	}
	return dev, p
}

// applyLayer opens the filesystem, applies one tar and closes it.
func applyLayer(t testing.TB, dev ext4.Device, layer []byte) (ApplyStats, error) {
	t.Helper()
	fsys, err := ext4.Open(dev, true)
	if err != nil {
		t.Fatal(err)
	}
	st, err := Apply(context.Background(), fsys, bytes.NewReader(layer), ApplyOptions{})
	if cerr := fsys.Close(); cerr != nil {
		t.Fatalf("close: %v", cerr)
	}
	return st, err
}

// ent is one tar entry to build.
type ent struct {
	hdr  tar.Header
	body []byte
}

var tBase = time.Date(2022, 1, 2, 3, 4, 5, 0, time.UTC)

func dirE(name string, mode int64) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, ModTime: tBase}}
}

func fileE(name string, mode int64, body string) ent {
	return ent{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(body)), ModTime: tBase}, body: []byte(body)}
}

func linkE(typ byte, name, target string) ent {
	return ent{hdr: tar.Header{Typeflag: typ, Name: name, Linkname: target, Mode: 0o777, ModTime: tBase}}
}

// buildTar writes entries as a tar, in PAX format unless an entry asks
// for another.
func buildTar(t testing.TB, ents ...ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := e.hdr
		if h.Format == tar.FormatUnknown {
			h.Format = tar.FormatPAX
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("%s: %v", h.Name, err)
		}
		if _, err := tw.Write(e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// rawHeader encodes a ustar header block by hand (archive/tar cannot write
// sparse entries).
func rawHeader(name string, typ byte, size int64) []byte {
	b := make([]byte, 512)
	copy(b[0:100], name)
	copy(b[100:108], "0000644\x00")
	copy(b[108:116], "0000000\x00")
	copy(b[116:124], "0000000\x00")
	copy(b[124:136], fmt.Sprintf("%011o\x00", size))
	copy(b[136:148], fmt.Sprintf("%011o\x00", tBase.Unix()))
	b[156] = typ
	copy(b[257:265], "ustar\x0000")
	copy(b[148:156], "        ")
	sum := 0
	for _, c := range b {
		sum += int(c)
	}
	copy(b[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return b
}

func pad512(b []byte) []byte {
	return append(b, make([]byte, (512-len(b)%512)%512)...)
}

func paxRecord(k, v string) string {
	r := " " + k + "=" + v + "\n"
	n := len(r) + 1
	for len(fmt.Sprint(n))+len(r) != n {
		n = len(fmt.Sprint(n)) + len(r)
	}
	return fmt.Sprint(n) + r
}

// sparseChunk is data at an offset of a sparse file.
type sparseChunk struct {
	off  int64
	data []byte
}

// sparseEntry encodes a PAX 1.0 sparse file (GNU.sparse.major=1) of the
// given logical size.
func sparseEntry(name string, size int64, chunks []sparseChunk) []byte {
	sparseMap := fmt.Sprintf("%d\n", len(chunks))
	var data []byte
	for _, c := range chunks {
		sparseMap += fmt.Sprintf("%d\n%d\n", c.off, len(c.data))
		data = append(data, c.data...)
	}
	body := append(pad512([]byte(sparseMap)), data...)
	recs := paxRecord("GNU.sparse.major", "1") + paxRecord("GNU.sparse.minor", "0") +
		paxRecord("GNU.sparse.name", name) + paxRecord("GNU.sparse.realsize", fmt.Sprint(size))
	var out []byte
	out = append(out, rawHeader("PaxHeaders/"+name, 'x', int64(len(recs)))...)
	out = append(out, pad512([]byte(recs))...)
	out = append(out, rawHeader("GNUSparseFile.0/"+name, '0', int64(len(body)))...)
	out = append(out, pad512(body)...)
	return out
}

// endTar is the end-of-archive marker.
var endTar = make([]byte, 1024)

func contains(t testing.TB, what, out string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(out, w) {
			t.Errorf("%s lacks %q:\n%s", what, w, out)
		}
	}
}
