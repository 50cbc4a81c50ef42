package cache

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/testenv"
)

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
	for i, in := range testenv.Resident(t, path) {
		if in {
			t.Skipf("page %d of the data file stays in the page cache after FADV_DONTNEED (a file system in memory?)", i)
		}
	}
	want := func(i int) bool { return (i >= 8 && i <= 15) || (i >= 40 && i <= 44) }
	deadline := time.Now().Add(10 * time.Second)
	for {
		// Asked again each time: the machine may drop its page cache meanwhile.
		r.WillNeed(4*testBS, 40*testBS+100) // blocks 4-44: cached 8-15 and 40-44
		got := testenv.Resident(t, path)
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
