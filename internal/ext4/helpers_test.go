package ext4

import (
	"context"
	"github.com/obdproject/obd/internal/testenv"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// fileDev is a Device backed by a sparse file.
type fileDev struct {
	*os.File
	size int64
}

func (d *fileDev) Size() int64 { return d.size }

func newFileDev(t testing.TB, size int64) (*fileDev, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "fs.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &fileDev{File: f, size: size}, p
}

// newTestFS makes a fresh filesystem on a sparse file and opens it.
func newTestFS(t testing.TB, size int64) (*FS, *fileDev, string) {
	t.Helper()
	testenv.Tools(t, "mke2fs")
	dev, p := newFileDev(t, size)
	if err := Mkfs(context.Background(), dev, MkfsOptions{UUID: "6c0d7a52-4a37-4f44-9d8c-0c4f0b3c2a11", Timestamp: 1700000000}); err != nil {
		t.Fatal(err)
	}
	f, err := Open(dev, true)
	if err != nil {
		t.Fatal(err)
	}
	return f, dev, p
}

// fsck runs e2fsck -fn on the image and fails the test unless it is clean.
func fsck(t testing.TB, img string) {
	t.Helper()
	out, err := exec.Command(testenv.Tools(t, "e2fsck")[0], "-fn", img).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn: %v\n%s", err, out)
	}
}

// debugfs runs one debugfs request on the image.
func debugfs(t testing.TB, img, request string) string {
	t.Helper()
	out, err := exec.Command(testenv.Tools(t, "debugfs")[0], "-R", request, img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs -R %q: %v\n%s", request, err, out)
	}
	// Drop the version banner.
	s := string(out)
	if i := strings.Index(s, "\n"); strings.HasPrefix(s, "debugfs ") && i >= 0 {
		s = s[i+1:]
	}
	return s
}
