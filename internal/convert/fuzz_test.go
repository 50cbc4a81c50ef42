package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/testenv"
)

// memDev is an in-memory ext4.Device.
type memDev []byte

func (m memDev) ReadAt(p []byte, off int64) (int, error)  { return copy(p, m[off:]), nil }
func (m memDev) WriteAt(p []byte, off int64) (int, error) { return copy(m[off:], p), nil }
func (m memDev) Size() int64                              { return int64(len(m)) }

var (
	fuzzOnce     sync.Once
	fuzzTemplate memDev
	fuzzErr      error
)

// FuzzApply feeds arbitrary bytes to Apply on a small filesystem: it may
// fail, but must not panic, and must leave a filesystem e2fsck finds clean.
func FuzzApply(f *testing.F) {
	e2fsck := testenv.Tools(f, "e2fsck")[0]
	testenv.Tools(f, "mke2fs")
	f.Add(layer1(f))
	f.Add(layer2(f))
	f.Add(append(sparseEntry("s", 1<<20, []sparseChunk{{4096, []byte("x")}}), endTar...))
	f.Add(buildTar(f, dirE("a/", 0o755), fileE("a/.wh..wh..opq", 0, ""), fileE("a/b", 0o644, "b"),
		linkE(tar.TypeLink, "a/c", "a/b"), linkE(tar.TypeSymlink, "a/d", "../a"), fileE("a/d/e", 0o600, "e")))
	f.Add([]byte{})
	// Huge sparse files, in each format: their holes cost nothing.
	huge := []sparseChunk{{0, []byte("head")}, {4 << 40, []byte("middle")}, {8<<40 - 4, []byte("tail")}}
	f.Add(append(sparseEntry("huge", 8<<40, huge), endTar...))
	f.Add(append(pax01SparseEntry("huge", 8<<40, huge), endTar...))
	f.Add(append(oldGNUSparseEntry("huge", 8<<40, huge), endTar...))
	// A directory replaced, or led elsewhere, later in its layer.
	f.Add(buildTar(f, owned(dirE("usr/bin/x/", 0o4755), 0, 0), owned(fileE("usr/bin/x", 0o755, "x"), 1000, 1000)))
	f.Add(buildTar(f, dirE("etc/secret/", 0o700), owned(dirE("a/secret/", 0o777), 1000, 1000), linkE(tar.TypeSymlink, "a", "/etc")))
	f.Add(buildTar(f, dirE("a/", 0o755), linkE(tar.TypeSymlink, "l", "a"), owned(dirE("a/x/", 0o4755), 0, 0),
		fileE("l/.wh.x", 0, ""), owned(fileE("a/x", 0o755, "x"), 1000, 1000)))
	f.Add(buildTar(f, fileE("data/f", 0o755, "f"), dirE("usr/bin/x/", 0o4755), linkE(tar.TypeLink, "usr/bin/x", "data/f")))
	f.Add(buildTar(f, linkE(tar.TypeSymlink, "a", "/missing"), fileE("a/b", 0o644, "b")))
	f.Fuzz(func(t *testing.T, layer []byte) {
		fuzzOnce.Do(func() {
			fuzzTemplate = make(memDev, 32<<20)
			fuzzErr = ext4.Mkfs(context.Background(), fuzzTemplate, mkfsOpts)
		})
		if fuzzErr != nil {
			t.Fatal(fuzzErr)
		}
		dev := append(memDev(nil), fuzzTemplate...)
		fsys, err := ext4.Open(dev, true)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, applyErr := Apply(ctx, fsys, bytes.NewReader(layer), ApplyOptions{})
		if err := fsys.Close(); err != nil {
			t.Fatalf("close after apply (error %v): %v", applyErr, err)
		}
		img := filepath.Join(t.TempDir(), "fs.img")
		if err := os.WriteFile(img, dev, 0o600); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(e2fsck, "-fn", img).CombinedOutput(); err != nil {
			t.Fatalf("e2fsck after apply (error %v): %v\n%s", applyErr, err, out)
		}
	})
}
