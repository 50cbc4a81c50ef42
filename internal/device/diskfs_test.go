package device

import (
	"bytes"
	"strings"
	"syscall"
	"testing"
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
	fs := &diskFS{id: "disk-1", b: &memBackend{data: data}, log: log}
	read := func(off int64, n int) ([]byte, syscall.Errno) {
		b := make([]byte, n)
		n, errno := fs.read(off, b)
		return b[:n], errno
	}
	if b, st := read(4096, 4096); st != 0 || string(b) != string(data[4096:]) {
		t.Errorf("read at 4096: %v, %d bytes", st, len(b))
	}
	// The end of the disk: io.EOF with a full read is fine, and reads past the end are empty.
	if b, st := read(8000, 4096); st != 0 || string(b) != string(data[8000:]) {
		t.Errorf("read across the end: %v, %d bytes", st, len(b))
	}
	if b, st := read(1<<20, 4096); st != 0 || len(b) != 0 {
		t.Errorf("read past the end: %v, %d bytes", st, len(b))
	}

	fs.b = &shortBackend{memBackend: memBackend{data: data}, limit: 6000}
	if _, st := read(4096, 4096); st != syscall.EIO {
		t.Errorf("short backend read: %v, want EIO", st)
	}
	fs.b = &failingBackend{Backend: &memBackend{data: data}}
	fs.b.(*failingBackend).fail.Store(true)
	for range 100 {
		if _, st := read(0, 512); st != syscall.EIO {
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
	ro := &diskFS{id: "ro", b: b, log: log}
	if _, st := ro.open(fuseRootID, syscall.O_RDWR); st != syscall.EROFS {
		t.Errorf("open read-only disk for writing: %v, want EROFS", st)
	}
	if _, st := ro.open(fuseRootID+1, syscall.O_RDONLY); st != syscall.ENOENT {
		t.Errorf("open another inode: %v, want ENOENT", st)
	}
	if out, st := ro.open(fuseRootID, syscall.O_RDONLY); st != 0 || ne.Uint32(out[8:])&fopenDirectIO == 0 {
		t.Errorf("open read-only disk: %v, reply %x", st, out)
	}
	if _, st := ro.write(0, []byte("x")); st != syscall.EROFS {
		t.Errorf("write to read-only disk: %v", st)
	}

	rw := &diskFS{id: "rw", b: b, w: b, log: log}
	if n, st := rw.write(100, []byte("abcd")); st != 0 || n != 4 || string(b.data[100:104]) != "abcd" {
		t.Errorf("write: %d, %v, disk holds %q", n, st, b.data[100:104])
	}
	if _, st := rw.write(4095, []byte("xy")); st != syscall.ENOSPC {
		t.Errorf("write past the end: %v, want ENOSPC", st)
	}
	out, st := rw.getattr(fuseRootID)
	if st != 0 || len(out) != attrOutSize || ne.Uint64(out[16+8:]) != 4096 || ne.Uint32(out[16+60:]) != syscall.S_IFREG|0o600 {
		t.Errorf("getattr: %v, %x", st, out)
	}
}

func TestDiskFSFallocate(t *testing.T) {
	b := &memBackend{data: bytes.Repeat([]byte{1}, 8192)}
	log, _ := testLogger(t)
	if st := (&diskFS{id: "ro", b: b, log: log}).fallocate(fallocIn{offset: 0, length: 512, mode: 3}); st != syscall.EOPNOTSUPP {
		t.Errorf("punch on a read-only disk: %v", st)
	}
	rw := &diskFS{id: "rw", b: b, w: b, log: log}
	if st := rw.fallocate(fallocIn{offset: 1024, length: 2048, mode: 3}); st != 0 {
		t.Fatalf("punch hole: %v", st)
	}
	if !bytes.Equal(b.data[1024:3072], make([]byte, 2048)) || b.data[1023] != 1 || b.data[3072] != 1 {
		t.Error("punch hole did not discard exactly its range")
	}
	if st := rw.fallocate(fallocIn{offset: 4096, length: 512, mode: 0x10}); st != 0 || b.data[4096] != 0 {
		t.Errorf("zero range: %v", st)
	}
	for _, in := range []fallocIn{
		{offset: 0, length: 512, mode: 0},           // allocate
		{offset: 0, length: 512, mode: 0x08},        // collapse range
		{offset: 100, length: 512, mode: 3},         // unaligned
		{offset: 7680, length: 1024, mode: 3},       // past the end
		{offset: 1 << 63, length: 1 << 62, mode: 3}, // overflows int64
	} {
		if st := rw.fallocate(in); st == 0 {
			t.Errorf("fallocate %+v accepted", in)
		}
	}
}
