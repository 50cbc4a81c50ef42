package device

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/testenv"
)

func TestAttachMountReadDetach(t *testing.T) {
	mkfs := needSystem(t)
	files := testFiles(1)
	b := loadImage(t, makeImage(t, mkfs, files, 32))
	state := t.TempDir()
	log, _ := testLogger(t)
	f := NewFuseLoop(log)
	id := uniqueID(t, 0)
	opts := AttachOptions{ReadOnly: true, StateDir: state}

	dev, err := f.Attach(context.Background(), id, b, opts)
	if err != nil {
		t.Fatal(err)
	}
	detached := false
	t.Cleanup(func() {
		if !detached {
			f.Detach(context.Background(), id)
		}
	})
	if dev.Size != b.Size() || !dev.ReadOnly || dev.ID != id {
		t.Fatalf("device = %+v", dev)
	}
	idx, err := loopIndex(dev.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: loop direct I/O %v, backing file %s", dev.Path, loopDirectIO(idx), loopBackingFile(idx))
	if ra, err := readAhead(idx); err != nil || ra != DefaultReadAheadKB {
		t.Errorf("read_ahead_kb of %s = %d, %v; want %d", dev.Path, ra, err, DefaultReadAheadKB)
	}

	// A child process must not inherit the /dev/fuse descriptor: it would keep the connection open after a crash.
	out, err := exec.Command("ls", "-l", "/proc/self/fd/").CombinedOutput()
	if err != nil || strings.Contains(string(out), "/dev/fuse") {
		t.Errorf("child process inherits /dev/fuse (%v):\n%s", err, out)
	}

	again, err := f.Attach(context.Background(), id, b, opts)
	if err != nil || again != dev {
		t.Fatalf("second Attach = %p, %v; want the same device %p", again, err, dev)
	}
	if _, err := f.Attach(context.Background(), id, b, AttachOptions{StateDir: state}); err == nil {
		t.Fatal("Attach of an attached id with other options succeeded")
	}

	target := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Unmount(target) })
	if err := dev.Mount(context.Background(), target, "ext4", []string{"ro", "noatime"}); err != nil {
		t.Fatal(err)
	}
	if err := dev.Mount(context.Background(), target, "ext4", []string{"ro"}); err != nil {
		t.Fatalf("second Mount at the same place: %v", err)
	}
	checkFiles(t, target, files)

	infos, err := ListAttached(state)
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 1 || infos[0].ID != id || infos[0].Path != dev.Path || !infos[0].Served {
		t.Fatalf("ListAttached = %+v", infos)
	}

	if err := f.Detach(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	detached = true
	if isMounted(t, target) {
		t.Error("filesystem still mounted after Detach")
	}
	if isMounted(t, dev.BackingFile) {
		t.Error("FUSE file still mounted after Detach")
	}
	if !loopFree(t, dev.Path) {
		t.Errorf("%s still bound to %s", dev.Path, loopBackingFile(idx))
	}
	if _, err := os.Stat(filepath.Dir(dev.BackingFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("device directory left behind: %v", err)
	}
	if err := f.Detach(context.Background(), id); err != nil {
		t.Fatalf("second Detach: %v", err)
	}
	if infos, err := ListAttached(state); err != nil || len(infos) != 0 {
		t.Fatalf("ListAttached after Detach = %+v, %v", infos, err)
	}
}

func TestWritableDevice(t *testing.T) {
	needSystem(t)
	b := &memBackend{data: make([]byte, 8<<20)}
	f := NewFuseLoop(nil)
	dev := attach(t, f, uniqueID(t, 0), b, AttachOptions{StateDir: t.TempDir()})
	if dev.ReadOnly {
		t.Fatal("device is read-only")
	}
	fd, err := unix.Open(dev.Path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	buf := alignedBuffer(64 << 10)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	const off = 3 << 20
	if _, err := unix.Pwrite(fd, buf, off); err != nil {
		t.Fatalf("write to %s: %v", dev.Path, err)
	}
	if err := unix.Fsync(fd); err != nil {
		t.Fatalf("fsync: %v", err)
	}
	got := make([]byte, len(buf))
	b.ReadAt(got, off)
	if string(got) != string(buf) {
		t.Fatal("the backend does not hold what was written to the device")
	}

	if _, err := f.Attach(context.Background(), uniqueID(t, 1), readOnlyBackend{b}, AttachOptions{StateDir: t.TempDir()}); err == nil {
		t.Fatal("writable Attach of a backend without WriteAt succeeded")
	}
}

// readOnlyBackend hides WriteAt.
type readOnlyBackend struct{ b Backend }

func (r readOnlyBackend) ReadAt(p []byte, off int64) (int, error) { return r.b.ReadAt(p, off) }
func (r readOnlyBackend) Size() int64                             { return r.b.Size() }

func TestReadOnlyDeviceRejectsWrites(t *testing.T) {
	needSystem(t)
	b := &memBackend{data: make([]byte, 1<<20)}
	dev := attach(t, NewFuseLoop(nil), uniqueID(t, 0), b, AttachOptions{ReadOnly: true, StateDir: t.TempDir()})
	// The kernel may let the device node be opened for writing, but the write fails.
	if fd, err := unix.Open(dev.Path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0); err == nil {
		_, werr := unix.Pwrite(fd, alignedBuffer(4096), 0)
		unix.Close(fd)
		if werr == nil {
			t.Fatalf("write to read-only %s succeeded", dev.Path)
		}
		t.Logf("write to read-only %s: %v", dev.Path, werr)
	}
	if b.data[0] != 0 {
		t.Fatal("the backend was written")
	}
	if _, err := unix.Open(dev.BackingFile, unix.O_RDWR|unix.O_CLOEXEC, 0); err == nil {
		t.Fatalf("%s opened for writing", dev.BackingFile)
	}
}

func TestBackendErrorsBecomeEIO(t *testing.T) {
	mkfs := needSystem(t)
	files := testFiles(2)
	log, logs := testLogger(t)
	b := &failingBackend{Backend: loadImage(t, makeImage(t, mkfs, files, 32))}
	id := uniqueID(t, 0)
	dev := attach(t, NewFuseLoop(log), id, b, AttachOptions{ReadOnly: true, StateDir: t.TempDir()})
	target := mountDev(t, dev)

	b.fail.Store(true)
	// Nothing of the file has been read yet, so the read reaches the backend.
	testenv.Within(t, 30*time.Second, "read of a file on a failing disk", func() {
		_, err := os.ReadFile(filepath.Join(target, "dir1/file7"))
		if !errors.Is(err, syscall.EIO) {
			t.Errorf("read on a failing disk: %v, want EIO", err)
		}
	})
	testenv.Within(t, 30*time.Second, "O_DIRECT read of a failing device", func() {
		fd, err := unix.Open(dev.Path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Error(err)
			return
		}
		defer unix.Close(fd)
		if _, err := unix.Pread(fd, alignedBuffer(4096), 1<<20); !errors.Is(err, syscall.EIO) {
			t.Errorf("O_DIRECT read on a failing device: %v, want EIO", err)
		}
	})
	if s := logs.String(); !hasAll(s, "device read failed", "device="+id, "offset=", "length=", "registry said 503") {
		t.Errorf("log does not name the failed read:\n%s", s)
	}

	b.fail.Store(false)
	fd, err := unix.Open(dev.Path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if _, err := unix.Pread(fd, alignedBuffer(4096), 1<<20); err != nil {
		t.Fatalf("read after the backend recovered: %v", err)
	}
}

func TestConcurrentAttach(t *testing.T) {
	mkfs := needSystem(t)
	files := testFiles(3)
	img := makeImage(t, mkfs, files, 16)
	state := t.TempDir()
	f := NewFuseLoop(nil)
	const n = 8
	devs := make([]*Device, n)
	ids := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		ids[i] = uniqueID(t, i)
		b := loadImage(t, img)
		wg.Go(func() {
			devs[i], errs[i] = f.Attach(context.Background(), ids[i], b, AttachOptions{ReadOnly: true, StateDir: state})
		})
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, id := range ids {
			if err := f.Detach(context.Background(), id); err != nil {
				t.Error(err)
			}
		}
	})
	paths := map[string]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("Attach %d: %v", i, errs[i])
		}
		paths[devs[i].Path] = true
	}
	if len(paths) != n {
		t.Fatalf("%d devices share %d loop devices", n, len(paths))
	}
	targets := make([]string, n)
	for i := range n {
		targets[i] = mountDev(t, devs[i])
	}
	for i := range n {
		wg.Go(func() { checkFiles(t, targets[i], files) })
	}
	wg.Wait()
	if infos, err := ListAttached(state); err != nil || len(infos) != n {
		t.Fatalf("ListAttached found %d devices (%v), want %d", len(infos), err, n)
	}
	for i := range n {
		wg.Go(func() { errs[i] = f.Detach(context.Background(), ids[i]) })
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Errorf("Detach %d: %v", i, errs[i])
		}
		if !loopFree(t, devs[i].Path) || isMounted(t, targets[i]) {
			t.Errorf("device %d not cleaned up", i)
		}
	}
}

