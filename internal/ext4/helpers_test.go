package ext4

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/obdproject/obd/internal/testenv"
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
