package fsmeta

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// head is a device of size bytes that begins with b and reads as zeros after it.
type head struct {
	b    []byte
	size int64
}

func (h head) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= h.size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), h.size-off)
	clear(p[:n])
	if off < int64(len(h.b)) {
		copy(p[:n], h.b[off:])
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// FuzzScan feeds the scanner filesystem images (the start of a 64 MiB device): it must never panic and never
// return an extent outside the device.
func FuzzScan(f *testing.F) {
	const size = 64 << 20
	if mke2fs, err := exec.LookPath("mke2fs"); err == nil {
		dir := f.TempDir()
		src := filepath.Join(dir, "src")
		for _, d := range []string{"a/b", "c"} {
			if err := os.MkdirAll(filepath.Join(src, d), 0o755); err != nil {
				f.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(src, "a/b/f"), []byte("x"), 0o644); err != nil {
			f.Fatal(err)
		}
		if err := os.Symlink(string(make([]byte, 80)[:0])+"a/b/f/../../../../../../../../../../../../../../../../../../../../f", filepath.Join(src, "c/l")); err != nil {
			f.Fatal(err)
		}
		img := filepath.Join(dir, "fs.img")
		for _, bs := range []string{"1024", "4096"} {
			if out, err := exec.Command(mke2fs, "-q", "-F", "-t", "ext4", "-b", bs, "-N", "64", "-O", "^has_journal", "-d", src, img, "4M").CombinedOutput(); err != nil {
				f.Fatalf("mke2fs: %v\n%s", err, out)
			}
			b, err := os.ReadFile(img)
			if err != nil {
				f.Fatal(err)
			}
			// The metadata of so small a filesystem lies in its first 256 KiB, but for the last directory blocks.
			end := len(b)
			for end > 0 && b[end-1] == 0 {
				end--
			}
			f.Add(b[:min(end, 256<<10)])
		}
	}
	sb := make([]byte, 2048)
	sb[1024+0x38], sb[1024+0x39] = 0x53, 0xEF
	f.Add(sb)
	f.Fuzz(func(t *testing.T, b []byte) {
		dev := head{b, size}
		l, err := ReadLayout(dev, size)
		if err != nil {
			return
		}
		check := func(es []Extent) {
			for _, e := range es {
				if e.Off < 0 || e.Len <= 0 || e.End() > size {
					t.Fatalf("extent %+v outside the %d-byte device", e, int64(size))
				}
			}
		}
		check(l.Tables())
		es, err := l.Scan(dev, 16<<20)
		if err == nil {
			check(es)
		}
		whole := []Extent{{0, size}}
		fs, err := l.Files(dev, whole, whole)
		if err == nil {
			for i, e := range fs {
				check([]Extent{e.Extent})
				if e.Logical < 0 || i > 0 && e.Off < fs[i-1].Off {
					t.Fatalf("file extent %+v out of order or before its file's start", e)
				}
			}
		}
	})
}
