package image

import (
	"strings"
	"testing"

	"github.com/obdproject/obd/lsmt"
)

func TestBlobInfoWriteText(t *testing.T) {
	var b strings.Builder
	BlobInfo{Path: "b", Size: 10}.WriteText(&b)
	if got := b.String(); got != "blob:        b (10 bytes)\ntar wrapper: none\nzfile:       none\n" {
		t.Errorf("bare blob: %q", got)
	}

	b.Reset()
	BlobInfo{Path: "b", Size: 10,
		Tar:   &TarInfo{Member: "overlaybd.commit", Offset: 512, Size: 4096, PAX: true},
		ZFile: &ZFileInfo{Algorithm: "lz4", BlockSize: 4096, Blocks: 3, OriginalSize: 9000, HeaderOverwrite: true, CRCError: "block 2"},
		LSMT:  &LSMTInfo{Kind: lsmt.KindSparseRW, UUID: "u", ParentUUID: "p", VirtualSize: 1 << 30, UserTag: "msg"},
	}.WriteText(&b)
	for _, want := range []string{
		"tar wrapper: member \"overlaybd.commit\" at offset 512, 4096 bytes, pax header\n",
		"zfile:       lz4, 4096-byte blocks, 3 blocks, original size 9000 bytes (header overwrite), CRC ERROR: block 2\n",
		"  uuid:      u\n  parent:    p\n",
		"  writable:  one file of a writable layer",
		"  tag:       \"msg\"\n",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("WriteText wrote\n%s\nwithout %q", b.String(), want)
		}
	}
}
