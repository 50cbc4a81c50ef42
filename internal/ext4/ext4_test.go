package ext4

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/testenv"
)

// recDev records what is written to a device.
type recDev struct {
	Device
	mu      sync.Mutex
	written int64
	writes  int
	hash    [32]byte
}

func (d *recDev) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	d.written += int64(len(p))
	d.writes++
	h := sha256.New()
	h.Write(d.hash[:])
	fmt.Fprintf(h, "%d:", off)
	h.Write(p)
	copy(d.hash[:], h.Sum(nil))
	d.mu.Unlock()
	return d.Device.WriteAt(p, off)
}

func TestMkfs64GiB(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	const size = 64 << 30
	var hashes [2][32]byte
	for i := range hashes {
		dev, img := newFileDev(t, size)
		rec := &recDev{Device: dev}
		start := time.Now()
		opts := MkfsOptions{UUID: "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d", Timestamp: 1700000000, Label: "obd"}
		if err := Mkfs(context.Background(), rec, opts); err != nil {
			t.Fatal(err)
		}
		t.Logf("mkfs 64 GiB: %v, %d bytes written in %d writes", time.Since(start), rec.written, rec.writes)
		if rec.written > 64<<20 {
			t.Errorf("mkfs wrote %d bytes, want a few MiB", rec.written)
		}
		hashes[i] = rec.hash
		testenv.Fsck(t, img)
		out := testenv.Debugfs(t, img, "stats")
		for _, want := range []string{
			"Filesystem UUID:          0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d",
			"Filesystem volume name:   obd",
			"Last write time:          Tue Nov 14 22:13:20 2023",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("debugfs stats lacks %q:\n%s", want, out)
			}
		}
		if strings.Contains(out, "has_journal") {
			t.Errorf("journal created:\n%s", out)
		}
		checkFirst128K(t, out)
	}
	if hashes[0] != hashes[1] {
		t.Error("two Mkfs runs with the same options wrote different bytes")
	}
}

func TestMkfsDerivedUUID(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	var out [2]string
	for i := range out {
		dev, img := newFileDev(t, 256<<20)
		if err := Mkfs(context.Background(), dev, MkfsOptions{}); err != nil {
			t.Fatal(err)
		}
		out[i] = regexp.MustCompile(`Filesystem UUID: +(\S+)`).FindString(testenv.Debugfs(t, img, "stats"))
	}
	if out[0] == "" || out[0] != out[1] {
		t.Errorf("derived UUIDs differ or missing: %q %q", out[0], out[1])
	}
	if err := Mkfs(context.Background(), &fileDev{size: 1 << 20}, MkfsOptions{UUID: "nope"}); err == nil {
		t.Error("bad UUID accepted")
	}
}

var t0 = time.Date(2021, 3, 4, 5, 6, 7, 123456789, time.UTC)

func meta(mode uint32, uid, gid uint32) Meta {
	return Meta{Mode: mode, UID: uid, GID: gid, Atime: t0.Add(time.Second), Mtime: t0, Ctime: t0.Add(2 * time.Second)}
}

// patterned returns n bytes of a non-zero pattern.
func patterned(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed | 1
	}
	return b
}

