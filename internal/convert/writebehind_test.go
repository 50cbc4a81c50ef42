package convert

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
)

// slowFile delays its writes so that reads meet data still in memory or being written.
type slowFile struct {
	*os.File
	mu     sync.Mutex
	writes int
	fail   error // returned by writes after the first failAt
	failAt int
}

func (f *slowFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	f.writes++
	n := f.writes
	f.mu.Unlock()
	if f.fail != nil && n > f.failAt {
		return 0, f.fail
	}
	if n%3 == 0 {
		// Write half, pause, then the rest: a racing read sees a half-written buffer in the file.
		h := len(p) / 2
		if _, err := f.File.WriteAt(p[:h], off); err != nil {
			return 0, err
		}
		for range 1000 {
			syscall.Getpid()
		}
		m, err := f.File.WriteAt(p[h:], off+int64(h))
		return h + m, err
	}
	return f.File.WriteAt(p, off)
}

func tempFile(t *testing.T) *os.File {
	f, err := os.Create(filepath.Join(t.TempDir(), "data"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestWriteBehindReadsItsWrites appends pieces of every size, rewrites the header, and reads random ranges all
// along: every read must give what was written, wherever the bytes are (in memory, being written, in the file).
func TestWriteBehindReadsItsWrites(t *testing.T) {
	f := &slowFile{File: tempFile(t)}
	w, err := newWriteBehind(f)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	var want []byte
	check := func() {
		t.Helper()
		if len(want) == 0 {
			return
		}
		off := rng.IntN(len(want))
		n := 1 + rng.IntN(3<<20)
		got := make([]byte, n)
		m, err := w.ReadAt(got, int64(off))
		wantN := min(n, len(want)-off)
		if m != wantN || (wantN < n) != errors.Is(err, io.EOF) || err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("ReadAt(%d bytes at %d) of %d = %d, %v", n, off, len(want), m, err)
		}
		if !bytes.Equal(got[:m], want[off:off+m]) {
			t.Fatalf("ReadAt(%d bytes at %d): wrong data", n, off)
		}
	}
	for i := 0; len(want) < 40<<20; i++ {
		n := []int{512, 4096, 4096 * 3, 1 << 20, 4 << 20, 777}[rng.IntN(6)]
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		if _, err := w.WriteAt(p, int64(len(want))); err != nil {
			t.Fatal(err)
		}
		want = append(want, p...)
		if i%50 == 7 { // a header rewrite: not an append
			h := bytes.Repeat([]byte{byte(i)}, 512)
			if _, err := w.WriteAt(h, 0); err != nil {
				t.Fatal(err)
			}
			copy(want, h)
		}
		check()
		if st, err := w.Stat(); err != nil || st.Size() != int64(len(want)) {
			t.Fatalf("Stat: size %d, want %d (%v)", st.Size(), len(want), err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	for range 20 {
		check()
	}
	onDisk, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(onDisk, want) {
		t.Fatal("the file does not hold what was written")
	}
	if _, err := w.WriteAt([]byte{1}, int64(len(want))); !errors.Is(err, errClosed) {
		t.Fatalf("write after Close: %v", err)
	}
}

func TestWriteBehindTruncate(t *testing.T) {
	w, err := newWriteBehind(tempFile(t))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	w.WriteAt(bytes.Repeat([]byte{7}, 3<<20), 0)
	if err := w.Truncate(512); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt([]byte("tail"), 512); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 600)
	n, err := w.ReadAt(got, 0)
	if n != 516 || err != io.EOF || !bytes.Equal(got[:516], append(bytes.Repeat([]byte{7}, 512), "tail"...)) {
		t.Fatalf("after Truncate: %d bytes, %v", n, err)
	}
}

// TestWriteBehindError: a failed background write (a full disk) is returned by the calls after it and by Close.
func TestWriteBehindError(t *testing.T) {
	f := &slowFile{File: tempFile(t), fail: syscall.ENOSPC, failAt: 2}
	w, err := newWriteBehind(f)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 1<<20)
	var werr error
	for i := 0; i < 64 && werr == nil; i++ {
		_, werr = w.WriteAt(p, int64(i)<<20)
	}
	if werr == nil {
		werr = w.Flush()
	}
	if !errors.Is(werr, syscall.ENOSPC) {
		t.Fatalf("writes past a full disk: %v", werr)
	}
	if _, err := w.ReadAt(p, 0); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("read after the failure: %v", err)
	}
	if err := w.Close(); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Close: %v", err)
	}
}
