package cache

import (
	"os"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// resident reports, for each page of path, whether it is in the page cache.
func resident(t *testing.T, path string) []bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		t.Fatalf("mincore: %v", errno)
	}
	out := make([]bool, len(vec))
	for i, v := range vec {
		out[i] = v&1 != 0
	}
	return out
}

// WillNeed reads the cached blocks of a range into the page cache, and leaves the holes of the data file alone.
func TestWillNeed(t *testing.T) {
	if os.Getpagesize() != testBS {
		t.Skipf("pages of %d bytes: the test counts blocks of %d as pages", os.Getpagesize(), testBS)
	}
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	src := newSrc(64*testBS, 7)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	// Blocks 8-15 and 40-47 cached.
	for _, first := range []int64{8, 40} {
		if err := r.Prefetch(first*testBS, 8*testBS); err != nil {
			t.Fatal(err)
		}
	}
	path := r.b.dataPath
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	for i, in := range resident(t, path) {
		if in {
			t.Skipf("page %d of the data file stays in the page cache after FADV_DONTNEED (a file system in memory?)", i)
		}
	}
	want := func(i int) bool { return (i >= 8 && i <= 15) || (i >= 40 && i <= 44) }
	deadline := time.Now().Add(10 * time.Second)
	for {
		// Asked again each time: the machine may drop its page cache meanwhile.
		r.WillNeed(4*testBS, 40*testBS+100) // blocks 4-44: cached 8-15 and 40-44
		got := resident(t, path)
		done := true
		for i, in := range got {
			if in && !want(i) {
				t.Fatalf("page %d read into the page cache: not asked for, or a hole", i)
			}
			done = done && (in || !want(i))
		}
		if done {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cached blocks asked for are not in the page cache 10 s later: resident %v", got)
		}
		time.Sleep(10 * time.Millisecond)
	}
	checkRead(t, r, src, 0, len(src.data))
}
