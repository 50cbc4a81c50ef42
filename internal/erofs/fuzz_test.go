package erofs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"testing"
)

// memDev is a disk in memory.
type memDev struct{ b []byte }

func (d *memDev) Size() int64 { return int64(len(d.b)) }

func (d *memDev) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(d.b)) {
		return 0, errors.New("read outside the disk")
	}
	n := copy(p, d.b[off:])
	if n < len(p) {
		return n, errors.New("short read")
	}
	return n, nil
}

func (d *memDev) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(d.b)) {
		return 0, errors.New("write outside the disk")
	}
	return copy(d.b[off:], p), nil
}

// seedImage builds a small two-layer image.
func seedImage(t testing.TB) []byte {
	dev := &memDev{make([]byte, 256<<10)}
	b, err := Create(dev, [16]byte{9})
	if err != nil {
		t.Fatal(err)
	}
	m := Meta{Mode: 0o755, Mtime: epoch}
	for _, err := range []error{
		b.Mkdir("/d", m), b.CreateFile("/d/f", m, strings.NewReader("data"), 4), b.Symlink("/l", "d/f", m),
		b.Mkdir("/d/e", m), b.SetXattr("/d/f", "user.x", []byte("1")), b.Mknod("/c", ModeChar, 1, 3, m),
		b.Close(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if b, err = Open(dev); err != nil {
		t.Fatal(err)
	}
	if err := b.SetXattr("/d", "trusted.y", bytes.Repeat([]byte("z"), 50)); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	used, _ := b.Blocks()
	return dev.b[:used*blockSize]
}

// Any image, however damaged, opens and walks (Reader, Builder) with an error or with entries, never a panic, and
// takes a new layer without a panic.
func FuzzOpen(f *testing.F) {
	img := seedImage(f)
	f.Add(img)
	f.Add(img[:len(img)-100])
	rootless := bytes.Clone(img)
	rootless[superOffset+14], rootless[superOffset+15] = 0, 0 // the root at nid 0: the boot block
	f.Add(rootless)
	f.Fuzz(func(t *testing.T, img []byte) {
		if len(img) > 1<<20 {
			return
		}
		dev := &memDev{append(img, make([]byte, 64<<10)...)}
		if r, err := NewReader(dev, dev.Size()); err == nil {
			budget := 500
			_ = r.Walk(func(p string, f *File) error {
				if budget--; budget < 0 {
					return errors.New("enough")
				}
				if f.Mode&ModeTypeMask == ModeRegular {
					if data, err := f.Open(); err == nil {
						_, _ = io.Copy(io.Discard, data)
					}
				}
				return nil
			})
		}
		b, err := Open(dev)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !strings.Contains(err.Error(), "erofs:") {
				t.Fatalf("error without context: %v", err)
			}
			return
		}
		budget := 200
		var walk func(p string, depth int)
		walk = func(p string, depth int) {
			ents, err := b.ReadDir(p)
			if err != nil || depth > 8 {
				return
			}
			for _, e := range ents {
				if budget--; budget < 0 {
					return
				}
				q := path.Join(p, e.Name)
				if _, err := b.Lstat(q); err != nil {
					continue
				}
				_, _ = b.Realpath(q)
				if e.Mode == ModeDir {
					walk(q, depth+1)
				}
			}
		}
		walk("/", 0)
		for i := range 3 {
			_ = b.CreateFile(fmt.Sprintf("/d/new%d", i), Meta{Mode: 0o644}, strings.NewReader("x"), 1)
		}
		_ = b.Remove("/l")
		_ = b.Close()
	})
}

// Names, targets and data an image cannot hold are refused with an error naming the path, and the image stays
// whole.
func TestRefused(t *testing.T) {
	dev := &memDev{make([]byte, 1<<20)}
	b, err := Create(dev, [16]byte{})
	if err != nil {
		t.Fatal(err)
	}
	m := Meta{Mode: 0o644}
	if err := b.CreateFile("/f", m, strings.NewReader("x"), 1); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		err  error
	}{
		{"nul in a name", b.CreateFile("/a\x00b", m, strings.NewReader(""), 0)},
		{"long name", b.Mkdir("/"+strings.Repeat("n", 256), m)},
		{"nul in a target", b.Symlink("/l", "x\x00y", m)},
		{"long target", b.Symlink("/l", strings.Repeat("t", 4096), m)},
		{"xattr namespace", b.SetXattr("/f", "system.foo", nil)},
		{"missing parent", b.Mkdir("/no/such", m)},
		{"existing", b.Mkdir("/f", m)},
		{"below a file", b.Mkdir("/f/d", m)},
		{"short data", b.CreateFile("/short", m, strings.NewReader("x"), 2)},
		{"past the disk", b.CreateFile("/big", m, strings.NewReader(strings.Repeat("x", 2<<20)), 2<<20)},
	} {
		if c.err == nil || !strings.Contains(c.err.Error(), "/") {
			t.Errorf("%s: %v, want an error naming the path", c.name, c.err)
		}
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := NewReader(dev, dev.Size())
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	if err := r.Walk(func(p string, _ *File) error { paths = append(paths, p); return nil }); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(paths) != "[/ /f]" {
		t.Errorf("image holds %v, want / and /f", paths)
	}
}
