package convert

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/zfile"
)

func TestLayerFiles(t *testing.T) {
	dir := t.TempDir()
	data, index := filepath.Join(dir, "data"), filepath.Join(dir, "index")
	if err := CreateLayerFiles(data, index, 1<<30, lsmt.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := CreateLayerFiles(data, index, 1<<30, lsmt.CreateOptions{}); err == nil {
		t.Fatal("created over existing files")
	}
	payload := bytes.Repeat([]byte("obd layer "), 1000)[:8192]
	func() {
		df, _ := os.OpenFile(data, os.O_RDWR, 0)
		defer df.Close()
		xf, _ := os.OpenFile(index, os.O_RDWR, 0)
		defer xf.Close()
		rw, err := lsmt.OpenRW(df, xf)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := rw.WriteAt(payload, 1<<20); err != nil {
			t.Fatal(err)
		}
		if err := rw.Close(); err != nil {
			t.Fatal(err)
		}
	}()

	plain, blob, back := filepath.Join(dir, "plain"), filepath.Join(dir, "blob"), filepath.Join(dir, "back")
	if err := CommitLayerFiles(data, index, plain, false, lsmt.CommitOptions{UserTag: "t"}, false, false, zfile.Options{}); err != nil {
		t.Fatal(err)
	}
	if err := CompressLayerFile(plain, blob, true, zfile.Options{}); err != nil {
		t.Fatal(err)
	}
	if err := DecompressLayerFile(blob, back); err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(plain)
	got, _ := os.ReadFile(back)
	if len(want) == 0 || !bytes.Equal(got, want) {
		t.Fatalf("decompressed %d bytes, committed %d, or they differ", len(got), len(want))
	}
	f, err := os.Open(back)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	l, err := lsmt.Open(f, int64(len(got)))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(payload))
	if _, err := l.ReadAt(buf, 1<<20); err != nil || !bytes.Equal(buf, payload) {
		t.Errorf("committed layer reads back %q…, %v", buf[:16], err)
	}

	if err := CompressLayerFile(dir, blob, false, zfile.Options{}); err == nil || !strings.Contains(err.Error(), "is a directory, not a layer file") {
		t.Errorf("compress a directory: %v", err)
	}
	if err := WriteLayerFile(dir, bytes.NewReader(want), false, false, zfile.Options{}); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("write over a directory: %v", err)
	}
	if err := DecompressLayerFile(plain, filepath.Join(dir, "x")); err == nil || !strings.HasPrefix(err.Error(), plain+": ") {
		t.Errorf("decompress a plain layer: %v", err)
	}
	for _, e := range mustReadDir(t, dir) {
		if strings.HasPrefix(e, ".") {
			t.Errorf("temporary file left: %s", e)
		}
	}
	if err := CommitLayerFiles(data, index, "", true, lsmt.CommitOptions{}, false, false, zfile.Options{}); err != nil {
		t.Errorf("seal: %v", err)
	}
}

func mustReadDir(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}
