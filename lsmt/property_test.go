package lsmt

import (
	"bytes"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
)

// Sector states of a layer model.
const (
	stHole = iota
	stData
	stZero
)

// model is a byte-level reference of one layer: contents plus per-sector state.
type model struct {
	data  []byte
	state []uint8
}

func newModel(vsize int) *model {
	return &model{data: make([]byte, vsize), state: make([]uint8, vsize/SectorSize)}
}

func (m *model) write(p []byte, off int) {
	copy(m.data[off:], p)
	for s := off / SectorSize; s < (off+len(p))/SectorSize; s++ {
		m.state[s] = stData
	}
}

func (m *model) discard(off, n int) {
	clear(m.data[off : off+n])
	for s := off / SectorSize; s < (off+n)/SectorSize; s++ {
		m.state[s] = stZero
	}
}

// view returns what a stack of models (bottom first) reads as.
func view(layers []*model) []byte {
	out := make([]byte, len(layers[0].data))
	for s := range layers[0].state {
		for i := len(layers) - 1; i >= 0; i-- {
			if st := layers[i].state[s]; st != stHole {
				if st == stData {
					copy(out[s*SectorSize:(s+1)*SectorSize], layers[i].data[s*SectorSize:])
				}
				break
			}
		}
	}
	return out
}

// workload applies n random aligned writes and discards to w and m.
func workload(t testing.TB, rng *rand.Rand, w interface {
	WriteAt([]byte, int64) (int, error)
	Discard(int64, int64) error
}, m *model, n int, maxSectors int) {
	sectors := len(m.state)
	for i := 0; i < n; i++ {
		off := rng.Intn(sectors)
		l := 1 + rng.Intn(min(maxSectors, sectors-off))
		if rng.Intn(50) == 0 { // occasionally large (exercises 4 MiB and 16383-sector splits)
			off = rng.Intn(sectors / 4)
			l = sectors - off - rng.Intn(sectors-off)
		}
		if rng.Intn(4) == 0 {
			if err := w.Discard(int64(off*SectorSize), int64(l*SectorSize)); err != nil {
				t.Fatal(err)
			}
			m.discard(off*SectorSize, l*SectorSize)
			continue
		}
		p := pattern(rng.Int(), l*SectorSize)
		if _, err := w.WriteAt(p, int64(off*SectorSize)); err != nil {
			t.Fatal(err)
		}
		m.write(p, off*SectorSize)
	}
}

type readerAt interface {
	ReadAt([]byte, int64) (int, error)
}

