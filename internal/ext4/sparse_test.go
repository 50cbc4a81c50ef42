package ext4

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"syscall"
	"testing"

	"github.com/obdproject/obd/internal/testenv"
)

func TestCreateSparseFile(t *testing.T) {
	f, _, img := newTestFS(t, 64<<20)
	const size = 8 << 40 // far beyond the filesystem: holes take no room
	ext := []Extent{
		{0, 10},            // a partial first block...
		{100, 5},           // ...shared with another extent
		{4096 + 4000, 200}, // across a block boundary
		{3 << 20, 0},       // empty
		{5 << 30, 3<<20 + 7},
		{size - 3, 3}, // at the very end
	}
	var data []byte
	for i, e := range ext {
		data = append(data, patterned(int(e.Length), byte(i+1))...)
	}
	if err := f.CreateSparseFile("/sparse", meta(0o644, 0, 0), bytes.NewReader(data), size, ext); err != nil {
		t.Fatal(err)
	}
	st, err := f.Lstat("/sparse")
	if err != nil {
		t.Fatal(err)
	}
	// Blocks 0, 1, 2, 769 (3 MiB + 7 bytes at 5 GiB), the last one and a
	// block of the extent tree.
	if wantBlocks := int64(3+769+1+1) * 8; st.Size != size || st.Blocks != wantBlocks {
		t.Errorf("size %d, %d sectors; want %d, %d", st.Size, st.Blocks, int64(size), wantBlocks)
	}
	fl, err := f.OpenFile("/sparse")
	if err != nil {
		t.Fatal(err)
	}
	defer fl.Close()
	for _, off := range []int64{0, 50, 4096, 8000, 1 << 20, 5<<30 - 1, 5<<30 + 3<<20, 6 << 30, size - 10} {
		got := make([]byte, min(9000, size-off))
		if _, err := fl.ReadAt(got, off); err != nil && err != io.EOF {
			t.Fatalf("read at %d: %v", off, err)
		}
		want := make([]byte, len(got))
		pos := 0
		for _, e := range ext {
			for i := int64(0); i < e.Length; i++ {
				if o := e.Offset + i - off; o >= 0 && o < int64(len(want)) {
					want[o] = data[pos+int(i)]
				}
			}
			pos += int(e.Length)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("content at %d differs", off)
		}
	}
	fl.Close()
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	testenv.Fsck(t, img)
}

func TestCreateSparseFileRejects(t *testing.T) {
	f, _, _ := newTestFS(t, 64<<20)
	defer f.Close()
	for _, c := range []struct {
		size int64
		ext  []Extent
		want error
		msg  string
	}{
		{100, []Extent{{10, 5}, {12, 5}}, syscall.EINVAL, "out of order"},
		{100, []Extent{{90, 11}}, syscall.EINVAL, "beyond the file size"},
		{100, []Extent{{-1, 1}}, syscall.EINVAL, "out of order"},
		{16 << 40, nil, syscall.EFBIG, "ext4 with 4096-byte blocks holds files of at most 17592186040320 bytes"},
	} {
		err := f.CreateSparseFile("/x", meta(0o644, 0, 0), strings.NewReader(""), c.size, c.ext)
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("size %d, extents %v: %v, want %v saying %q", c.size, c.ext, err, c.want, c.msg)
		}
	}
	if _, err := f.Lstat("/x"); err == nil {
		t.Error("a rejected file was created")
	}
}

// TestFull: a full filesystem and an xattr too big for ext4 give errors that name the cause.
func TestFull(t *testing.T) {
	f, _, _ := newTestFS(t, 8<<20)
	defer f.Close()
	u, err := f.Usage()
	if err != nil {
		t.Fatal(err)
	}
	if u.BlockSize != 4096 || u.Blocks != 2048 || u.FreeBlocks <= 0 || u.FreeBlocks >= u.Blocks || u.Inodes != 512 || u.FreeInodes != u.Inodes-11 {
		t.Errorf("usage of a new 8 MiB filesystem: %+v", u)
	}
	if err := f.CreateFile("/x", meta(0o644, 0, 0), strings.NewReader(""), 0); err != nil {
		t.Fatal(err)
	}
	if err := f.SetXattr("/x", "user.big", make([]byte, 70000)); !errors.Is(err, ErrXattrNoSpace) || !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("70000-byte xattr: %v", err)
	}
	big := patterned(16<<20, 1)
	if err := f.CreateFile("/big", meta(0o644, 0, 0), bytes.NewReader(big), int64(len(big))); !errors.Is(err, ErrNoFreeBlocks) {
		t.Errorf("16 MiB file on an 8 MiB filesystem: %v", err)
	}
	for i := 0; ; i++ {
		err := f.CreateFile(fmt.Sprintf("/f%d", i), meta(0o644, 0, 0), strings.NewReader(""), 0)
		if err == nil {
			continue
		}
		if !errors.Is(err, ErrNoFreeInodes) {
			t.Errorf("file %d: %v", i, err)
		}
		break
	}
	if u, err := f.Usage(); err != nil || u.FreeInodes != 0 {
		t.Errorf("usage when out of inodes: %+v %v", u, err)
	}
}
