package device

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/obdproject/obd/internal/testenv"
)

// needSystem skips unless the test can attach devices: root, /dev/fuse, /dev/loop-control and mkfs.ext4.
func needSystem(t testing.TB) string {
	t.Helper()
	testenv.Root(t)
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			testenv.Skip(t, p+" is missing")
		}
	}
	return testenv.Tools(t, "mkfs.ext4")[0]
}

// testFiles returns the content of a small filesystem: name → data.
func testFiles(seed uint64) map[string][]byte {
	r := rand.New(rand.NewPCG(seed, 1))
	files := map[string][]byte{}
	for i, size := range []int{0, 1, 4095, 4096, 4097, 100_000, 1 << 20, 3<<20 + 17} {
		b := make([]byte, size)
		for j := range b {
			b[j] = byte(r.Uint32())
		}
		files[fmt.Sprintf("dir%d/file%d", i%3, i)] = b
	}
	return files
}

// makeImage writes files into a fresh ext4 image of sizeMiB MiB made by mkfs.ext4 -d and returns its path.
func makeImage(t testing.TB, mkfs string, files map[string][]byte, sizeMiB int) string {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	for name, data := range files {
		p := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	img := filepath.Join(dir, "disk.img")
	out, err := exec.Command(mkfs, "-q", "-F", "-b", "4096", "-d", src, img, fmt.Sprintf("%dM", sizeMiB)).CombinedOutput()
	if err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	return img
}

// memBackend is a disk in memory; it is writable.
type memBackend struct {
	mu   sync.RWMutex
	data []byte
}

func (m *memBackend) Size() int64 { return int64(len(m.data)) }

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memBackend) Discard(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	return nil
}

func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off+int64(len(p)) > int64(len(m.data)) {
		return 0, errors.New("write beyond the end")
	}
	return copy(m.data[off:], p), nil
}

// failingBackend fails every read once fail is set.
type failingBackend struct {
	Backend
	fail atomic.Bool
}

func (f *failingBackend) ReadAt(p []byte, off int64) (int, error) {
	if f.fail.Load() {
		return 0, errors.New("registry said 503")
	}
	return f.Backend.ReadAt(p, off)
}

// fileBackend serves a disk image file.
type fileBackend struct {
	*os.File
	size int64
}

func (f fileBackend) Size() int64 { return f.size }

func openFileBackend(t testing.TB, path string) fileBackend {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return fileBackend{File: f, size: st.Size()}
}

func loadImage(t testing.TB, path string) *memBackend {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return &memBackend{data: data}
}

func testLogger(t testing.TB) (*slog.Logger, *testenv.Buffer) {
	buf := &testenv.Buffer{}
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug})), buf
}

// uniqueID returns a device id no other test (or concurrent test run) uses.
func uniqueID(t testing.TB, n int) string {
	return fmt.Sprintf("%s/%d/%d:%d", t.Name(), os.Getpid(), n, time.Now().UnixNano())
}

// attach attaches b and detaches it when the test ends.
func attach(t testing.TB, f *FuseLoop, id string, b Backend, opts AttachOptions) *Device {
	t.Helper()
	dev, err := f.Attach(context.Background(), id, b, opts)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	t.Cleanup(func() {
		if err := f.Detach(context.Background(), id); err != nil {
			t.Errorf("cleanup: Detach %s: %v", id, err)
		}
	})
	return dev
}

// mountDev mounts dev read-only as ext4 on a new directory and unmounts it when the test ends.
func mountDev(t testing.TB, dev *Device) string {
	t.Helper()
	target := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := dev.Mount(context.Background(), target, "ext4", []string{"ro"}); err != nil {
		t.Fatalf("Mount: %v", err)
	}
	t.Cleanup(func() {
		if err := Unmount(target); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return target
}

// checkFiles compares the files under dir with files.
func checkFiles(t testing.TB, dir string, files map[string][]byte) {
	t.Helper()
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatalf("read %s: %v", name, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: content differs (%d bytes, want %d)", name, len(got), len(want))
		}
	}
}

// isMounted reports whether something is mounted at path.
func isMounted(t testing.TB, path string) bool {
	t.Helper()
	mounts, err := readMountInfo()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mounts {
		if m.mountPoint == path {
			return true
		}
	}
	return false
}

// loopFree reports whether loop device path is unbound.
func loopFree(t testing.TB, path string) bool {
	t.Helper()
	idx, err := loopIndex(path)
	if err != nil {
		t.Fatal(err)
	}
	return loopBackingFile(idx) == ""
}

func hasAll(s string, subs ...string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}

// alignedBuffer returns a buffer of n bytes aligned for O_DIRECT.
func alignedBuffer(n int) []byte {
	b := make([]byte, n+4096)
	off := 4096 - int(uintptr(unsafe.Pointer(&b[0]))&4095)
	return b[off : off+n : off+n]
}
