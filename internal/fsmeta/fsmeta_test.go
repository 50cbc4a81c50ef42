package fsmeta

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/testenv"
)

// tree makes a directory tree with what the scan has to find: nested directories, a directory of several blocks,
// short and long symlinks, a file with an extended attribute, a sparse file whose extent tree has a node below its
// inode, and files with data (which the scan must leave out).
func tree(t *testing.T) string {
	dir := t.TempDir()
	write := func(name string, b []byte) {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("a/b/c/file", []byte("data"))
	for i := range 300 {
		write(fmt.Sprintf("big/a-file-with-a-rather-long-name-%04d", i), []byte{byte(i)})
	}
	if err := os.Symlink("short", filepath.Join(dir, "a/short")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(strings.Repeat("long/", 30), filepath.Join(dir, "a/long")); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(dir, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 8 {
		if _, err := f.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 4096), int64(i)<<20); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	return dir
}

func mkfs(t *testing.T, src string, opts ...string) string {
	img := filepath.Join(t.TempDir(), "fs.img")
	args := append([]string{"-q", "-F", "-t", "ext4", "-d", src}, opts...)
	args = append(args, img, "64M")
	if out, err := exec.Command(testenv.Tools(t, "mke2fs")[0], args...).CombinedOutput(); err != nil {
		t.Fatalf("mke2fs: %v\n%s", err, out)
	}
	return img
}

// blocks returns the blocks debugfs lists for path.
func blocks(t *testing.T, img, path string) []int64 {
	var out []int64
	for _, f := range strings.Fields(testenv.Debugfs(t, img, "blocks "+path)) {
		b, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			t.Fatalf("debugfs blocks %s: %q", path, f)
		}
		out = append(out, b)
	}
	if len(out) == 0 {
		t.Fatalf("debugfs lists no blocks for %s", path)
	}
	return out
}

// openLayout opens the filesystem image img (closed when the test ends) and reads its layout.
func openLayout(t *testing.T, img string) (*os.File, *Layout) {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	l, err := ReadLayout(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	return f, l
}

func covered(es []Extent, off int64) bool {
	for _, e := range es {
		if off >= e.Off && off < e.End() {
			return true
		}
	}
	return false
}

func TestAgainstDebugfs(t *testing.T) {
	testenv.Tools(t, "mke2fs", "debugfs")
	src := tree(t)
	for _, c := range []struct {
		name string
		opts []string
	}{
		{"4k-64bit-csum", []string{"-b", "4096", "-O", "64bit,metadata_csum,^has_journal"}},
		{"1k-no-csum", []string{"-b", "1024", "-O", "^64bit,^metadata_csum,^has_journal"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := mkfs(t, src, c.opts...)
			f, l := openLayout(t, img)
			size := int64(64 << 20)
			tables := l.Tables()
			scan, err := l.Scan(f, 1<<30)
			if err != nil {
				t.Fatal(err)
			}
			bs := l.BlockSize
			for _, es := range [][]Extent{tables, scan} {
				for _, e := range es {
					if e.Off < 0 || e.End() > size || e.Off%bs != 0 || e.Len%bs != 0 {
						t.Fatalf("extent %+v outside the device or not whole blocks", e)
					}
				}
			}
			// Every directory's blocks, the long symlink's, the sparse file's extent tree node and the xattr block.
			for _, p := range []string{"/", "/a", "/a/b", "/a/b/c", "/big", "/a/long"} {
				for _, b := range blocks(t, img, p) {
					if !covered(scan, b*bs) {
						t.Errorf("block %d of %s not found", b, p)
					}
				}
			}
			if n := len(blocks(t, img, "/big")); n < 3 {
				t.Errorf("/big has %d blocks, want several", n)
			}
			stat := testenv.Debugfs(t, img, "stat /sparse")
			m := regexp.MustCompile(`\(ETB0\):(\d+)`).FindStringSubmatch(stat)
			if m == nil {
				t.Fatalf("/sparse has no extent tree block:\n%s", stat)
			}
			etb, _ := strconv.ParseInt(m[1], 10, 64)
			if !covered(scan, etb*bs) {
				t.Errorf("extent tree block %d of /sparse not found", etb)
			}
			// File data is not metadata (debugfs lists the tree block among the file's blocks).
			for _, p := range []string{"/a/b/c/file", "/big/a-file-with-a-rather-long-name-0007", "/sparse"} {
				for _, b := range blocks(t, img, p) {
					if b != etb && (covered(scan, b*bs) || covered(tables, b*bs)) {
						t.Errorf("data block %d of %s taken for metadata", b, p)
					}
				}
			}
			// The inode tables hold every inode in use.
			for _, p := range []string{"/big/a-file-with-a-rather-long-name-0299", "/sparse", "/a/long"} {
				m := regexp.MustCompile(`located at block (\d+), offset (0x[0-9a-f]+)`).FindStringSubmatch(testenv.Debugfs(t, img, "imap "+p))
				if m == nil {
					t.Fatalf("debugfs imap %s: no location", p)
				}
				b, _ := strconv.ParseInt(m[1], 10, 64)
				o, _ := strconv.ParseInt(m[2], 0, 64)
				if !covered(tables, b*bs+o) {
					t.Errorf("inode of %s (block %d) not in the inode tables found", p, b)
				}
			}
		})
	}
}

func TestXattrBlock(t *testing.T) {
	testenv.Tools(t, "mke2fs", "debugfs")
	img := mkfs(t, tree(t), "-b", "4096", "-I", "128", "-O", "^has_journal")
	// A 128-byte inode has no room for attributes: they go to a block.
	if out, err := exec.Command(testenv.Tools(t, "debugfs")[0], "-w", "-R", "ea_set /a/b/c/file user.obd "+strings.Repeat("v", 64), img).CombinedOutput(); err != nil {
		t.Fatalf("debugfs ea_set: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`File ACL: (\d+)`).FindStringSubmatch(testenv.Debugfs(t, img, "stat /a/b/c/file"))
	if m == nil || m[1] == "0" {
		t.Fatal("the attribute is not in a block")
	}
	f, l := openLayout(t, img)
	scan, err := l.Scan(f, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := strconv.ParseInt(m[1], 10, 64); !covered(scan, b*l.BlockSize) {
		t.Errorf("attribute block %d not found", b)
	}
}

func TestBudget(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	img := mkfs(t, tree(t), "-b", "1024", "-N", "2048", "-O", "^metadata_csum,^has_journal,^uninit_bg")
	f, l := openLayout(t, img)
	all, err := l.Scan(f, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	some, err := l.Scan(f, 1)
	if err != nil {
		t.Fatal(err)
	}
	if total(some) >= total(all) || total(some) == 0 {
		t.Fatalf("a scan bounded to 1 byte found %d bytes, an unbounded one %d", total(some), total(all))
	}
}

func total(es []Extent) int64 {
	var n int64
	for _, e := range es {
		n += e.Len
	}
	return n
}

func TestNotExt4(t *testing.T) {
	if _, err := ReadLayout(bytes.NewReader(make([]byte, 8192)), 8192); !errors.Is(err, ErrNotExt4) {
		t.Fatalf("zeros: %v, want ErrNotExt4", err)
	}
	if _, err := ReadLayout(bytes.NewReader(make([]byte, 100)), 100); err == nil {
		t.Fatal("a device shorter than a superblock was accepted")
	}
}

func TestMerge(t *testing.T) {
	got := Merge([]Extent{{8192, 4096}, {0, 4096}, {4096, 4096}, {20000, 10}, {20005, 10}, {30000, 0}})
	want := []Extent{{0, 12288}, {20000, 15}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("Merge = %v, want %v", got, want)
	}
}

// TestFiles checks the file extents Files finds against the files' bytes: every byte of a regular file's data is
// found once, at the file offset it holds, with the inode number and generation debugfs reports; a narrower want
// clips them.
func TestFiles(t *testing.T) {
	testenv.Tools(t, "mke2fs", "debugfs")
	src := tree(t)
	for _, opts := range [][]string{
		{"-b", "4096", "-O", "64bit,metadata_csum,^has_journal"},
		{"-b", "1024", "-O", "^64bit,^metadata_csum,^has_journal"},
	} {
		t.Run(opts[1], func(t *testing.T) {
			img := mkfs(t, src, opts...)
			f, l := openLayout(t, img)
			whole := []Extent{{0, 64 << 20}}
			all, err := l.Files(f, whole, whole)
			if err != nil {
				t.Fatal(err)
			}
			byIno := map[uint32][]FileExtent{}
			for i, e := range all {
				if i > 0 && e.Off < all[i-1].End() {
					t.Fatalf("extents %+v and %+v overlap or are out of order", all[i-1], e)
				}
				byIno[e.Ino] = append(byIno[e.Ino], e)
			}
			for _, p := range []string{"a/b/c/file", "big/a-file-with-a-rather-long-name-0007", "sparse"} {
				stat := testenv.Debugfs(t, img, "stat /"+p)
				m := regexp.MustCompile(`Inode: (\d+).*\n.*Generation: (\d+)`).FindStringSubmatch(stat)
				if m == nil {
					t.Fatalf("debugfs stat /%s: no inode or generation:\n%s", p, stat)
				}
				ino, _ := strconv.ParseUint(m[1], 10, 32)
				gen, _ := strconv.ParseUint(m[2], 10, 32)
				want, err := os.ReadFile(filepath.Join(src, p))
				if err != nil {
					t.Fatal(err)
				}
				got := make([]byte, len(want))
				var found int64
				for _, e := range byIno[uint32(ino)] {
					if e.Gen != uint32(gen) {
						t.Errorf("%s: generation %d, debugfs says %d", p, e.Gen, gen)
					}
					if e.Logical >= int64(len(want)) {
						continue // the rest of the file's last block
					}
					n := min(e.Len, int64(len(want))-e.Logical)
					if _, err := f.ReadAt(got[e.Logical:e.Logical+n], e.Off); err != nil {
						t.Fatal(err)
					}
					found += n
				}
				if !bytes.Equal(got, want) {
					t.Errorf("%s: the bytes at its extents are not the file's", p)
				}
				if p != "sparse" && found != int64(len(want)) {
					t.Errorf("%s: extents hold %d of its %d bytes", p, found, len(want))
				}
			}
			// A want of the metadata (the inode tables, the sparse file's extent tree block) and one block of the sparse
			// file's second extent: that block alone.
			var second FileExtent
			for _, e := range all {
				if e.Logical == 1<<20 {
					second = e
				}
			}
			if second.Len == 0 {
				t.Fatal("no extent holds the sparse file's second MiB")
			}
			one := Extent{second.Off, l.BlockSize}
			meta, err := l.Scan(f, 1<<30)
			if err != nil {
				t.Fatal(err)
			}
			got, err := l.Files(f, []Extent{one}, Merge(append(l.Tables(), meta...)))
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 || got[0].Extent != one || got[0].Logical != 1<<20 || got[0].Ino != second.Ino {
				t.Fatalf("Files of one block = %+v, want that block of inode %d at 1 MiB", got, second.Ino)
			}
			// Without the inode tables, or without the sparse file's tree block, it is not found.
			for _, m := range [][]Extent{{one}, Merge(append(l.Tables(), one))} {
				if got, err := l.Files(f, []Extent{one}, m); err != nil || len(got) != 0 {
					t.Fatalf("Files of metadata %v = %+v, %v; want none", m, got, err)
				}
			}
		})
	}
}
