package lsmt

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func TestStackExtents(t *testing.T) {
	dir := t.TempDir()
	open := func(name string) *os.File {
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	rw, err := CreateRW(open("d0"), open("i0"), 1<<30, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	blk := bytes.Repeat([]byte{1}, 4096)
	for _, off := range []int64{0, 4096, 1 << 20, 3 << 20} {
		if _, err := rw.WriteAt(blk, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := rw.Discard(3<<20, 4096); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := Commit(&buf, rw, CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	lower, err := Open(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	upper, err := CreateRW(open("d1"), open("i1"), 0, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := upper.WriteAt(blk, 8192); err != nil { // joins the lower's first extent
		t.Fatal(err)
	}
	if err := upper.Discard(1<<20, 4096); err != nil { // hides the lower's second extent
		t.Fatal(err)
	}
	s, err := NewStack([]*File{lower}, upper)
	if err != nil {
		t.Fatal(err)
	}
	got := s.Extents()
	want := []Segment{{Offset: 0, Length: 24}}
	if len(got) != len(want) || got[0] != want[0] {
		t.Fatalf("Extents = %v, want %v", got, want)
	}
	ro, err := NewStack([]*File{lower}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := ro.Extents(); len(got) != 2 || got[0] != (Segment{Offset: 0, Length: 16}) || got[1] != (Segment{Offset: 2048, Length: 8}) {
		t.Fatalf("read-only Extents = %v", got)
	}
}
