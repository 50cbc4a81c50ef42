package device

import (
	"strings"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// shortBackend returns fewer bytes than asked for, without an error, past limit.
type shortBackend struct {
	memBackend
	limit int64
}

func (s *shortBackend) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > s.limit {
		p = p[:max(s.limit-off, 0)]
	}
	return s.memBackend.ReadAt(p, off)
}

func TestDiskFSRead(t *testing.T) {
	data := make([]byte, 8192)
	for i := range data {
		data[i] = byte(i)
	}
	log, logs := testLogger(t)
	fs := &diskFS{RawFileSystem: fuse.NewDefaultRawFileSystem(), id: "disk-1", b: &memBackend{data: data}, log: log}
	read := func(off uint64, n int) ([]byte, fuse.Status) {
		res, st := fs.Read(nil, &fuse.ReadIn{Offset: off, Size: uint32(n)}, make([]byte, n))
		if !st.Ok() {
			return nil, st
		}
		b, _ := res.Bytes(nil)
		return b, st
	}
	if b, st := read(4096, 4096); !st.Ok() || string(b) != string(data[4096:]) {
		t.Errorf("read at 4096: %v, %d bytes", st, len(b))
	}
	// The end of the disk: io.EOF with a full read is fine, and reads past the end are empty.
	if b, st := read(8000, 4096); !st.Ok() || string(b) != string(data[8000:]) {
		t.Errorf("read across the end: %v, %d bytes", st, len(b))
	}
	if b, st := read(1<<20, 4096); !st.Ok() || len(b) != 0 {
		t.Errorf("read past the end: %v, %d bytes", st, len(b))
	}

	fs.b = &shortBackend{memBackend: memBackend{data: data}, limit: 6000}
	if _, st := read(4096, 4096); st != fuse.EIO {
		t.Errorf("short backend read: %v, want EIO", st)
	}
	fs.b = &failingBackend{Backend: &memBackend{data: data}}
	fs.b.(*failingBackend).fail.Store(true)
	for range 100 {
		if _, st := read(0, 512); st != fuse.EIO {
			t.Fatalf("failing backend read: %v, want EIO", st)
		}
	}
	if n := strings.Count(logs.String(), "device read failed"); n != 1 {
		t.Errorf("100 failures within a second logged %d times, want once:\n%s", n, logs)
	}
	if !hasAll(logs.String(), "device=disk-1", "offset=4096", "length=4096", "unexpected EOF") {
		t.Errorf("log does not describe the short read:\n%s", logs)
	}
}

func TestDiskFSOpenWrite(t *testing.T) {
	b := &memBackend{data: make([]byte, 4096)}
	log, _ := testLogger(t)
	ro := &diskFS{RawFileSystem: fuse.NewDefaultRawFileSystem(), id: "ro", b: b, log: log}
	var out fuse.OpenOut
	if st := ro.Open(nil, &fuse.OpenIn{InHeader: fuse.InHeader{NodeId: fuse.FUSE_ROOT_ID}, Flags: syscall.O_RDWR}, &out); st != fuse.Status(syscall.EROFS) {
		t.Errorf("open read-only disk for writing: %v, want EROFS", st)
	}
	if st := ro.Open(nil, &fuse.OpenIn{InHeader: fuse.InHeader{NodeId: fuse.FUSE_ROOT_ID}}, &out); !st.Ok() || out.OpenFlags&fuse.FOPEN_DIRECT_IO == 0 {
		t.Errorf("open read-only disk: %v, flags %#x", st, out.OpenFlags)
	}
	if _, st := ro.Write(nil, &fuse.WriteIn{}, []byte("x")); st != fuse.Status(syscall.EROFS) {
		t.Errorf("write to read-only disk: %v", st)
	}

	rw := &diskFS{RawFileSystem: fuse.NewDefaultRawFileSystem(), id: "rw", b: b, w: b, log: log}
	if n, st := rw.Writev(nil, &fuse.WriteIn{Offset: 100}, [][]byte{[]byte("ab"), []byte("cd")}); !st.Ok() || n != 4 || string(b.data[100:104]) != "abcd" {
		t.Errorf("writev: %d, %v, disk holds %q", n, st, b.data[100:104])
	}
	if _, st := rw.Write(nil, &fuse.WriteIn{Offset: 4095}, []byte("xy")); st != fuse.Status(syscall.ENOSPC) {
		t.Errorf("write past the end: %v, want ENOSPC", st)
	}
	var attr fuse.AttrOut
	if st := rw.GetAttr(nil, &fuse.GetAttrIn{InHeader: fuse.InHeader{NodeId: fuse.FUSE_ROOT_ID}}, &attr); !st.Ok() || attr.Size != 4096 || attr.Mode != syscall.S_IFREG|0o600 {
		t.Errorf("getattr: %v, %+v", st, attr.Attr)
	}
}
