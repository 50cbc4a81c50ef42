package device

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/testenv"
)

// TestResumeAfterCrash kills the process serving a device held by a Holder while readers check its content with
// direct I/O, and lets a new FuseLoop take the device over: no read fails or returns wrong data, the reads that
// were waiting complete once the new server runs, and the loop device and its mount stay.
func TestResumeAfterCrash(t *testing.T) {
	mkfs := needSystem(t)
	files := testFiles(5)
	img := makeImage(t, mkfs, files, 32)
	want, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	socket := filepath.Join(t.TempDir(), "holder.sock")
	t.Cleanup(func() {
		if err := StopHolder(socket); err != nil {
			t.Error(err)
		}
	})
	id := uniqueID(t, 0)
	paths, child, exited := startServer(t, serveRequest{StateDir: state, Image: img, IDs: []string{id}, Holder: socket})
	loop := paths[id]
	target := mountDev(t, &Device{ID: id, Path: loop, ReadOnly: true})

	// Readers of the loop device, bypassing every cache, and of the mounted files.
	fd, err := unix.Open(loop, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	var (
		stop            atomic.Bool
		reads, failures atomic.Int64
		mu              sync.Mutex
		firstErr        error
		longest         time.Duration
		wg              sync.WaitGroup
	)
	fail := func(err error) {
		failures.Add(1)
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
	}
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 2))
			buf := alignedBuffer(128 << 10)
			for !stop.Load() {
				n := (1 + r.IntN(32)) * 4096
				off := int64(r.IntN(len(want)-n)) &^ 4095
				start := time.Now()
				got, err := unix.Pread(fd, buf[:n], off)
				d := time.Since(start)
				mu.Lock()
				longest = max(longest, d)
				mu.Unlock()
				reads.Add(1)
				switch {
				case err != nil:
					fail(err)
				case got != n || !bytes.Equal(buf[:n], want[off:off+int64(n)]):
					fail(os.ErrInvalid)
				}
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-exited
	killed := time.Now()
	before := reads.Load()
	// The device waits for a server: reads neither fail nor complete.
	time.Sleep(300 * time.Millisecond)
	if n := reads.Load() - before; n > 4 {
		t.Errorf("%d reads completed with no server", n)
	}

	f := NewFuseLoop(nil, WithHolder(NewHolder(socket, nil)))
	dev, err := f.Attach(context.Background(), id, openFileBackend(t, img), AttachOptions{ReadOnly: true, StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Detach(context.Background(), id); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	resumed := time.Since(killed)
	if dev.Path != loop {
		t.Errorf("resumed device is %s, want the same loop device %s", dev.Path, loop)
	}
	time.Sleep(300 * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	if failures.Load() > 0 {
		t.Fatalf("%d of %d reads failed across the crash; first: %v", failures.Load(), reads.Load(), firstErr)
	}
	if reads.Load() <= before+4 {
		t.Fatalf("reads did not go on after the resume: %d before, %d after", before, reads.Load())
	}
	checkFiles(t, target, files)
	t.Logf("%d reads, none failed; resumed %v after the kill, longest read %v", reads.Load(), resumed.Round(time.Millisecond), longest.Round(time.Millisecond))
}

// TestReconcileDropsHeldDevices kills the process serving two held devices; a new FuseLoop resumes one and
// reconciles: the other's held connection is dropped and the device removed with its mount (nothing hangs), the
// resumed one stays.
func TestReconcileDropsHeldDevices(t *testing.T) {
	mkfs := needSystem(t)
	files := testFiles(6)
	img := makeImage(t, mkfs, files, 32)
	state := t.TempDir()
	socket := filepath.Join(t.TempDir(), "holder.sock")
	t.Cleanup(func() {
		if err := StopHolder(socket); err != nil {
			t.Error(err)
		}
	})
	ids := []string{uniqueID(t, 0), uniqueID(t, 1)}
	paths, child, exited := startServer(t, serveRequest{StateDir: state, Image: img, IDs: ids, Holder: socket})
	targets := []string{mountDev(t, &Device{ID: ids[0], Path: paths[ids[0]], ReadOnly: true}), mountDev(t, &Device{ID: ids[1], Path: paths[ids[1]], ReadOnly: true})}
	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-exited

	f := NewFuseLoop(nil, WithHolder(NewHolder(socket, nil)))
	t.Cleanup(func() {
		for _, id := range ids {
			if err := f.Detach(context.Background(), id); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	if _, err := f.Attach(context.Background(), ids[0], openFileBackend(t, img), AttachOptions{ReadOnly: true, StateDir: state}); err != nil {
		t.Fatal(err)
	}
	var remain []AttachedInfo
	testenv.Within(t, 30*time.Second, "Reconcile", func() {
		var err error
		if remain, err = f.Reconcile(context.Background(), state); err != nil {
			t.Error(err)
		}
	})
	if len(remain) != 1 || remain[0].ID != ids[0] || !remain[0].Served {
		t.Fatalf("Reconcile left %+v, want only %s, served", remain, ids[0])
	}
	if isMounted(t, targets[1]) || !loopFree(t, paths[ids[1]]) {
		t.Fatalf("the dropped device %s is still mounted or bound", paths[ids[1]])
	}
	h := NewHolder(socket, nil)
	defer h.Close()
	held, err := h.List()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := held[ids[1]]; ok || len(held) != 1 {
		t.Fatalf("the holder holds %v, want only %s", held, ids[0])
	}
	checkFiles(t, targets[0], files)
}

// TestLoopExhaustion attaches when the kernel has no free loop device: a clear error, and nothing half-attached (no
// FUSE mount, no device directory, nothing held).
func TestLoopExhaustion(t *testing.T) {
	mkfs := needSystem(t)
	img := makeImage(t, mkfs, testFiles(7), 32)
	state := t.TempDir()
	socket := filepath.Join(t.TempDir(), "holder.sock")
	t.Cleanup(func() {
		if err := StopHolder(socket); err != nil {
			t.Error(err)
		}
	})
	saved := getFreeLoop
	getFreeLoop = func(int) (int, error) { return 0, unix.ENOSPC }
	defer func() { getFreeLoop = saved }()
	h := NewHolder(socket, nil)
	defer h.Close()
	f := NewFuseLoop(nil, WithHolder(h))
	id := uniqueID(t, 0)
	_, err := f.Attach(context.Background(), id, openFileBackend(t, img), AttachOptions{ReadOnly: true, StateDir: state})
	if err == nil || !strings.Contains(err.Error(), "no free loop device") {
		t.Fatalf("Attach without a free loop device: %v", err)
	}
	if ents, _ := os.ReadDir(state); len(ents) > 0 {
		t.Errorf("left in the state directory: %v", ents)
	}
	mounts, err := readMountInfo()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mounts {
		if strings.HasPrefix(m.mountPoint, state+"/") {
			t.Errorf("left mounted: %s", m.mountPoint)
		}
	}
	if held, err := h.List(); err != nil || len(held) > 0 {
		t.Errorf("the holder holds %v (%v)", held, err)
	}
	// Once loop devices are free again, the same id attaches.
	getFreeLoop = saved
	dev := attach(t, f, id, openFileBackend(t, img), AttachOptions{ReadOnly: true, StateDir: state})
	mountDev(t, dev)
}
