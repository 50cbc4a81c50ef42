package convert

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/testenv"
	"github.com/obdproject/obd/internal/testimage"
	"github.com/obdproject/obd/zfile"
)

// TestConvertDebianImage converts a real three-layer image built from Debian packages (busybox, glibc, python3 and
// a layer of whiteouts, hardlinks, setuid and capabilities), proves the converted tree equal to the source tree,
// checks the disk with e2fsck and, as root, mounts it with the kernel's ext4 and runs programs from it.
func TestConvertDebianImage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a 50 MB image from Debian packages")
	}
	testenv.Tools(t, "mke2fs")
	testenv.Tools(t, "e2fsck")
	src := testimage.BuildForTest(t, testimage.Small)
	t.Logf("source: %d layers, %d MB of tar", len(src.Layers), src.TarBytes()>>20)

	res := convertLayout(t, src.Ref, ImageOptions{VirtualSize: 4 << 30, ZFile: zfile.Options{Workers: 2}})
	for stage, d := range res.Timings {
		t.Logf("stage %s: %s", stage, d)
	}
	out := storeResult(t, res, filepath.Join(t.TempDir(), "out"), "obd")
	img, err := image.OpenLocal(out, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()

	want := compareWithSource(t, src.Ref, img.Stack)
	if _, ok := want["/"+testimage.WhiteoutPath]; ok {
		t.Errorf("source tree still holds the whited-out %s", testimage.WhiteoutPath)
	}
	if len(want) < 2000 {
		t.Errorf("source tree has only %d paths", len(want))
	}

	raw := fsckStack(t, img.Stack)

	if os.Geteuid() != 0 {
		t.Log("not root: skipping the kernel mount and chroot checks")
		return
	}
	mnt := mountRO(t, raw)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"/bin/busybox", "echo", "ok"}, "ok\n"},
		{[]string{"/bin/sh", "-c", "echo $((6*7))"}, "42\n"}, // bin/sh is a hardlink to bin/busybox across layers
		{[]string{"/usr/bin/python3", "-c", "import json, hashlib; print(json.dumps(hashlib.sha256(b'').hexdigest()[:8]))"}, "\"e3b0c442\"\n"},
		{[]string{"/bin/busybox", "cat", "/" + testimage.ReplacedPath}, testimage.ReplacedBody},
	} {
		cmd := exec.Command("chroot", append([]string{mnt}, c.args...)...)
		cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C"}
		b, err := cmd.CombinedOutput()
		t.Logf("chroot MNT %s: %q", strings.Join(c.args, " "), b)
		if err != nil || string(b) != c.want {
			t.Errorf("chroot %s %s: %v, output %q, want %q", mnt, strings.Join(c.args, " "), err, b, c.want)
		}
	}
	// What the kernel sees of the config layer's special entries.
	at := func(p string) string { return filepath.Join(mnt, p) }
	if _, err := os.Lstat(at(testimage.WhiteoutPath)); !os.IsNotExist(err) {
		t.Errorf("%s: whited out, but lstat says %v", testimage.WhiteoutPath, err)
	}
	if ents, err := os.ReadDir(at(testimage.OpaqueDir)); err != nil || len(ents) != 1 || ents[0].Name() != "README.obd" {
		t.Errorf("opaque %s: entries %v, %v; want only README.obd", testimage.OpaqueDir, ents, err)
	}
	if st, err := os.Stat(at(testimage.SetuidPath)); err != nil || st.Mode()&os.ModeSetuid == 0 {
		t.Errorf("%s: want setuid, got %v %v", testimage.SetuidPath, st.Mode(), err)
	}
	capBuf := make([]byte, 64)
	if n, err := unix.Lgetxattr(at(testimage.CapPath), "security.capability", capBuf); err != nil || string(capBuf[:n]) != testimage.CapValue {
		t.Errorf("%s: security.capability %q, %v; want %q", testimage.CapPath, capBuf[:max(n, 0)], err, testimage.CapValue)
	}
	ino := func(p string) uint64 {
		var st syscall.Stat_t
		if err := syscall.Lstat(at(p), &st); err != nil {
			t.Errorf("lstat %s: %v", p, err)
		}
		return st.Ino
	}
	if ino(testimage.HardlinkPath) != ino("bin/busybox") || ino(testimage.InLayerLink) != ino("etc/obd/app.conf") {
		t.Errorf("hardlinks do not share inodes")
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(at(testimage.OwnedPath), &st); err != nil || st.Uid != 1000 || st.Gid != 1000 {
		t.Errorf("%s: owner %d:%d, %v; want 1000:1000", testimage.OwnedPath, st.Uid, st.Gid, err)
	}
}

// mountRO mounts a raw ext4 disk image read-only on a new directory through a loop device (which the kernel
// detaches on unmount) and unmounts it when the test ends.
func mountRO(t *testing.T, raw string) string {
	t.Helper()
	testenv.Tools(t, "mount", "umount", "chroot")
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "ext4", "-o", "loop,ro", raw, mnt).CombinedOutput(); err != nil {
		testenv.Skip(t, "mount -o loop,ro: "+strings.TrimSpace(string(out))+": "+err.Error())
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", mnt, err, out)
		}
	})
	return mnt
}