func TestConcurrentAttachSameID(t *testing.T) {
	needSystem(t)
	b := &memBackend{data: make([]byte, 1<<20)}
	f := NewFuseLoop(nil)
	id := uniqueID(t, 0)
	opts := AttachOptions{ReadOnly: true, StateDir: t.TempDir()}
	t.Cleanup(func() {
		if err := f.Detach(context.Background(), id); err != nil {
			t.Error(err)
		}
	})
	const n = 8
	devs := make([]*Device, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { devs[i], errs[i] = f.Attach(context.Background(), id, b, opts) })
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil || devs[i] != devs[0] {
			t.Fatalf("Attach %d = %p, %v; want %p", i, devs[i], errs[i], devs[0])
		}
	}
}

func TestServedByAnotherInstance(t *testing.T) {
	needSystem(t)
	state := t.TempDir()
	b := &memBackend{data: make([]byte, 1<<20)}
	id := uniqueID(t, 0)
	first := NewFuseLoop(nil)
	dev := attach(t, first, id, b, AttachOptions{ReadOnly: true, StateDir: state})

	second := NewFuseLoop(nil)
	if _, err := second.Attach(context.Background(), id, b, AttachOptions{ReadOnly: true, StateDir: state}); err == nil {
		t.Fatal("a second FuseLoop attached a device that the first one serves")
	}
	remain, err := second.Reconcile(context.Background(), state)
	if err != nil {
		t.Fatal(err)
	}
	if len(remain) != 1 || remain[0].Path != dev.Path || !remain[0].Served {
		t.Fatalf("Reconcile left %+v, want the served device %s", remain, dev.Path)
	}
	if loopFree(t, dev.Path) {
		t.Fatal("Reconcile detached a served device")
	}
	if err := second.Detach(context.Background(), id); err == nil {
		t.Fatal("a second FuseLoop detached a device that the first one serves")
	}
}

