package ext4

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/fsmeta"
	"github.com/obdproject/obd/internal/testenv"
)

// TestMetadataZone checks that the blocks a layer's edits allocate for metadata — directories, long symlinks,
// extent tree nodes, attribute blocks — come from the last flex group, away from file data, so that a committed
// layer holds them together (see meta_goal in obd.c).
func TestMetadataZone(t *testing.T) {
	// 8 GiB: 64 groups of 32,768 blocks in flex groups of 16; the last flex group starts at group 48.
	f, _, img := newTestFS(t, 8<<30)
	const zone = int64(48 * 32768 * 4096)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(f.Mkdir("/d", meta(0o755, 0, 0)))
	for i := range 400 {
		must(f.Mkdir(fmt.Sprintf("/d/sub-%04d", i), meta(0o755, 0, 0)))
		b := []byte{byte(i)}
		must(f.CreateFile(fmt.Sprintf("/d/sub-%04d/file-with-a-long-name", i), meta(0o644, 0, 0), bytes.NewReader(b), 1))
	}
	must(f.Symlink("/d/long", strings.Repeat("long/", 30), meta(0o777, 0, 0)))
	must(f.SetXattr("/d/sub-0001/file-with-a-long-name", "user.big", bytes.Repeat([]byte{'x'}, 1000)))
	// A file of many extents: its extent tree needs a block below the inode.
	var exts []Extent
	for i := range 20 {
		exts = append(exts, Extent{int64(i) << 20, 4096})
	}
	must(f.CreateSparseFile("/sparse", meta(0o644, 0, 0), bytes.NewReader(patterned(20*4096, 9)), 20<<20, exts))
	must(f.Close())

	dev, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	l, err := fsmeta.ReadLayout(dev, 8<<30)
	if err != nil {
		t.Fatal(err)
	}
	found, err := l.Scan(dev, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	// What mkfs made (the root directory and lost+found) stays where it is.
	mkfs := map[int64]bool{}
	for _, p := range []string{"/", "/lost+found"} {
		for _, s := range strings.Fields(testenv.Debugfs(t, img, "blocks "+p)) {
			b, _ := strconv.ParseInt(s, 10, 64)
			mkfs[b*4096] = true
		}
	}
	var meta int64
	for _, e := range found {
		for off := e.Off; off < e.End(); off += 4096 {
			if !mkfs[off] && off < zone {
				t.Errorf("metadata block %d lies before the metadata zone (block %d)", off/4096, zone/4096)
			}
			meta += 4096
		}
	}
	if meta < 400*4096 {
		t.Fatalf("found %d bytes of metadata, want at least the 400 directories' blocks", meta)
	}
	// File data stays out of the zone; debugfs lists the sparse file's extent tree block among its blocks.
	for p, tree := range map[string]int{"/d/sub-0399/file-with-a-long-name": 0, "/sparse": 1} {
		inZone := 0
		for _, s := range strings.Fields(testenv.Debugfs(t, img, "blocks "+p)) {
			if b, _ := strconv.ParseInt(s, 10, 64); b*4096 >= zone {
				inZone++
			}
		}
		if inZone != tree {
			t.Errorf("%s has %d blocks in the metadata zone, want %d (its extent tree)", p, inZone, tree)
		}
	}
	testenv.Fsck(t, img)
}