// compareReads checks a full read and random unaligned reads of r against want.
func compareReads(t testing.TB, rng *rand.Rand, what string, r readerAt, want []byte) {
	t.Helper()
	got := make([]byte, len(want))
	if n, err := r.ReadAt(got, 0); err != nil || n != len(want) {
		t.Fatalf("%s: full read: %d, %v", what, n, err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("%s: full read differs at byte %d (sector %d)", what, i, i/SectorSize)
	}
	for k := 0; k < 50; k++ {
		off := rng.Intn(len(want))
		n := rng.Intn(min(len(want)-off, 300000) + 1)
		buf := make([]byte, n)
		if c, err := r.ReadAt(buf, int64(off)); err != nil || c != n {
			t.Fatalf("%s: read %d at %d: %d, %v", what, n, off, c, err)
		}
		if i := firstDiff(buf, want[off:off+n]); i >= 0 {
			t.Fatalf("%s: read %d at %d differs at byte %d", what, n, off, i)
		}
	}
	// Reads crossing the end are cut short with io.EOF.
	buf := make([]byte, 1024)
	if n, err := r.ReadAt(buf, int64(len(want)-512)); n != 512 || err == nil {
		t.Fatalf("%s: read across the end: %d, %v", what, n, err)
	}
}

func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

func cloneMem(m *memFile) *memFile {
	return &memFile{b: bytes.Clone(m.b), alloc: append([]bool(nil), m.alloc...)}
}

func TestRWProperty(t *testing.T) {
	for seed := int64(1); seed <= 8; seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed))
			const vsize = 12 << 20
			w, data, index := newMemRW(t, vsize, CreateOptions{UUID: "01bb4fce-3eb1-b56b-05ad-f99504dafd31"})
			m := newModel(vsize)
			workload(t, rng, w, m, 300+rng.Intn(300), 64)
			compareReads(t, rng, "rw", w, m.data)
			before := w.Index()
			committed := commitBytes(t, w, CommitOptions{})
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			if _, err := w.WriteAt(make([]byte, 512), 0); err == nil {
				t.Fatal("write after close accepted")
			}

			// Replay equals the state before.
			w2, err := OpenRW(data, index)
			if err != nil {
				t.Fatal(err)
			}
			if after := w2.Index(); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Fatalf("replayed index differs:\n%v\n%v", after, before)
			}
			compareReads(t, rng, "replayed rw", w2, m.data)
			if !bytes.Equal(commitBytes(t, w2, CommitOptions{}), committed) {
				t.Fatal("commit after replay differs")
			}
			// More writes after reopening go on appending.
			workload(t, rng, w2, m, 50, 64)
			compareReads(t, rng, "reopened rw", w2, m.data)
			committed = commitBytes(t, w2, CommitOptions{})
			if err := w2.Close(); err != nil {
				t.Fatal(err)
			}

			f := openBytes(t, committed)
			compareReads(t, rng, "committed", f, m.data)
			if k, _ := Kind(bytes.NewReader(committed), int64(len(committed))); k != KindCommitted {
				t.Fatal("kind", k)
			}
			for _, s := range f.Index() {
				if s.Length >= MaxSegmentLength {
					t.Fatalf("merged entry too long: %v", s)
				}
			}
			// Committing a committed file reproduces it.
			if !bytes.Equal(commitBytes(t, f, CommitOptions{UUID: f.Header().UUID}), committed) {
				t.Fatal("re-commit differs")
			}

			// Seal: the data file becomes a read-only layer with the same content, and committing
			// it gives the same bytes as committing the RW layer.
			w3, err := OpenRW(cloneMem(data), cloneMem(index))
			if err != nil {
				t.Fatal(err)
			}
			sealedData := w3.data.(*memFile)
			size, err := w3.Seal()
			if err != nil {
				t.Fatal(err)
			}
			if size != int64(len(sealedData.b)) {
				t.Fatalf("Seal returned %d, file is %d", size, len(sealedData.b))
			}
			sf := openBytes(t, sealedData.b)
			if k, _ := Kind(bytes.NewReader(sealedData.b), size); k != KindSealed {
				t.Fatal("kind", k)
			}
			if tr := sf.Trailer(); tr.Flags != 6 || tr.UUID != "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31" || int(tr.IndexSize) != len(sf.Index()) {
				t.Fatalf("sealed trailer %+v", tr)
			}
			compareReads(t, rng, "sealed", sf, m.data)
			if !bytes.Equal(commitBytes(t, sf, CommitOptions{}), committed) {
				t.Fatal("commit of the sealed file differs")
			}
			if k, _ := Kind(data, int64(len(data.b))); k != KindRWData {
				t.Fatal("kind", k)
			}
			if k, _ := Kind(index, int64(len(index.b))); k != KindRWIndex {
				t.Fatal("kind", k)
			}
		})
	}
}

func TestSparseProperty(t *testing.T) {
	for seed := int64(1); seed <= 6; seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed))
			const vsize = 12 << 20
			data := &memFile{}
			w, err := CreateRW(data, nil, vsize, CreateOptions{Sparse: true})
			if err != nil {
				t.Fatal(err)
			}
			if len(data.b) != vsize+HeaderSize || w.Header().Flags != 0x13 {
				t.Fatalf("sparse file size %d flags %#x", len(data.b), w.Header().Flags)
			}
			m := newModel(vsize)
			workload(t, rng, w, m, 400, 64)
			compareReads(t, rng, "sparse", w, m.data)
			f := openBytes(t, commitBytes(t, w, CommitOptions{}))
			compareReads(t, rng, "sparse committed", f, m.data)
			if k, _ := Kind(data, int64(len(data.b))); k != KindSparseRW {
				t.Fatal("kind", k)
			}

			// Reopening rebuilds the index from extents: discarded ranges become holes.
			w2, err := OpenRW(data, nil)
			if err != nil {
				t.Fatal(err)
			}
			compareReads(t, rng, "sparse reopened", w2, m.data)
			for _, s := range w2.Index() {
				if s.Zeroed || s.MOffset != s.Offset+8 || s.Length > MaxSegmentLength {
					t.Fatalf("rebuilt entry %v", s)
				}
			}
			size, err := w2.Seal()
			if err != nil {
				t.Fatal(err)
			}
			sf := openBytes(t, data.b[:size])
			if sf.Trailer().Flags != 0x16 {
				t.Fatalf("sealed sparse trailer flags %#x", sf.Trailer().Flags)
			}
			compareReads(t, rng, "sparse sealed", sf, m.data)
		})
	}
}