func TestOperations(t *testing.T) {
	f, _, img := newTestFS(t, 2<<30)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(f.Mkdir("/etc", meta(0o755, 0, 0)))
	must(f.Mkdir("/etc/sub", meta(0o1777, 5, 6)))
	small := []byte("hello world\n")
	must(f.CreateFile("/etc/hello", meta(0o4755, 1000, 100000), bytes.NewReader(small), int64(len(small))))
	// A file with a hole in the middle and a partial last block.
	holey := append(append(patterned(8192, 1), make([]byte, 64<<10)...), patterned(5000, 2)...)
	must(f.CreateFile("/etc/holey", meta(0o644, 0, 0), bytes.NewReader(holey), int64(len(holey))))
	// Large enough for several extents worth of buffer refills.
	big := patterned(3<<20+17, 3)
	must(f.CreateFile("/big", meta(0o600, 0, 0), bytes.NewReader(big), int64(len(big))))
	must(f.CreateFile("/empty", meta(0o644, 0, 0), bytes.NewReader(nil), 0))
	must(f.Symlink("/etc/fast", "hello", meta(0o777, 0, 0)))
	slowTarget := strings.Repeat("long/", 40) + "end"
	must(f.Symlink("/etc/slow", slowTarget, meta(0o777, 0, 0)))
	must(f.Link("/etc/hello2", "/etc/hello"))
	must(f.Mknod("/etc/null", ModeChar, 1, 3, meta(0o666, 0, 0)))
	must(f.Mknod("/etc/bigdev", ModeBlock, 259, 70000, meta(0o660, 0, 6)))
	must(f.Mknod("/etc/fifo", ModeFIFO, 0, 0, meta(0o644, 0, 0)))
	must(f.Mknod("/etc/sock", ModeSocket, 0, 0, meta(0o755, 0, 0)))
	capXattr := []byte{0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	must(f.SetXattr("/etc/hello", "security.capability", capXattr))
	must(f.SetXattr("/etc/hello", "user.comment", []byte("hi")))
	must(f.SetXattr("/etc/hello", "trusted.overlay.opaque", []byte("y")))
	must(f.SetXattr("/etc/fast", "user.onlink", []byte("l")))
	// ACL user::rwx, user:1000:r-x, group::r-x, mask::r-x, other::r-x in VFS format.
	acl := []byte{2, 0, 0, 0,
		1, 0, 7, 0, 0xff, 0xff, 0xff, 0xff,
		2, 0, 5, 0, 0xe8, 3, 0, 0,
		4, 0, 5, 0, 0xff, 0xff, 0xff, 0xff,
		0x10, 0, 5, 0, 0xff, 0xff, 0xff, 0xff,
		0x20, 0, 5, 0, 0xff, 0xff, 0xff, 0xff}
	must(f.SetXattr("/etc/sub", "system.posix_acl_access", acl))
	must(f.SetXattr("/etc/sub", "system.posix_acl_default", acl))
	must(f.SetXattr("/etc/hello", "user.gone", []byte("bye")))
	must(f.RemoveXattr("/etc/hello", "user.gone"))
	if err := f.RemoveXattr("/etc/hello", "user.gone"); !errors.Is(err, syscall.ENODATA) {
		t.Errorf("removing a missing xattr: %v", err)
	}
	if err := f.SetXattr("/etc/hello", "bogus.name", nil); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("xattr in unknown namespace: %v", err)
	}
	bigX := bytes.Repeat([]byte("x"), 3000) // does not fit in the inode
	must(f.SetXattr("/etc/holey", "user.big", bigX))

	if err := f.Mkdir("/etc", meta(0o755, 0, 0)); !errors.Is(err, fs.ErrExist) {
		t.Errorf("Mkdir existing: %v", err)
	}
	if err := f.CreateFile("/nope/x", Meta{}, bytes.NewReader(nil), 0); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("create in missing dir: %v", err)
	}
	if err := f.Mkdir("/etc/hello/x", Meta{}); !errors.Is(err, syscall.ENOTDIR) {
		t.Errorf("mkdir under file: %v", err)
	}
	if err := f.Link("/etc/dirlink", "/etc/sub"); !errors.Is(err, syscall.EPERM) {
		t.Errorf("hardlink to dir: %v", err)
	}
	if err := f.CreateFile("/short", Meta{}, bytes.NewReader([]byte("ab")), 10); err == nil {
		t.Error("short reader accepted")
	}
	// Symlinked directories are followed inside the root.
	must(f.Symlink("/lnk", "../../etc", meta(0o777, 0, 0)))
	must(f.CreateFile("/lnk/via", meta(0o644, 0, 0), strings.NewReader("v"), 1))

	// Remove a tree with a file that has another link outside it.
	must(f.Mkdir("/tree", meta(0o755, 0, 0)))
	must(f.Mkdir("/tree/a", meta(0o755, 0, 0)))
	must(f.CreateFile("/tree/a/f", meta(0o644, 0, 0), bytes.NewReader(big[:100000]), 100000))
	must(f.Link("/keep", "/tree/a/f"))
	must(f.SetXattr("/tree/a/f", "user.big", bigX))
	must(f.CreateFile("/tree/gone", meta(0o644, 0, 0), bytes.NewReader(big[:50000]), 50000))
	must(f.Remove("/tree"))
	must(f.Remove("/empty"))
	if _, err := f.Lstat("/tree"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("removed tree still there: %v", err)
	}
	must(f.SetMeta("/etc", Meta{Mode: 0o750, UID: 7, GID: 8, Atime: t0, Mtime: t0.Add(time.Hour), Ctime: t0}))
	must(f.Close())
	testenv.Fsck(t, img)

	// Reopen read-only and check through our API.
	dev, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	fi, _ := dev.Stat()
	r, err := Open(&fileDev{File: dev, size: fi.Size()}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := r.Mkdir("/x", Meta{}); !errors.Is(err, syscall.EROFS) {
		t.Errorf("mkdir on read-only fs: %v", err)
	}
	check := func(p string, mode, uid, gid, nlink uint32, size int64) *Stat {
		t.Helper()
		st, err := r.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode != mode || st.UID != uid || st.GID != gid || st.Nlink != nlink || st.Size != size {
			t.Errorf("%s: mode %o uid %d gid %d nlink %d size %d, want %o %d %d %d %d",
				p, st.Mode, st.UID, st.GID, st.Nlink, st.Size, mode, uid, gid, nlink, size)
		}
		return st
	}
	st := check("/etc/hello", ModeRegular|0o4755, 1000, 100000, 2, int64(len(small)))
	if !st.Mtime.Equal(t0) || !st.Atime.Equal(t0.Add(time.Second)) || !st.Ctime.Equal(t0.Add(2*time.Second)) {
		t.Errorf("times: %v %v %v", st.Atime, st.Mtime, st.Ctime)
	}
	check("/etc", ModeDir|0o750, 7, 8, 3, 4096)
	check("/etc/sub", ModeDir|0o1777, 5, 6, 2, 4096)
	check("/", ModeDir|0o755, 0, 0, 4, 4096) // ., .., etc, lost+found
	check("/etc/fast", ModeSymlink|0o777, 0, 0, 1, 5)
	check("/etc/slow", ModeSymlink|0o777, 0, 0, 1, int64(len(slowTarget)))
	if st := check("/etc/bigdev", ModeBlock|0o660, 0, 6, 1, 0); st.Major != 259 || st.Minor != 70000 {
		t.Errorf("bigdev %d:%d", st.Major, st.Minor)
	}
	if st := check("/etc/null", ModeChar|0o666, 0, 0, 1, 0); st.Major != 1 || st.Minor != 3 {
		t.Errorf("null %d:%d", st.Major, st.Minor)
	}
	check("/etc/fifo", ModeFIFO|0o644, 0, 0, 1, 0)
	check("/etc/sock", ModeSocket|0o755, 0, 0, 1, 0)
	check("/keep", ModeRegular|0o644, 0, 0, 1, 100000)
	hst := check("/etc/holey", ModeRegular|0o644, 0, 0, 1, int64(len(holey)))
	if hst.Blocks != (8192+8192)/512+8 { // data blocks + xattr block
		t.Errorf("holey file uses %d sectors", hst.Blocks)
	}
	for p, want := range map[string][]byte{"/etc/hello": small, "/etc/holey": holey, "/big": big, "/etc/via": []byte("v"), "/keep": big[:100000]} {
		fl, err := r.OpenFile(p)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(io.NewSectionReader(fl, 0, fl.Size()))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: content differs (%d vs %d bytes) err %v", p, len(got), len(want), err)
		}
		fl.Close()
	}
	for p, want := range map[string]string{"/etc/fast": "hello", "/etc/slow": slowTarget} {
		if got, err := r.Readlink(p); err != nil || got != want {
			t.Errorf("readlink %s = %q, %v", p, got, err)
		}
	}
	names, err := r.ListXattrs("/etc/hello")
	if err != nil || strings.Join(names, ",") != "security.capability,trusted.overlay.opaque,user.comment" {
		t.Errorf("xattrs %v %v", names, err)
	}
	if v, err := r.GetXattr("/etc/hello", "security.capability"); err != nil || !bytes.Equal(v, capXattr) {
		t.Errorf("capability %x %v", v, err)
	}
	if v, err := r.GetXattr("/etc/sub", "system.posix_acl_access"); err != nil || !bytes.Equal(v, acl) {
		t.Errorf("acl %x %v", v, err)
	}
	if v, err := r.GetXattr("/etc/holey", "user.big"); err != nil || !bytes.Equal(v, bigX) {
		t.Errorf("big xattr %d bytes, %v", len(v), err)
	}
	if _, err := r.GetXattr("/etc/hello", "user.none"); !errors.Is(err, syscall.ENODATA) {
		t.Errorf("missing xattr: %v", err)
	}
	ents, err := r.ReadDir("/etc")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, fmt.Sprintf("%s:%o", e.Name, e.Mode>>12))
	}
	if s := strings.Join(got, " "); s != "bigdev:6 fast:12 fifo:1 hello:10 hello2:10 holey:10 null:2 slow:12 sock:14 sub:4 via:10" {
		t.Errorf("readdir: %s", s)
	}

	// Independent view through debugfs.
	out := testenv.Debugfs(t, img, "stat /etc/hello")
	for _, want := range []string{"Mode:  04755", "User:  1000   Group: 100000", "Links: 2",
		"mtime: 0x60406abf:1d6f3454", "Size: 12"} {
		if !strings.Contains(out, want) {
			t.Errorf("debugfs stat /etc/hello lacks %q:\n%s", want, out)
		}
	}
	out = testenv.Debugfs(t, img, "ea_list /etc/hello")
	if !strings.Contains(out, "security.capability (20)") || !strings.Contains(out, `user.comment (2) = "hi"`) {
		t.Errorf("ea_list:\n%s", out)
	}
	out = testenv.Debugfs(t, img, "ea_list /etc/sub")
	// Stored in the ext4 on-disk ACL format.
	if !strings.Contains(out, "system.posix_acl_access (28) = 01 00 00 00 01 00 07 00 02 00 05 00 e8 03 00 00") {
		t.Errorf("ea_list acl:\n%s", out)
	}
	if out = testenv.Debugfs(t, img, "stat /etc/bigdev"); !strings.Contains(out, "Device major/minor number: 259:70000") {
		t.Errorf("debugfs bigdev:\n%s", out)
	}
	if out = testenv.Debugfs(t, img, "stat /etc/slow"); !strings.Contains(out, "Type: symlink") {
		t.Errorf("debugfs slow symlink:\n%s", out)
	}
	dump := filepath.Join(t.TempDir(), "holey")
	testenv.Debugfs(t, img, "dump /etc/holey "+dump)
	if b, err := os.ReadFile(dump); err != nil || !bytes.Equal(b, holey) {
		t.Errorf("debugfs dump differs: %v", err)
	}
}

