package image

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

func TestExportRawFile(t *testing.T) {
	ref, _ := ParseRef("oci:" + helloLayout + ":amd64-converted")
	img, err := OpenLocal(ref, DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.img")
	var calls int
	n, err := ExportRawFile(context.Background(), img.Stack, disk, func(done, total int64) { calls++ })
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(disk)
	if err != nil || st.Size() != img.Stack.VirtualSize() || n <= 0 || calls == 0 {
		t.Fatalf("disk %v, %v; %d bytes written, %d progress calls", st, err, n, calls)
	}
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sb := make([]byte, 2)
	if _, err := f.ReadAt(sb, 1024+56); err != nil || sb[0] != 0x53 || sb[1] != 0xef {
		t.Errorf("ext4 magic %x, %v", sb, err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("left in the directory: %v", entries)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := ExportRawFile(ctx, img.Stack, filepath.Join(dir, "cancelled.img"), nil); err == nil {
		t.Error("a cancelled export succeeded")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("a failed export left %v", entries)
	}
}
