package lsmt

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
)

// testRW returns an append RW layer in memory holding writes, overwrites and a discard.
func testRW(t *testing.T) *RW {
	t.Helper()
	w, err := CreateRW(&memFile{}, &memFile{}, 1<<30, CreateOptions{UUID: "8c6d9b4a-5e1f-4a3b-9c2d-7e8f9a0b1c2d"})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range 200 {
		off := int64(rng.IntN(1<<19)) * SectorSize
		n := (1 + rng.IntN(300)) * SectorSize
		if _, err := w.WriteAt(pattern(i, n), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Discard(64<<10, 8<<10); err != nil {
		t.Fatal(err)
	}
	return w
}

// TestCommitReaderChunks reads the committed layer in pieces of every size and checks that it is
// Commit's output, whose size Size reports up front.
func TestCommitReaderChunks(t *testing.T) {
	w := testRW(t)
	want := commitBytes(t, w, CommitOptions{UserTag: "chunks"})
	rng := rand.New(rand.NewPCG(5, 6))
	for _, maxRead := range []int{1, 7, 511, 513, 4096, 40000, 3 << 20} {
		cr, err := NewCommitReader(w, CommitOptions{UserTag: "chunks"})
		if err != nil {
			t.Fatal(err)
		}
		if cr.Size() != int64(len(want)) {
			t.Fatalf("Size = %d, Commit wrote %d", cr.Size(), len(want))
		}
		var got bytes.Buffer
		buf := make([]byte, maxRead)
		for {
			n, err := cr.Read(buf[:1+rng.IntN(maxRead)])
			got.Write(buf[:n])
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		if !bytes.Equal(got.Bytes(), want) {
			t.Fatalf("reads of up to %d bytes: %d bytes differ from Commit's %d", maxRead, got.Len(), len(want))
		}
	}
}

func TestCommitReaderReadError(t *testing.T) {
	w := testRW(t)
	w.data = &failingData{WriteAtFile: w.data}
	_, err := Commit(io.Discard, w, CommitOptions{})
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("disk on fire")) {
		t.Fatalf("Commit over a failing data file: %v", err)
	}
}

// failingData is a data file whose reads fail.
type failingData struct{ WriteAtFile }

func (*failingData) ReadAt([]byte, int64) (int, error) { return 0, errors.New("disk on fire") }

// TestFreeze stacks a layer on a frozen RW layer and checks that the stack reads as it does over
// the committed layer, that the frozen layer commits to the same bytes, and that it takes no more
// writes.
func TestFreeze(t *testing.T) {
	w := testRW(t)
	before := make([]byte, 4<<20)
	if _, err := w.ReadAt(before, 0); err != nil {
		t.Fatal(err)
	}
	committed := openBytes(t, commitBytes(t, w, CommitOptions{}))
	frozen, err := w.Freeze()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(make([]byte, SectorSize), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after Freeze: %v, want ErrClosed", err)
	}
	if _, err := w.Freeze(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Freeze: %v, want ErrClosed", err)
	}
	if frozen.VirtualSize() != 1<<30 || frozen.Header().UUID != w.Header().UUID {
		t.Fatalf("frozen layer: size %d, uuid %q", frozen.VirtualSize(), frozen.Header().UUID)
	}
	if got := commitBytes(t, frozen, CommitOptions{}); !bytes.Equal(got, commitBytes(t, w, CommitOptions{})) {
		t.Fatal("the frozen layer commits to other bytes than its RW layer")
	}
	got := make([]byte, len(before))
	if _, err := frozen.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, before) {
		t.Fatal("the frozen layer reads other data than the RW layer did")
	}
	for _, lower := range []*File{frozen, committed} {
		upper, err := CreateRW(&memFile{}, &memFile{}, 0, CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s, err := NewStack([]*File{lower}, upper)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.WriteAt(pattern(99, 8192), 4096); err != nil {
			t.Fatal(err)
		}
		want := bytes.Clone(before)
		copy(want[4096:], pattern(99, 8192))
		if _, err := s.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("stack over the %s layer reads wrong data", map[bool]string{true: "frozen", false: "committed"}[lower == frozen])
		}
	}
}
