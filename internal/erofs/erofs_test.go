package erofs

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/testenv"
)

// fileDev is a disk image file of a fixed size.
type fileDev struct {
	*os.File
	size int64
}

func (d fileDev) Size() int64 { return d.size }

func newDev(t testing.TB, size int64) fileDev {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "erofs.img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return fileDev{f, size}
}

// twin applies each change both to a Builder and to a directory of the host, whose tree the image must equal.
type twin struct {
	t   *testing.T
	b   *Builder
	dir string
}

func (w *twin) do(what string, build func(*Builder) error, host func(string) error) {
	w.t.Helper()
	if err := build(w.b); err != nil {
		w.t.Fatalf("%s: %v", what, err)
	}
	if err := host(w.dir); err != nil {
		w.t.Fatalf("%s on the host: %v", what, err)
	}
}

var epoch = time.Date(2024, 5, 6, 7, 8, 9, 123456789, time.UTC)

func meta(mode uint32) Meta { return Meta{Mode: mode, UID: 1000, GID: 2000, Mtime: epoch} }

func hostMeta(p string, m Meta) error {
	if err := os.Lchown(p, int(m.UID), int(m.GID)); err != nil {
		return err
	}
	if fi, err := os.Lstat(p); err == nil && fi.Mode()&fs.ModeSymlink == 0 {
		if err := unix.Chmod(p, m.Mode); err != nil {
			return err
		}
	}
	ts := []unix.Timespec{unix.NsecToTimespec(m.Mtime.UnixNano()), unix.NsecToTimespec(m.Mtime.UnixNano())}
	return unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW)
}

func (w *twin) mkdir(p string, mode uint32) {
	w.do("mkdir "+p, func(b *Builder) error { return b.Mkdir(p, meta(mode)) }, func(d string) error {
		if err := os.Mkdir(d+p, 0o700); err != nil {
			return err
		}
		return hostMeta(d+p, meta(mode))
	})
}

func (w *twin) file(p string, body []byte) {
	w.do("create "+p, func(b *Builder) error { return b.CreateFile(p, meta(0o640), bytes.NewReader(body), int64(len(body))) },
		func(d string) error {
			if err := os.WriteFile(d+p, body, 0o600); err != nil {
				return err
			}
			return hostMeta(d+p, meta(0o640))
		})
}

func (w *twin) symlink(p, target string) {
	w.do("symlink "+p, func(b *Builder) error { return b.Symlink(p, target, meta(0o777)) }, func(d string) error {
		if err := os.Symlink(target, d+p); err != nil {
			return err
		}
		return hostMeta(d+p, meta(0o777))
	})
}

func (w *twin) remove(p string) {
	w.do("remove "+p, func(b *Builder) error { return b.Remove(p) }, func(d string) error { return os.RemoveAll(d + p) })
}

func (w *twin) xattr(p, name, value string) {
	w.do("setxattr "+p, func(b *Builder) error { return b.SetXattr(p, name, []byte(value)) },
		func(d string) error { return unix.Lsetxattr(d+p, name, []byte(value), 0) })
}

// layer builds layer i over the image on dev (the first one when i is 0) with the changes of fn, then checks the
// image with fsck.erofs and compares the kernel's mount of it with the host's tree.
func layer(t *testing.T, dev fileDev, host string, first bool, fn func(*twin)) {
	t.Helper()
	var b *Builder
	var err error
	if first {
		b, err = Create(dev, [16]byte{1, 2, 3})
	} else {
		b, err = Open(dev)
	}
	if err != nil {
		t.Fatal(err)
	}
	fn(&twin{t: t, b: b, dir: host})
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(testenv.Tools(t, "fsck.erofs")[0], dev.Name()).CombinedOutput(); err != nil {
		t.Fatalf("fsck.erofs: %v\n%s", err, out)
	}
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "erofs", "-o", "ro,loop", dev.Name(), mnt).CombinedOutput(); err != nil {
		t.Fatalf("mount: %v\n%s", err, out)
	}
	defer func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount: %v\n%s", err, out)
		}
	}()
	want, got := hostTree(t, host), hostTree(t, mnt)
	for _, p := range slices.Sorted(mapsKeys(want, got)) {
		if want[p] != got[p] {
			t.Errorf("%s:\n want %s\n  got %s", p, want[p], got[p])
		}
	}
}

func mapsKeys(a, b map[string]string) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range a {
			if !yield(k) {
				return
			}
		}
		for k := range b {
			if _, ok := a[k]; !ok && !yield(k) {
				return
			}
		}
	}
}

// hostTree describes every path under root: type, mode, owner, size, mtime (not of directories: the host
// changes them as entries come and go), content, target, device, xattrs and hardlink group.
func hostTree(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	inodes := map[uint64]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(p, root), "/")
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		s := fmt.Sprintf("mode=%o uid=%d gid=%d", st.Mode, st.Uid, st.Gid)
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			if rel == "/" {
				s = "root" // the host's own directory
			}
		case unix.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			s += fmt.Sprintf(" size=%d sha=%x", len(b), sha256.Sum256(b))
		case unix.S_IFLNK:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			s += " -> " + l
		case unix.S_IFCHR, unix.S_IFBLK:
			s += fmt.Sprintf(" rdev=%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			s += fmt.Sprintf(" mtime=%d.%09d", st.Mtim.Sec, st.Mtim.Nsec)
			if first, ok := inodes[st.Ino]; ok {
				s += " link-of=" + first
			} else {
				inodes[st.Ino] = rel
			}
		}
		if rel != "/" {
			s += xattrsOf(t, p)
		}
		out[rel] = s
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func xattrsOf(t *testing.T, p string) string {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		if errors.Is(err, syscall.ENOTSUP) {
			return ""
		}
		t.Fatalf("listxattr %s: %v", p, err)
	}
	var names []string
	for name := range strings.SplitSeq(string(buf[:n]), "\x00") {
		if name != "" && !strings.HasPrefix(name, "system.") {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	s := ""
	for _, name := range names {
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			t.Fatalf("getxattr %s %s: %v", p, name, err)
		}
		s += fmt.Sprintf(" %s=%q", name, v[:m])
	}
	return s
}

