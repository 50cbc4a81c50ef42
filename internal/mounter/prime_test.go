package mounter

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/fsmeta"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/testenv"
)

// resident reports how many of the pages of file name are in the page cache, and how many it has.
func resident(t *testing.T, name string) (in, pages int) {
	t.Helper()
	pp := testenv.Resident(t, name)
	for _, p := range pp {
		if p {
			in++
		}
	}
	return in, len(pp)
}

// evict drops the clean pages of file name from the page cache.
func evict(t *testing.T, name string) {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
}

// TestPrimeStart: a start that follows a learned one has the files that start read brought into the page cache
// before the container reads them (and not the files it did not read); the image then unmounts cleanly. Turned
// off, nothing is primed.
func TestPrimeStart(t *testing.T) {
	needSystem(t)
	blob := treeLayer(t, 400, 8)
	t.Run("on", func(t *testing.T) { testPrimeStart(t, blob, true) })
	t.Run("off", func(t *testing.T) { testPrimeStart(t, blob, false) })
}

func testPrimeStart(t *testing.T, blob []byte, on bool) {
	reg := newFakeRegistry(t, blob)
	s := newSetup(t)
	m := s.newMounter(mounterOptions{registry: reg, cache: s.openCache(4096), starts: filepath.Join(s.root, "starts"), predecode: 16 << 20, prime: on})
	target := filepath.Join(s.root, "mnt")
	if err := s.mount(m, "img", []snapshotter.Layer{reg.layer()}, target); err != nil {
		t.Fatal(err)
	}
	if on {
		checkPrimeFile(t, target)
	}
	var read, other []string
	// The files of the first directories have their inodes in the blocks the mount read (ext4 reads the inode
	// table ahead of the root's inode): the start does not read them, the local parts of the tables stand in.
	for d := range 400 {
		for f := range 8 {
			name := filepath.Join(target, fmt.Sprintf("pkg/module-%03d/file-%02d.py", d, f))
			if d%4 == 0 {
				read = append(read, name)
			} else {
				other = append(other, name)
			}
		}
	}
	// The first start reads a quarter of the files, their inodes too: it is learned.
	m.Starting("img")
	want := map[string][]byte{}
	for _, name := range read {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		want[name] = b
	}
	// Evicted again, the files are not in the page cache until the next start primes it.
	for _, name := range read {
		evict(t, name)
		if in, _ := resident(t, name); in != 0 {
			t.Fatalf("%s: %d pages still cached after eviction", name, in)
		}
	}
	m.Starting("img")
	p := m.image("img").priming
	if !on {
		if p != nil {
			t.Fatal("primed with PrimePageCache off")
		}
		return
	}
	if p == nil {
		t.Fatal("a start that follows a learned one is not primed")
	}
	<-p.done
	var info *PrimeInfo
	for _, ii := range m.Images() {
		if ii.ID == "img" {
			info = ii.Prime
		}
	}
	if info == nil || info.Running || info.Error != "" || info.Files != int64(len(read)) || info.FileBytes < int64(len(read))*4096 || info.MetadataBytes == 0 {
		t.Fatalf("Images: prime %+v, want the %d files read, done", info, len(read))
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, name := range read {
		for {
			in, pages := resident(t, name)
			if in == pages {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d of %d pages cached after the priming", name, in, pages)
			}
			time.Sleep(10 * time.Millisecond)
		}
		if b, err := os.ReadFile(name); err != nil || !bytes.Equal(b, want[name]) {
			t.Fatalf("%s: read %d bytes, %v (equal %v)", name, len(b), err, bytes.Equal(b, want[name]))
		}
	}
	cached := 0
	for _, name := range other {
		if in, _ := resident(t, name); in > 0 {
			cached++
		}
	}
	if cached > len(other)/10 {
		t.Errorf("%d of the %d files the start did not read were primed too", cached, len(other))
	}
	if err := m.Unmount(t.Context(), "img", target); err != nil {
		t.Fatal(err)
	}

	// Attached again (as a pull does; the unmount dropped the files' pages), the image has its start's files
	// found before a start, which primes them from that plan.
	if err := s.mount(m, "img", []snapshotter.Layer{reg.layer()}, target); err != nil {
		t.Fatal(err)
	}
	img := m.image("img")
	if img.planning == nil {
		t.Fatalf("the attach of an image with a learned start did not plan its priming: %+v", img.planning)
	}
	<-img.planning.done
	img.primeMu.Lock()
	planned := img.primed
	img.primeMu.Unlock()
	if planned == nil {
		t.Fatal("the attach's plan was not kept")
	}
	if in, _ := resident(t, read[0]); in != 0 {
		t.Errorf("%s: the attach's plan read %d pages of it", read[0], in)
	}
	m.Starting("img")
	p = m.image("img").priming
	<-p.done
	if info := p.info(); info.Files != int64(len(read)) {
		t.Errorf("the start after the attach primed %+v, want the %d files read", info, len(read))
	}
	img.primeMu.Lock()
	again := img.primed
	img.primeMu.Unlock()
	if again != planned {
		t.Error("the start after the attach planned again")
	}
	if err := m.Unmount(t.Context(), "img", target); err != nil {
		t.Fatal(err)
	}
}

// checkPrimeFile: primeFile reads a regular file of the mounted image at target by its handle, and refuses an
// inode that is not one (a directory here) without opening it for reading.
func checkPrimeFile(t *testing.T, target string) {
	root, err := os.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	extent := func(name string) fsmeta.FileExtent {
		h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, filepath.Join(target, name), 0)
		if err != nil {
			t.Fatal(err)
		}
		if h.Type() != fileIDIno32Gen || len(h.Bytes()) != 8 {
			t.Fatalf("%s: handle of type %d, %d bytes: not ext4's", name, h.Type(), len(h.Bytes()))
		}
		b := h.Bytes()
		return fsmeta.FileExtent{Ino: binary.NativeEndian.Uint32(b[0:]), Gen: binary.NativeEndian.Uint32(b[4:])}
	}
	if err := primeFile(int(root.Fd()), extent("pkg/module-001/file-00.py"), 0, 4096); err != nil {
		t.Errorf("prime a regular file: %v", err)
	}
	if err := primeFile(int(root.Fd()), extent("pkg/module-001"), 0, 4096); !errors.Is(err, unix.ESTALE) {
		t.Errorf("prime a directory: %v, want ESTALE", err)
	}
}
