package device

import (
	"bytes"
	"encoding/binary"
	"io"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// request builds a FUSE request of opcode with body.
func request(opcode uint32, unique, node uint64, body []byte) []byte {
	b := make([]byte, inHeaderSize+len(body))
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint32(b[4:], opcode)
	ne.PutUint64(b[8:], unique)
	ne.PutUint64(b[16:], node)
	copy(b[inHeaderSize:], body)
	return b
}

// replyServer returns a server of fs whose replies can be read from the returned pipe.
func replyServer(t testing.TB, fs *diskFS) (*fuseServer, *os.File) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	// Room for the largest reply: the server writes without anyone reading at the same time.
	if _, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, 1<<20); err != nil {
		t.Fatal(err)
	}
	unix.SetNonblock(p[0], true)
	r := os.NewFile(uintptr(p[0]), "replies")
	t.Cleanup(func() { r.Close(); unix.Close(p[1]) })
	return newFUSEServer(p[1], fs, fs.log), r
}

// nextReply reads one reply: its error and body.
func nextReply(t testing.TB, r *os.File, unique uint64) (int32, []byte) {
	t.Helper()
	buf := make([]byte, outHeaderSize)
	if _, err := io.ReadFull(r, buf); err != nil {
		t.Fatalf("no reply: %v", err)
	}
	n := int(ne.Uint32(buf[0:]))
	if n < outHeaderSize || n > 2*bufLen {
		t.Fatalf("reply says it has %d bytes", n)
	}
	buf = append(buf, make([]byte, n-outHeaderSize)...)
	if _, err := io.ReadFull(r, buf[outHeaderSize:]); err != nil {
		t.Fatalf("reply of %d bytes: %v", n, err)
	}
	if u := ne.Uint64(buf[8:]); u != unique {
		t.Fatalf("reply to %d, want %d", u, unique)
	}
	return int32(ne.Uint32(buf[4:])), buf[outHeaderSize:n]
}