// Three layers, each checked by fsck.erofs and by the kernel's mount against the same changes made to a host
// directory: multi-block directories (names that sort before "."), data across chunks, long and short symlinks,
// hardlinks (within a layer and to a lower file), devices, xattrs; then removals, replacements, new entries in
// lower directories (rewritten in place) and a lower directory that gains xattrs (moved: its parent and its
// subdirectories are rewritten).
func TestLayers(t *testing.T) {
	testenv.Root(t)
	testenv.Tools(t, "fsck.erofs", "mount", "umount")
	dev := newDev(t, 1<<30)
	host := t.TempDir()
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<17+3) // 2 MiB + 48: more than one write chunk

	layer(t, dev, host, true, func(w *twin) {
		w.mkdir("/etc", 0o755)
		w.file("/etc/passwd", []byte("root:x:0:0::/root:/bin/sh\n"))
		w.mkdir("/etc/conf.d", 0o750)
		w.file("/etc/conf.d/a", []byte("a"))
		w.mkdir("/etc/conf.d/sub", 0o700)
		w.file("/etc/conf.d/sub/deep", []byte("deep"))
		w.mkdir("/many", 0o755)
		for i := range 400 {
			w.file(fmt.Sprintf("/many/%s-%03d", strings.Repeat("n", 20), i), nil)
		}
		w.file("/many/-first", []byte("sorts before ."))
		w.file("/many/"+strings.Repeat("x", 255), []byte("longest name"))
		w.file("/big", big)
		w.do("link /big2", func(b *Builder) error { return b.Link("/big2", "/big") },
			func(d string) error { return os.Link(d+"/big", d+"/big2") })
		w.symlink("/lib", "usr/lib")
		w.symlink("/long", strings.Repeat("target/", 400))
		w.do("mknod /null", func(b *Builder) error { return b.Mknod("/null", ModeChar, 1, 3, meta(0o666)) },
			func(d string) error {
				if err := unix.Mknod(d+"/null", unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
					return err
				}
				return hostMeta(d+"/null", meta(0o666))
			})
		w.do("mknod /fifo", func(b *Builder) error { return b.Mknod("/fifo", ModeFIFO, 0, 0, meta(0o600)) },
			func(d string) error {
				if err := unix.Mkfifo(d+"/fifo", 0o600); err != nil {
					return err
				}
				return hostMeta(d+"/fifo", meta(0o600))
			})
		// Sparse: data at 5000 and at 3 MiB + 10 in a file of 4 MiB, and a file that is one hole.
		w.do("sparse /sparse", func(b *Builder) error {
			return b.CreateSparseFile("/sparse", meta(0o644), strings.NewReader("helloworld"), 4<<20, []Extent{{5000, 5}, {3<<20 + 10, 5}})
		}, func(d string) error {
			f, err := os.Create(d + "/sparse")
			if err != nil {
				return err
			}
			defer f.Close()
			if _, err := f.WriteAt([]byte("hello"), 5000); err != nil {
				return err
			}
			if _, err := f.WriteAt([]byte("world"), 3<<20+10); err != nil {
				return err
			}
			if err := f.Truncate(4 << 20); err != nil {
				return err
			}
			return hostMeta(d+"/sparse", meta(0o644))
		})
		w.do("sparse /hole", func(b *Builder) error {
			return b.CreateSparseFile("/hole", meta(0o644), strings.NewReader(""), 1<<20, nil)
		}, func(d string) error {
			if err := os.WriteFile(d+"/hole", nil, 0o600); err != nil {
				return err
			}
			if err := os.Truncate(d+"/hole", 1<<20); err != nil {
				return err
			}
			return hostMeta(d+"/hole", meta(0o644))
		})
		w.file("/ping", []byte("\x7fELF"))
		w.xattr("/ping", "security.capability", "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")
		w.xattr("/ping", "user.note", "hello")
		w.xattr("/etc/conf.d", "trusted.overlay.x", "y")
	})
	layer(t, dev, host, false, func(w *twin) {
		w.remove("/etc/passwd")
		w.file("/etc/passwd", []byte("root:x:0:0::/root:/bin/bash\n"))
		w.file("/etc/conf.d/sub/new", []byte("new in a lower directory"))
		w.remove("/many/-first")
		w.mkdir("/etc/conf.d/sub/newdir", 0o755)
		w.xattr("/etc", "user.grown", strings.Repeat("v", 100)) // /etc moves: / and /etc/conf.d are rewritten
		w.do("link /big3", func(b *Builder) error { return b.Link("/big3", "/big") },
			func(d string) error { return os.Link(d+"/big", d+"/big3") })
		w.remove("/lib")
		w.mkdir("/lib", 0o755)
	})
	layer(t, dev, host, false, func(w *twin) {
		w.remove("/big3")
		w.file("/etc/conf.d/b", []byte("b"))
		w.remove("/etc/conf.d/sub")
		w.file("/lib/libc.so", []byte("libc"))
	})
}