// buildLayer makes a read-only layer from a random workload, committed or sealed.
func buildLayer(t testing.TB, rng *rand.Rand, vsize int, m *model, ops int) *File {
	w, err := CreateRW(&memFile{}, &memFile{}, int64(vsize), CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	workload(t, rng, w, m, ops, 32)
	if rng.Intn(2) == 0 {
		return openBytes(t, commitBytes(t, w, CommitOptions{}))
	}
	size, err := w.Seal()
	if err != nil {
		t.Fatal(err)
	}
	return openBytes(t, w.data.(*memFile).b[:size])
}

func TestStackProperty(t *testing.T) {
	const vsize = 2 << 20
	for _, n := range []int{1, 2, 3, 7, 16, 64} {
		t.Run(fmt.Sprint("layers", n), func(t *testing.T) {
			rng := rand.New(rand.NewSource(int64(n)))
			var files []*File
			var models []*model
			for i := 0; i < n; i++ {
				m := newModel(vsize)
				files = append(files, buildLayer(t, rng, vsize, m, 1+rng.Intn(40)))
				models = append(models, m)
			}
			s, err := NewStack(files, nil)
			if err != nil {
				t.Fatal(err)
			}
			want := view(models)
			compareReads(t, rng, "stack", s, want)
			if _, err := s.WriteAt(make([]byte, 512), 0); err != ErrReadOnly {
				t.Fatal("write to a read-only stack:", err)
			}
			flat := openBytes(t, commitBytes(t, s, CommitOptions{}))
			compareReads(t, rng, "merged commit", flat, want)
			checkLocate(t, rng, s, files, want)

			// With a writable upper of size 0: it inherits the lowers' size.
			um := newModel(vsize)
			upper, err := CreateRW(&memFile{}, &memFile{}, 0, CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			s2, err := NewStack(files, upper)
			if err != nil {
				t.Fatal(err)
			}
			if upper.VirtualSize() != vsize || upper.Header().VirtualSize != vsize || s2.VirtualSize() != vsize {
				t.Fatal("upper did not inherit the virtual size")
			}
			workload(t, rng, s2, um, 200, 32)
			want = view(append(models, um))
			compareReads(t, rng, "stack+upper", s2, want)
			flat = openBytes(t, commitBytes(t, s2, CommitOptions{}))
			compareReads(t, rng, "stack+upper commit", flat, want)
			if _, err := s2.WriteAt(make([]byte, 1024), vsize-512); err == nil {
				t.Fatal("write beyond the virtual size accepted")
			}
		})
	}
}

// checkLocate checks that the pieces Locate gives, read from the layers' files, make up random reads of want
// (the stack's contents), with zeros between them.
func checkLocate(t *testing.T, rng *rand.Rand, s *Stack, files []*File, want []byte) {
	t.Helper()
	for k := 0; k < 50; k++ {
		off := int64(rng.Intn(len(want)))
		n := 1 + int64(rng.Intn(min(len(want)-int(off), 300000)))
		if k == 0 {
			off, n = 0, int64(len(want))+4096 // past the end: cut at the virtual size
		}
		got := make([]byte, min(n, int64(len(want))-off))
		next := off
		s.Locate(off, n, func(p Piece) {
			if p.At < next || p.Length <= 0 || p.At+p.Length > off+int64(len(got)) {
				t.Fatalf("Locate(%d, %d): piece %+v out of order or range (next byte %d)", off, n, p, next)
			}
			next = p.At + p.Length
			if _, err := files[p.Layer].readers[p.Reader].ReadAt(got[p.At-off:next-off], p.Offset); err != nil {
				t.Fatal(err)
			}
			if p.Reader != 0 {
				return
			}
			// Shows maps the piece's file bytes back to the disk: its ranges, in order of the file, cover them
			// once each, and one of them is the piece's.
			var shown int64
			var found bool
			s.Shows(p.Layer, p.Offset, p.Length, func(at, length int64) {
				if length <= 0 || at < 0 || at+length > int64(len(want)) {
					t.Fatalf("Shows(%d, %d, %d): range %d+%d", p.Layer, p.Offset, p.Length, at, length)
				}
				shown += length
				found = found || at == p.At && length == p.Length
			})
			if !found || shown < p.Length {
				t.Fatalf("Shows(%d, %d, %d) does not show the piece at %d (%d bytes shown)", p.Layer, p.Offset, p.Length, p.At, shown)
			}
		})
		if i := firstDiff(got, want[off:off+int64(len(got))]); i >= 0 {
			t.Fatalf("Locate(%d, %d): the pieces differ from the disk at byte %d", off, n, off+int64(i))
		}
	}
}

// TestReadCoalescing checks that a read over segments contiguous in the file is one ReadAt.
func TestReadCoalescing(t *testing.T) {
	w, _, _ := newMemRW(t, 1<<30, CreateOptions{})
	w.WriteAt(pattern(5, 8<<20), 0)
	w.Discard(8<<20, 1<<20)
	w.WriteAt(pattern(6, 1<<20), 9<<20)
	mf := &memFile{b: commitBytes(t, w, CommitOptions{})}
	f, err := Open(mf, int64(len(mf.b)))
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Index()) != 4 {
		t.Fatalf("index %v", f.Index())
	}
	buf := make([]byte, 12<<20)
	mf.reads = 0
	if _, err := f.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	// Two data runs (the 8 MiB one spans two entries); the zeroed extent and the hole are not read.
	if mf.reads != 2 {
		t.Fatalf("%d ReadAt calls, want 2", mf.reads)
	}
}

// TestStackConcurrent reads a stack while its upper layer is written (run with -race).
func TestStackConcurrent(t *testing.T) {
	const vsize = 1 << 20
	rng := rand.New(rand.NewSource(9))
	lower := buildLayer(t, rng, vsize, newModel(vsize), 20)
	upper, err := CreateRW(&memFile{}, &memFile{}, vsize, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewStack([]*File{lower}, upper)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 2)
	for g := 0; g < 2; g++ {
		go func(g int) {
			r := rand.New(rand.NewSource(int64(g)))
			buf := make([]byte, 64<<10)
			for i := 0; i < 200; i++ {
				off := int64(r.Intn(vsize/SectorSize-128)) * SectorSize
				if g == 0 {
					if _, err := s.WriteAt(buf[:4096], off); err != nil {
						done <- err
						return
					}
				} else if _, err := s.ReadAt(buf, off); err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}(g)
	}
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}

// TestSparseConcurrent writes a sparse layer from several goroutines (each its own blocks, some discarded) while
// another reads, then seals it: every write is mapped and sealed, and a reopened layer reads the same (run with
// -race).
func TestSparseConcurrent(t *testing.T) {
	const vsize, writers, blocks = 8 << 20, 4, 256
	data, err := os.Create(filepath.Join(t.TempDir(), "data"))
	if err != nil {
		t.Fatal(err)
	}
	defer data.Close()
	w, err := CreateRW(data, nil, vsize, CreateOptions{Sparse: true})
	if err != nil {
		t.Fatal(err)
	}
	block := func(g, i int) (int64, []byte) {
		b := bytes.Repeat([]byte{byte(g*blocks+i) | 1}, 4096)
		return int64(i*writers+g) * 4096, b
	}
	done := make(chan error, writers+1)
	stop := make(chan struct{})
	for g := range writers {
		go func() {
			for i := range blocks {
				off, b := block(g, i)
				if _, err := w.WriteAt(b, off); err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
	}
	go func() {
		buf := make([]byte, 64<<10)
		for i := 0; ; i++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			if _, err := w.ReadAt(buf, int64(i%64)*(64<<10)); err != nil {
				done <- err
				return
			}
		}
	}()
	for range writers {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	check := func(name string, r io.ReaderAt) {
		t.Helper()
		got := make([]byte, 4096)
		for g := range writers {
			for i := range blocks {
				off, want := block(g, i)
				if _, err := r.ReadAt(got, off); err != nil || !bytes.Equal(got, want) {
					t.Fatalf("%s: block %d of writer %d: %v", name, i, g, err)
				}
			}
		}
	}
	check("written", w)
	size, err := w.Seal()
	if err != nil {
		t.Fatal(err)
	}
	f, err := Open(data, size)
	if err != nil {
		t.Fatal(err)
	}
	check("sealed", f)
}