// TestIndexedDirectory edits a hash-indexed directory (as the kernel makes
// them), which goes through libext2fs's own htree code.
func TestIndexedDirectory(t *testing.T) {
	f, dev, img := newTestFS(t, 256<<20)
	if err := f.Mkdir("/d", meta(0o755, 0, 0)); err != nil {
		t.Fatal(err)
	}
	for i := range 2000 {
		if err := f.CreateFile(fmt.Sprintf("/d/entry-with-a-long-name-%04d", i), meta(0o644, 0, 0), strings.NewReader("x"), 1); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	// e2fsck -D builds the htree index.
	if out, err := exec.Command(testenv.Tools(t, "e2fsck")[0], "-fyD", img).CombinedOutput(); err != nil && !strings.Contains(string(out), "FILE SYSTEM WAS MODIFIED") {
		t.Fatalf("e2fsck -fyD: %v\n%s", err, out)
	}
	if out := testenv.Debugfs(t, img, "stat /d"); !strings.Contains(out, "Flags: 0x81000") {
		t.Fatalf("directory not indexed:\n%s", out)
	}
	f, err := Open(dev, true)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2000 {
		name := fmt.Sprintf("/d/entry-with-a-long-name-%04d", i)
		var err error
		if i%2 == 0 {
			err = f.Remove(name)
		} else {
			err = f.Mkdir(name+"-dir", meta(0o755, 0, 0))
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	testenv.Fsck(t, img)
	f, err = Open(dev, false)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ents, err := f.ReadDir("/d")
	if err != nil || len(ents) != 2000 {
		t.Fatalf("%d entries, %v", len(ents), err)
	}
	if _, err := f.Lstat("/d/entry-with-a-long-name-0001-dir"); err != nil {
		t.Error(err)
	}
	if _, err := f.Lstat("/d/entry-with-a-long-name-0000"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("removed entry: %v", err)
	}
}

// checkFirst128K checks, in debugfs's stats of a filesystem, that no bitmap and no inode table lies in the first
// 128 KiB (blocks 0-31), which must hold only the superblock and the group descriptors, primary and reserved (see
// mke2fsConf): upstream's overlaybd-apply corrupts a filesystem with metadata written as whole blocks there.
func checkFirst128K(t *testing.T, stats string) {
	t.Helper()
	if m := regexp.MustCompile(`Reserved GDT blocks: +(\d+)`).FindStringSubmatch(stats); m == nil || m[1] == "0" {
		t.Errorf("no reserved group descriptor blocks:\n%s", stats)
	}
	groups := regexp.MustCompile(`Group +(\d+): block bitmap at (\d+), inode bitmap at (\d+), inode table at (\d+)`).FindAllStringSubmatch(stats, -1)
	if len(groups) == 0 {
		t.Fatalf("no group descriptors in debugfs stats:\n%s", stats)
	}
	for _, g := range groups {
		for i, what := range []string{"block bitmap", "inode bitmap", "inode table"} {
			var blk int64
			fmt.Sscan(g[2+i], &blk)
			if blk < 32 {
				t.Errorf("group %s: %s at block %d, inside the first 128 KiB", g[1], what, blk)
			}
		}
	}
}
