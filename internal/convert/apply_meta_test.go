package convert

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/testenv"
)

func owned(e ent, uid, gid int) ent {
	e.hdr.Uid, e.hdr.Gid = uid, gid
	return e
}

// applyAll applies the layers in turn to a new filesystem, checks it and
// opens it for reading.
func applyAll(t *testing.T, layers ...[]byte) *ext4.FS {
	t.Helper()
	dev, img := newImage(t, 64<<20)
	for i, l := range layers {
		if _, err := applyLayer(t, dev, l); err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
	}
	testenv.Fsck(t, img)
	r, err := ext4.Open(dev, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func wantMeta(t *testing.T, r *ext4.FS, p string, mode, uid, gid uint32) {
	t.Helper()
	st, err := r.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode != mode || st.UID != uid || st.GID != gid {
		t.Errorf("%s: mode %o, owner %d:%d; want %o, %d:%d", p, st.Mode, st.UID, st.GID, mode, uid, gid)
	}
}

// TestApplyDirMetaStaysWithTheDir: the metadata of a directory entry go to
// the directory it made, never to what is at its path at the end of the
// layer.
func TestApplyDirMetaStaysWithTheDir(t *testing.T) {
	t.Run("replaced by a file", func(t *testing.T) {
		r := applyAll(t, buildTar(t,
			owned(dirE("usr/bin/x/", 0o4755), 0, 0),
			owned(fileE("usr/bin/x", 0o755, "user's program"), 1000, 1000)))
		wantMeta(t, r, "/usr/bin/x", ext4.ModeRegular|0o755, 1000, 1000)
	})
	t.Run("parent replaced by a symlink", func(t *testing.T) {
		lower := buildTar(t, dirE("etc/", 0o755), dirE("etc/secret/", 0o700), dirE("a/", 0o755))
		r := applyAll(t, lower, buildTar(t,
			owned(dirE("a/secret/", 0o777), 1000, 1000),
			linkE(tar.TypeSymlink, "a", "/etc")))
		wantMeta(t, r, "/etc/secret", ext4.ModeDir|0o700, 0, 0)
		wantMeta(t, r, "/a", ext4.ModeSymlink|0o777, 0, 0)
	})
	t.Run("removed by a whiteout", func(t *testing.T) {
		lower := buildTar(t, dirE("a/", 0o755), linkE(tar.TypeSymlink, "l", "a"))
		r := applyAll(t, lower, buildTar(t,
			owned(dirE("a/x/", 0o4755), 0, 0),
			fileE("l/.wh.x", 0, ""), // the same directory, by another path
			owned(fileE("a/x", 0o755, "user's program"), 1000, 1000)))
		wantMeta(t, r, "/a/x", ext4.ModeRegular|0o755, 1000, 1000)
	})
	t.Run("replaced by a hardlink", func(t *testing.T) {
		r := applyAll(t, buildTar(t,
			owned(fileE("data/f", 0o755, "user's program"), 1000, 1000),
			owned(dirE("usr/bin/x/", 0o4755), 0, 0),
			linkE(tar.TypeLink, "usr/bin/x", "data/f")))
		wantMeta(t, r, "/data/f", ext4.ModeRegular|0o755, 1000, 1000)
		wantMeta(t, r, "/usr/bin/x", ext4.ModeRegular|0o755, 1000, 1000)
	})
	t.Run("directory kept", func(t *testing.T) {
		// Its times are those of its entry, however many entries go in.
		big := dirE("big/", 0o750)
		big.hdr.ModTime = tBase.Add(-time.Hour)
		ents := []ent{big}
		for i := range 3000 {
			ents = append(ents, fileE(fmt.Sprintf("big/file-%04d", i), 0o644, ""))
		}
		r := applyAll(t, buildTar(t, ents...))
		st, err := r.Lstat("/big")
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode != ext4.ModeDir|0o750 || !st.Mtime.Equal(big.hdr.ModTime) {
			t.Errorf("/big: mode %o, mtime %v", st.Mode, st.Mtime)
		}
	})
}

// TestApplySymlinkedParent: like containerd, a parent that is a symlink to a
// missing directory gets that directory created.
func TestApplySymlinkedParent(t *testing.T) {
	r := applyAll(t, buildTar(t,
		linkE(tar.TypeSymlink, "a", "/missing/dir"),
		fileE("a/b", 0o644, "b"),
		dirE("p/q/", 0o755),
		linkE(tar.TypeSymlink, "x", "p/q"),
		linkE(tar.TypeSymlink, "p/q/rel", "../z"), // relative to /p/q, not to /x
		fileE("x/rel/f", 0o644, "f")))
	for p, want := range map[string]string{"/missing/dir/b": "b", "/a/b": "b", "/p/z/f": "f", "/x/rel/f": "f"} {
		fl, err := r.OpenFile(p)
		if err != nil {
			t.Errorf("open %s: %v", p, err)
			continue
		}
		got, _ := io.ReadAll(io.NewSectionReader(fl, 0, fl.Size()))
		fl.Close()
		if string(got) != want {
			t.Errorf("%s = %q, want %q", p, got, want)
		}
	}
	wantMeta(t, r, "/a", ext4.ModeSymlink|0o777, 0, 0)
	wantMeta(t, r, "/missing/dir", ext4.ModeDir|0o755, 0, 0)

	dev, _ := newImage(t, 64<<20)
	for _, c := range []struct {
		layer []byte
		want  string
	}{
		{buildTar(t, fileE("f", 0o644, "f"), linkE(tar.TypeSymlink, "a", "/f/sub"), fileE("a/b", 0o644, "b")),
			`layer entry "a/b": parent /a: stat /a: not a directory`},
		{buildTar(t, linkE(tar.TypeSymlink, "a", "/b/c"), linkE(tar.TypeSymlink, "b", "/a"), fileE("a/x", 0o644, "x")),
			`layer entry "a/x": parent /a: stat /a: too many levels of symbolic links`},
	} {
		if _, err := applyLayer(t, dev, c.layer); err == nil || err.Error() != c.want {
			t.Errorf("got %v, want %q", err, c.want)
		}
	}
}

func TestApplyXattrTooBig(t *testing.T) {
	dev, _ := newImage(t, 64<<20)
	f := fileE("f", 0o644, "f")
	f.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.big": strings.Repeat("v", 70000)}
	_, err := applyLayer(t, dev, buildTar(t, f))
	want := `layer entry "f": xattr user.big (70000 bytes) is too big for ext4`
	if err == nil || !strings.HasPrefix(err.Error(), want) || !errors.Is(err, ext4.ErrXattrNoSpace) {
		t.Fatalf("got %v, want %q wrapping ext4.ErrXattrNoSpace", err, want)
	}
}

func TestApplyNoInodes(t *testing.T) {
	dev, _ := newImage(t, 32<<20) // 2048 inodes
	var ents []ent
	for i := range 2100 {
		ents = append(ents, fileE(fmt.Sprintf("f%d", i), 0o644, ""))
	}
	_, err := applyLayer(t, dev, buildTar(t, ents...))
	if !errors.Is(err, ErrDiskFull) || !errors.Is(err, ext4.ErrNoFreeInodes) ||
		!strings.Contains(err.Error(), "the virtual disk is full: its ext4 filesystem of 32.0 MiB has no free inode (one per file) left") ||
		!strings.Contains(err.Error(), "convert with a larger --vsize (GiB)") {
		t.Fatalf("got %v", err)
	}
}
