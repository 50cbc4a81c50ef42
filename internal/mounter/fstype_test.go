package mounter

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/testenv"
)

// An image whose layers say blob-fs-type erofs (upstream's erofs images) is mounted as erofs: its files read as
// made. A filesystem obd does not mount, a mount option that would reach beyond the image, and a writable layer
// over erofs are refused with a clear error.
func TestBlobFsType(t *testing.T) {
	needSystem(t)
	src := t.TempDir()
	files := map[string]string{"etc/motd": "motd from an erofs image\n", "app/data.txt": strings.Repeat("data ", 3000)}
	for name, body := range files {
		p := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("data.txt", filepath.Join(src, "app/link")); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "erofs.img")
	if out, err := exec.Command(testenv.Tools(t, "mkfs.erofs")[0], "--quiet", img, src).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.erofs: %v\n%s", err, out)
	}
	blob := imageLayer(t, img)

	s := newSetup(t)
	reg := newFakeRegistry(t, blob)
	m := s.newMounter(mounterOptions{registry: reg, cache: s.openCache(64 << 10), metadata: 16 << 20})
	layer := reg.layer()
	layer.FsType = "erofs;user_xattr"
	target := filepath.Join(s.root, "mnt")
	if err := m.Mount(context.Background(), "erofs", []snapshotter.Layer{layer}, target); err != nil {
		t.Fatal(err)
	}
	for name, body := range files {
		if b, err := readWithin(t, filepath.Join(target, name), time.Minute); err != nil || string(b) != body {
			t.Errorf("%s: %q, %v", name, b, err)
		}
	}
	if l, err := os.Readlink(filepath.Join(target, "app/link")); err != nil || l != "data.txt" {
		t.Errorf("app/link: %q, %v", l, err)
	}
	if mi := mountsUnder(t, s.root); !containsFS(mi, target, "erofs") {
		t.Errorf("%s is not an erofs mount: %+v", target, mi)
	}
	if err := m.Unmount(context.Background(), "erofs", target); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct{ fs, want string }{
		{"xfs", `filesystem "xfs"`},
		{"erofs;device=/dev/sda", `mount option "device=/dev/sda"`},
		{"ext4;nodev,errors=panic", `mount option "errors=panic"`},
	} {
		l := reg.layer()
		l.FsType = c.fs
		err := m.Mount(context.Background(), "bad", []snapshotter.Layer{l}, filepath.Join(s.root, "bad"))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("blob-fs-type %q: %v, want an error about %s", c.fs, err, c.want)
		}
	}
	if _, err := m.MountWritable(context.Background(), "rw", []snapshotter.Layer{layer}, "", snapshotter.WritableLayer{Dir: filepath.Join(s.root, "rw")},
		filepath.Join(s.root, "rwmnt")); err == nil || !strings.Contains(err.Error(), "needs an ext4 image") {
		t.Errorf("writable layer over erofs: %v", err)
	}
}

func containsFS(ms []mountEntry, point, fsType string) bool {
	for _, m := range ms {
		if m.point == point && m.fsType == fsType {
			return true
		}
	}
	return false
}