func TestFUSEServerRequests(t *testing.T) {
	log, _ := testLogger(t)
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	s, r := replyServer(t, &diskFS{id: "t", b: &memBackend{data: data}, log: log})

	initIn := make([]byte, 64)
	ne.PutUint32(initIn[0:], 7)
	ne.PutUint32(initIn[4:], 41)
	ne.PutUint32(initIn[8:], 128<<10)
	ne.PutUint32(initIn[12:], initAsyncRead|initAsyncDIO|initMaxPages|initExt|1<<3)
	ne.PutUint32(initIn[16:], init2HasResend)
	s.handle(request(opInit, 1, 0, initIn), make([]byte, bufLen))
	errno, out := nextReply(t, r, 1)
	if errno != 0 || len(out) != initOutSize || ne.Uint32(out[4:]) != fuseMaxMinor || ne.Uint32(out[20:]) != fuseMaxWrite ||
		ne.Uint32(out[12:]) != initAsyncRead|initAsyncDIO|initMaxPages {
		t.Fatalf("INIT reply: errno %d, %x", errno, out)
	}
	if !<-s.hasResend {
		t.Error("the kernel's FUSE_HAS_RESEND was not noticed")
	}
	old := make([]byte, 16)
	ne.PutUint32(old[0:], 7)
	ne.PutUint32(old[4:], 22)
	s.handle(request(opInit, 2, 0, old), make([]byte, bufLen))
	if errno, _ := nextReply(t, r, 2); errno != -int32(syscall.EPROTO) {
		t.Errorf("INIT of protocol 7.22: errno %d, want EPROTO", errno)
	}

	readIn := make([]byte, readInSize)
	ne.PutUint64(readIn[8:], 4096)
	ne.PutUint32(readIn[16:], 8192)
	s.handle(request(opRead, 3, fuseRootID, readIn), make([]byte, bufLen))
	if errno, out := nextReply(t, r, 3); errno != 0 || !bytes.Equal(out, data[4096:4096+8192]) {
		t.Errorf("READ: errno %d, %d bytes", errno, len(out))
	}
	// A read larger than the buffer gets a buffer of its own.
	ne.PutUint32(readIn[16:], bufLen)
	s.handle(request(opRead, 4, fuseRootID, readIn), make([]byte, bufLen))
	if errno, out := nextReply(t, r, 4); errno != 0 || !bytes.Equal(out, data[4096:4096+bufLen]) {
		t.Errorf("large READ: errno %d, %d bytes", errno, len(out))
	}
	s.handle(request(opRead, 5, fuseRootID, readIn[:8]), make([]byte, bufLen))
	if errno, _ := nextReply(t, r, 5); errno != -int32(syscall.EINVAL) {
		t.Errorf("short READ: errno %d, want EINVAL", errno)
	}
	s.handle(request(opGetattr, 6, fuseRootID, make([]byte, 16)), make([]byte, bufLen))
	if errno, out := nextReply(t, r, 6); errno != 0 || ne.Uint64(out[16+8:]) != uint64(len(data)) {
		t.Errorf("GETATTR: errno %d, %x", errno, out)
	}
	s.handle(request(opStatfs, 7, fuseRootID, nil), make([]byte, bufLen))
	if errno, out := nextReply(t, r, 7); errno != 0 || ne.Uint64(out[0:]) != uint64(len(data)/4096) {
		t.Errorf("STATFS: errno %d, %x", errno, out)
	}
	s.handle(request(99, 8, fuseRootID, nil), make([]byte, bufLen))
	if errno, _ := nextReply(t, r, 8); errno != -int32(syscall.ENOSYS) {
		t.Errorf("unknown opcode: errno %d, want ENOSYS", errno)
	}
	// FORGET and INTERRUPT get no reply.
	s.handle(request(opForget, 9, fuseRootID, make([]byte, 8)), make([]byte, bufLen))
	s.handle(request(opInterrupt, 10, 0, make([]byte, 8)), make([]byte, bufLen))
	r.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, _ := r.Read(make([]byte, 64)); n > 0 {
		t.Errorf("a reply to FORGET or INTERRUPT: %d bytes", n)
	}
}

// FuzzFUSERequest serves arbitrary bytes as a request read from /dev/fuse: a malformed request is answered with
// an error or ignored, never a panic, and a READ answers at most what it asked for.
func FuzzFUSERequest(f *testing.F) {
	readIn := make([]byte, readInSize)
	ne.PutUint32(readIn[16:], 4096)
	f.Add(request(opRead, 1, fuseRootID, readIn))
	far := bytes.Clone(readIn)
	ne.PutUint64(far[8:], 1<<63+4096) // an offset that is negative as an int64
	f.Add(request(opRead, 1, fuseRootID, far))
	f.Add(request(opInit, 1, 0, make([]byte, 64)))
	f.Add(request(opWrite, 1, fuseRootID, make([]byte, writeInSize+10)))
	f.Add(request(opOpen, 1, fuseRootID, make([]byte, 8)))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, req []byte) {
		log, _ := testLogger(t)
		mem := &memBackend{data: make([]byte, 64<<10)}
		s, r := replyServer(t, &diskFS{id: "fuzz", b: mem, w: mem, log: log})
		s.handle(req, make([]byte, bufLen))
		// The server has written whatever it writes: read it all, without waiting.
		r.SetReadDeadline(time.Now())
		buf := make([]byte, 4*bufLen)
		n, _ := io.ReadFull(r, buf)
		if n == 0 {
			return
		}
		if n < outHeaderSize || int(binary.NativeEndian.Uint32(buf)) != n {
			t.Fatalf("malformed reply of %d bytes (or more than one)", n)
		}
		if h, body, err := parseRequest(req); err == nil && h.opcode == opRead {
			if in, err := parseReadIn(body); err == nil && n-outHeaderSize > int(in.size) {
				t.Fatalf("READ of %d bytes answered with %d", in.size, n-outHeaderSize)
			}
		}
	})
}
