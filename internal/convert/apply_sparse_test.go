package convert

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/ext4"
)

// withChecksum writes the checksum of header block b.
func withChecksum(b []byte) []byte {
	copy(b[148:156], "        ")
	sum := 0
	for _, c := range b {
		sum += int(c)
	}
	copy(b[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return b
}

// numeric writes a 12-byte numeric header field: octal, or base-256 when too
// large for 11 octal digits.
func numeric(b []byte, v int64) {
	if v < 1<<33 {
		copy(b[:12], fmt.Sprintf("%011o\x00", v))
		return
	}
	b[0] = 0x80
	for i := 11; i > 0; i-- {
		b[i], v = byte(v), v>>8
	}
}

// oldGNUSparseEntry encodes a sparse file in the old GNU format (type 'S'):
// four map entries in the header block, 21 in each extension block.
func oldGNUSparseEntry(name string, size int64, chunks []sparseChunk) []byte {
	var data []byte
	for _, c := range chunks {
		data = append(data, c.data...)
	}
	h := rawHeader(name, 'S', int64(len(data)))
	copy(h[257:265], "ustar  \x00")
	numeric(h[483:], size)
	entry := func(b []byte, c sparseChunk) {
		numeric(b[0:], c.off)
		numeric(b[12:], int64(len(c.data)))
	}
	var ext [][]byte
	for i, c := range chunks {
		if i < 4 {
			entry(h[386+24*i:], c)
			continue
		}
		if (i-4)%21 == 0 {
			ext = append(ext, make([]byte, 512))
		}
		entry(ext[len(ext)-1][24*((i-4)%21):], c)
	}
	if len(ext) > 0 {
		h[482] = 1
	}
	out := withChecksum(h)
	for i, b := range ext {
		if i < len(ext)-1 {
			b[504] = 1
		}
		out = append(out, b...)
	}
	return append(out, pad512(data)...)
}

// pax01SparseEntry encodes a sparse file in GNU's PAX 0.1 format: the map
// is a PAX record.
func pax01SparseEntry(name string, size int64, chunks []sparseChunk) []byte {
	var data []byte
	var m []string
	for _, c := range chunks {
		data = append(data, c.data...)
		m = append(m, fmt.Sprint(c.off), fmt.Sprint(len(c.data)))
	}
	recs := paxRecord("GNU.sparse.major", "0") + paxRecord("GNU.sparse.minor", "1") +
		paxRecord("GNU.sparse.name", name) + paxRecord("GNU.sparse.size", fmt.Sprint(size)) +
		paxRecord("GNU.sparse.numblocks", fmt.Sprint(len(chunks))) + paxRecord("GNU.sparse.map", strings.Join(m, ","))
	out := rawHeader("PaxHeaders/"+name, 'x', int64(len(recs)))
	out = append(out, pad512([]byte(recs))...)
	out = append(out, rawHeader("GNUSparseFile.1/"+name, '0', int64(len(data)))...)
	return append(out, pad512(data)...)
}

// TestApplyHugeSparse: the holes of sparse entries cost nothing, whatever
// their size and the format of the entry.
func TestApplyHugeSparse(t *testing.T) {
	const size = 8 << 40
	var chunks []sparseChunk
	for i := range 30 { // more than the old GNU header and one extension block hold
		chunks = append(chunks, sparseChunk{int64(i) << 38, []byte(fmt.Sprintf("chunk %d", i))})
	}
	chunks = append(chunks, sparseChunk{size - 5, []byte("end!!")})
	for format, entry := range map[string]func(string, int64, []sparseChunk) []byte{
		"PAX 1.0": sparseEntry, "PAX 0.1": pax01SparseEntry, "old GNU": oldGNUSparseEntry,
	} {
		t.Run(format, func(t *testing.T) {
			layer := append(entry("huge", size, chunks), buildTar(t, fileE("after", 0o644, "after"))...)
			r := applyAll(t, layer)
			st, err := r.Lstat("/huge")
			if err != nil {
				t.Fatal(err)
			}
			if st.Size != size {
				t.Errorf("size %d", st.Size)
			}
			fl, err := r.OpenFile("/huge")
			if err != nil {
				t.Fatal(err)
			}
			defer fl.Close()
			for _, c := range chunks {
				// With the byte before, a hole (but at 0).
				off, want := c.off-1, append([]byte{0}, c.data...)
				if c.off == 0 {
					off, want = 0, c.data
				}
				got := make([]byte, len(want))
				if _, err := fl.ReadAt(got, off); err != nil && err != io.EOF {
					t.Fatalf("read at %d: %v", off, err)
				}
				if !bytes.Equal(got, want) {
					t.Errorf("at %d: %q, want %q", off, got, want)
				}
			}
			if fl, err := r.OpenFile("/after"); err != nil || fl.Size() != 5 {
				t.Errorf("the entry after the sparse one: %v", err)
			}
		})
	}
}

func TestApplySparseErrors(t *testing.T) {
	dev, _ := newImage(t, 64<<20)
	tooBig := sparseEntry("s", 17<<40, []sparseChunk{{0, []byte("x")}})
	short := pax01SparseEntry("s", 1<<20, []sparseChunk{{0, []byte("abc")}})
	// The map claims 3 bytes, the archive stores 512.
	copy(short[1024+124:1024+136], fmt.Sprintf("%011o\x00", 512))
	short = append(short[:1024], withChecksum(short[1024:1536])...)
	for _, c := range []struct {
		layer []byte
		is    error
		want  string
	}{
		{append(tooBig, endTar...), syscall.EFBIG, "ext4 with 4096-byte blocks holds files of at most"},
		{append(short, endTar...), nil, "GNU sparse file (0.1): its map holds 3 bytes of data, the archive 512"},
	} {
		_, err := applyLayer(t, dev, c.layer)
		if err == nil || c.is != nil && !errors.Is(err, c.is) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("got %v, want %q", err, c.want)
		}
	}
}

// cancelAt cancels a context once more than n bytes were read from r.
type cancelAt struct {
	r      io.Reader
	n      int64
	cancel context.CancelFunc
}

func (c *cancelAt) Read(p []byte) (int, error) {
	k, err := c.r.Read(p)
	if c.n -= int64(k); c.n < 0 {
		c.cancel()
	}
	return k, err
}

// TestApplySparseCancel: a cancellation stops Apply in the middle of a huge
// sparse entry.
func TestApplySparseCancel(t *testing.T) {
	dev, _ := newImage(t, 64<<20)
	fsys, err := ext4.Open(dev, true)
	if err != nil {
		t.Fatal(err)
	}
	defer fsys.Close()
	entry := sparseEntry("s", 16<<40-4096, []sparseChunk{{0, []byte("a")}, {8 << 40, []byte("b")}})
	// Cancelled as the first byte of data is read: the 8 TiB hole after it
	// must not keep Apply busy.
	dataAt := bytes.Index(entry, []byte("ab"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := Apply(ctx, fsys, &cancelAt{bytes.NewReader(append(entry, endTar...)), int64(dataAt), cancel}, ApplyOptions{})
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
	case <-time.After(30 * time.Second): // a guard against a hang, not a measure
		t.Fatal("Apply still runs 30 s after its context was cancelled")
	}
}
