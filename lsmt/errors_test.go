package lsmt

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// threeEntries returns a committed layer with three data entries (sectors 0, 16 and 32, 8 each).
func threeEntries(t *testing.T) []byte {
	w, _, _ := newMemRW(t, 1<<20, CreateOptions{})
	for i := 0; i < 3; i++ {
		w.WriteAt(pattern(i, 4096), int64(i)*16*SectorSize)
	}
	return commitBytes(t, w, CommitOptions{})
}

func TestOpenErrors(t *testing.T) {
	base := threeEntries(t)
	f := openBytes(t, base)
	idxOff := int(f.Trailer().IndexOffset)
	setEntry := func(b []byte, i int, s Segment) { copy(b[idxOff+16*i:], AppendEntry(nil, s)) }
	cases := []struct {
		name string
		edit func(b []byte) []byte
		want string
	}{
		{"bad magic", func(b []byte) []byte { b[0] = 'X'; return b }, "lsmt: bad magic"},
		{"trailer magic", func(b []byte) []byte { b[len(b)-4096] = 'X'; return b }, "no sealed trailer"},
		{"not sealed", func(b []byte) []byte { b[len(b)-4096+28] = 2; return b }, "no sealed trailer"},
		{"too small", func(b []byte) []byte { return b[:100] }, "too small"},
		{"overlap", func(b []byte) []byte { setEntry(b, 2, Segment{Offset: 20, Length: 8, MOffset: 24}); return b }, "lsmt: index entry 2 overlaps entry 1"},
		{"order", func(b []byte) []byte { setEntry(b, 2, Segment{Offset: 1, Length: 1, MOffset: 24}); return b }, "out of order"},
		{"outside", func(b []byte) []byte { setEntry(b, 1, Segment{Offset: 16, Length: 8, MOffset: 30}); return b }, "lsmt: index entry 1 points outside data (moffset 30"},
		{"before data", func(b []byte) []byte { setEntry(b, 0, Segment{Offset: 0, Length: 8, MOffset: 7}); return b }, "points outside data"},
		{"address space", func(b []byte) []byte {
			setEntry(b, 3, Segment{Offset: 1<<50 - 3, Length: 8, MOffset: 8, Zeroed: true})
			return b
		}, "beyond the address space"},
		{"index too large", func(b []byte) []byte {
			b[len(b)-4096+40] = 0x41 // index_size 0x4f41 + …
			b[len(b)-4096+42] = 0x10
			return b
		}, "read-only limit"},
		{"index past trailer", func(b []byte) []byte { b[len(b)-4096+41] = 2; return b }, "does not fit"},
		{"rw index file", func(b []byte) []byte { b[28] = 1; return b }, "index file of a writable layer"},
	}
	for _, c := range cases {
		b := c.edit(bytes.Clone(base))
		_, err := Open(bytes.NewReader(b), int64(len(b)))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want %q", c.name, err, c.want)
		}
	}
	// A zeroed entry may point at the end of the data area; an invalid entry anywhere is skipped.
	b := bytes.Clone(base)
	setEntry(b, 3, Segment{Offset: 100, Length: 8, MOffset: uint64(idxOff / SectorSize), Zeroed: true})
	setEntry(b, 1, InvalidSegment)
	if f := openBytes(t, b); len(f.Index()) != 3 || f.Index()[2].Offset != 100 {
		t.Fatalf("index %v", f.Index())
	}
	if !errors.Is(func() error { _, err := Open(bytes.NewReader(make([]byte, 8192)), 8192); return err }(), ErrBadMagic) {
		t.Fatal("zeros are not a bad magic")
	}
}