func TestUnmountIdempotent(t *testing.T) {
	testenv.Root(t)
	dir := t.TempDir()
	if err := Unmount(dir); err != nil {
		t.Fatalf("Unmount of a directory that is not a mount point: %v", err)
	}
	if err := Unmount(filepath.Join(dir, "missing")); err != nil {
		t.Fatalf("Unmount of a missing path: %v", err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	f, err := os.Create(filepath.Join(dir, "busy"))
	if err != nil {
		t.Fatal(err)
	}
	err = Unmount(dir)
	f.Close()
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("Unmount of a busy mount = %v, want ErrBusy", err)
	}
	if isMounted(t, dir) {
		t.Fatal("busy mount was not detached lazily")
	}
	t.Log(err)
}

// deadRangeBackend fails every read that touches [lo, hi), like a registry that cannot serve one blob range.
type deadRangeBackend struct {
	Backend
	lo, hi int64
}

func (d *deadRangeBackend) ReadAt(p []byte, off int64) (int, error) {
	if off < d.hi && off+int64(len(p)) > d.lo {
		return 0, errors.New("registry range unreachable")
	}
	return d.Backend.ReadAt(p, off)
}

// A read that crosses a range the backend cannot serve never returns wrong bytes or a short count as if it were
// the end: an O_DIRECT read of the device fails as a whole; a buffered read (which the kernel serves page by
// page) returns the correct bytes before the dead range, and the read at the dead range fails with EIO, again on
// every retry; a file on the mounted filesystem reads the same way; the rest of the device reads normally.
func TestDeadRangeNeverServesWrongData(t *testing.T) {
	mkfs := needSystem(t)
	log, _ := testLogger(t)
	img := makeImage(t, mkfs, testFiles(2), 32)
	want, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	const lo, hi = 3<<20 + 512<<10, 3<<20 + 640<<10
	b := &deadRangeBackend{Backend: loadImage(t, img), lo: lo, hi: hi}
	dev := attach(t, NewFuseLoop(log), uniqueID(t, 0), b, AttachOptions{ReadOnly: true, StateDir: t.TempDir()})

	testenv.Within(t, 60*time.Second, "reads across a dead range", func() {
		fd, err := unix.Open(dev.Path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Error(err)
			return
		}
		buf := alignedBuffer(1 << 20)
		if n, err := unix.Pread(fd, buf, 3<<20); !errors.Is(err, syscall.EIO) {
			t.Errorf("O_DIRECT read across the dead range: %d bytes, %v; want EIO", n, err)
		}
		unix.Close(fd)

		fd, err = unix.Open(dev.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Error(err)
			return
		}
		defer unix.Close(fd)
		sawEIO := false
		for off := int64(0); off < 8<<20; {
			p := make([]byte, 1<<20)
			n, err := unix.Pread(fd, p, off)
			if n > 0 && !bytes.Equal(p[:n], want[off:off+int64(n)]) {
				t.Errorf("buffered read at %d returned %d wrong bytes", off, n)
				return
			}
			// The kernel fails whole page-cache folios and block requests, so bytes near the dead range may fail too.
			near := off < hi+2<<20 && off+int64(len(p)) > lo-2<<20
			switch {
			case err != nil && !near:
				t.Errorf("buffered read at %d, far from the dead range: %v", off, err)
				return
			case err != nil && !errors.Is(err, syscall.EIO):
				t.Errorf("buffered read at %d (near the dead range): %v, want EIO", off, err)
				return
			case err != nil:
				sawEIO = true
				off += 64 << 10 // step over what cannot be read
			case n == 0:
				t.Errorf("buffered read at %d returned 0 bytes (end of device?) before the end", off)
				return
			default:
				if off <= lo && off+int64(n) > lo {
					t.Errorf("buffered read at %d returned %d bytes: it covers the dead range at %d", off, n, lo)
				}
				off += int64(n)
			}
		}
		if !sawEIO {
			t.Error("no buffered read failed: the dead range was read as if it were fine")
		}
	})
}

// The read-ahead of an attached loop device is the configured one, whatever the device had before.
func TestReadAheadIsSet(t *testing.T) {
	mkfs := needSystem(t)
	b := loadImage(t, makeImage(t, mkfs, testFiles(1), 32))
	log, _ := testLogger(t)
	for _, kb := range []int{2560, 48} {
		f := NewFuseLoop(log, WithReadAhead(kb))
		id := uniqueID(t, kb)
		dev, err := f.Attach(context.Background(), id, b, AttachOptions{ReadOnly: true, StateDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		idx, err := loopIndex(dev.Path)
		if err != nil {
			t.Fatal(err)
		}
		ra, err := readAhead(idx)
		if derr := f.Detach(context.Background(), id); derr != nil {
			t.Fatal(derr)
		}
		if err != nil || ra != kb {
			t.Fatalf("read_ahead_kb of %s = %d, %v; want %d", dev.Path, ra, err, kb)
		}
	}
}