func TestRWErrors(t *testing.T) {
	w, data, index := newMemRW(t, 1<<20, CreateOptions{})
	for _, c := range []struct {
		off int64
		n   int
	}{{1, 512}, {512, 100}, {-512, 512}, {1 << 20, 512}} {
		if _, err := w.WriteAt(make([]byte, c.n), c.off); err == nil {
			t.Errorf("write of %d at %d accepted", c.n, c.off)
		}
	}
	if err := w.Discard(0, 100); err == nil {
		t.Error("unaligned discard accepted")
	}
	if _, err := CreateRW(&memFile{}, nil, 4096, CreateOptions{}); err == nil {
		t.Error("append layer without index accepted")
	}
	if _, err := CreateRW(&memFile{}, &memFile{}, 100, CreateOptions{}); err == nil {
		t.Error("unaligned virtual size accepted")
	}
	w.WriteAt(pattern(1, 4096), 0)
	w.Close()
	// An entry pointing past the data file is rejected on replay.
	bad := cloneMem(index)
	bad.WriteAt(AppendEntry(nil, Segment{Offset: 0, Length: 8, MOffset: 100}), int64(len(bad.b)))
	if _, err := OpenRW(data, bad); err == nil || !strings.Contains(err.Error(), "points outside data") {
		t.Errorf("replay error %v", err)
	}
	// Swapped files and a missing index are reported.
	if _, err := OpenRW(index, data); err == nil {
		t.Error("swapped files accepted")
	}
	if _, err := OpenRW(data, nil); err == nil {
		t.Error("missing index accepted")
	}
	// A torn last entry is ignored and overwritten by the next append; padding entries are skipped.
	torn := cloneMem(index)
	torn.WriteAt(AppendEntry(nil, InvalidSegment), int64(len(torn.b)))
	torn.WriteAt([]byte{1, 2, 3}, int64(len(torn.b)))
	w2, err := OpenRW(cloneMem(data), torn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w2.WriteAt(pattern(2, 512), 512); err != nil {
		t.Fatal(err)
	}
	w2.Close()
	w3, err := OpenRW(w2.data.(*memFile), torn)
	if err != nil {
		t.Fatal(err)
	}
	if got := w3.Index(); len(got) != 3 || got[1] != (Segment{Offset: 1, Length: 1, MOffset: 16}) {
		t.Fatalf("index after torn entry: %v", got)
	}
	// Sealing closes the layer.
	if _, err := w3.Seal(); err != nil {
		t.Fatal(err)
	}
	if _, err := w3.WriteAt(make([]byte, 512), 0); !errors.Is(err, ErrClosed) {
		t.Fatal("write after seal:", err)
	}
}

func TestStackErrors(t *testing.T) {
	if _, err := NewStack(nil, nil); err == nil {
		t.Error("empty stack accepted")
	}
	f := openBytes(t, threeEntries(t))
	many := make([]*File, MaxLayers+1)
	for i := range many {
		many[i] = f
	}
	if _, err := NewStack(many, nil); err == nil {
		t.Error("too many layers accepted")
	}
	if _, err := NewStack(many[:MaxLayers], nil); err != nil {
		t.Error(err)
	}
}

// TestSparseOSFile runs a sparse layer on a real file (SEEK_DATA/SEEK_HOLE, punched holes).
func TestSparseOSFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "data")
	fd, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	const vsize = 8 << 20
	w, err := CreateRW(fd, nil, vsize, CreateOptions{Sparse: true})
	if err != nil {
		t.Fatal(err)
	}
	m := newModel(vsize)
	p := pattern(1, 1<<20)
	w.WriteAt(p, 1<<20)
	m.write(p, 1<<20)
	if err := w.Discard(1<<20, 64<<10); err != nil {
		t.Fatal(err)
	}
	m.discard(1<<20, 64<<10)
	w.WriteAt(p[:4096], 6<<20)
	m.write(p[:4096], 6<<20)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w2, err := OpenRW(fd, nil)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, vsize)
	if _, err := w2.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, m.data); i >= 0 {
		t.Fatalf("differs at %d", i)
	}
	// Extents start at file-system block boundaries; the punched range is a hole.
	idx := w2.Index()
	if len(idx) < 2 || idx[0].Offset != (1<<20+64<<10)/SectorSize || idx[len(idx)-1].End() != (6<<20+4096)/SectorSize {
		t.Fatalf("rebuilt index %v", idx)
	}
}

// TestSparseDiscardIndex: a sparse layer with an index file keeps its discards across a reopen, so a discarded
// range stacked over a lower layer still reads as zeros, and data written after a discard wins over it.
func TestSparseDiscardIndex(t *testing.T) {
	dir := t.TempDir()
	const vsize = 4 << 20
	lw, _, _ := newMemRW(t, vsize, CreateOptions{})
	lower := pattern(7, vsize)
	lw.WriteAt(lower, 0)
	lb := commitBytes(t, lw, CommitOptions{})
	lf, err := Open(bytes.NewReader(lb), int64(len(lb)))
	if err != nil {
		t.Fatal(err)
	}
	open := func(name string) *os.File {
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	data, index := open("data"), open("index")
	w, err := CreateRW(data, index, 0, CreateOptions{Sparse: true})
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewStack([]*File{lf}, w)
	if err != nil {
		t.Fatal(err)
	}
	want := append([]byte(nil), lower...)
	p := pattern(9, 256<<10)
	s.WriteAt(p, 1<<20)
	copy(want[1<<20:], p)
	s.Discard(1<<20, 128<<10) // over the upper's own data
	clear(want[1<<20 : 1<<20+128<<10])
	s.Discard(2<<20, 64<<10) // over the lower's data only
	clear(want[2<<20 : 2<<20+64<<10])
	s.Discard(3<<20, 64<<10)
	clear(want[3<<20 : 3<<20+64<<10])
	s.WriteAt(p[:8192], 3<<20+4096) // data after a discard wins
	copy(want[3<<20+4096:], p[:8192])
	if err := w.Sync(); err != nil {
		t.Fatal(err)
	}
	// Reopen, as after a crash following the sync: no Close.
	w2, err := OpenRW(data, index)
	if err != nil {
		t.Fatal(err)
	}
	if w2.VirtualSize() != vsize {
		t.Fatalf("virtual size %d", w2.VirtualSize())
	}
	s2, err := NewStack([]*File{lf}, w2)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, vsize)
	if _, err := s2.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("reopened stack differs at %d", i)
	}
	st, err := data.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if blocks := st.Sys().(*syscall.Stat_t).Blocks * 512; blocks > 512<<10 {
		t.Errorf("sparse data file holds %d bytes for 136 KiB of live data", blocks)
	}
	// Sealed, the layer keeps the discards.
	n, err := w2.Seal()
	if err != nil {
		t.Fatal(err)
	}
	sf, err := Open(data, n)
	if err != nil {
		t.Fatal(err)
	}
	s3, err := NewStack([]*File{lf, sf}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s3.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("sealed stack differs at %d", i)
	}
}

func TestKindWarp(t *testing.T) {
	// A warp commit: fs-meta entries (tag 0) and remote entries (tag 1) pointing into the target,
	// index not padded.
	w, _, _ := newMemRW(t, 1<<20, CreateOptions{})
	w.WriteAt(pattern(1, 4096), 0)
	b := commitBytes(t, w, CommitOptions{})
	tr, _ := ParseHeader(b[len(b)-HeaderSize:])
	idx := b[tr.IndexOffset:]
	copy(idx[16:], AppendEntry(nil, Segment{Offset: 100, Length: 16, MOffset: 1 << 30, Tag: 1}))
	tr.IndexSize = 2
	ts, _ := tr.MarshalBinary()
	copy(b[len(b)-HeaderSize:], ts)
	if k, err := Kind(bytes.NewReader(b), int64(len(b))); err != nil || k != KindWarp {
		t.Fatal(k, err)
	}
}
