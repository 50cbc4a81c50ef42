package device

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// FUSE connection settings of every device.
const (
	// fuseMaxWrite is also max_read. Measured here with loop direct I/O: 128 KiB requests read 2.9-3.3 GB/s
	// sequentially, 1 MiB ones 2.3-2.4 GB/s: the kernel splits a large read into requests served in parallel. Small
	// buffers also keep an idle device small (each reader waiting for a request holds one).
	fuseMaxWrite = 128 << 10
	// fuseMaxBackground: loop's direct I/O is asynchronous (FUSE_ASYNC_DIO: without it the kernel serves it one
	// request at a time per loop worker; measured here, 4 KiB random reads at depth 32 went from ~25k to ~70k IOPS);
	// FUSE queues async requests as background requests, at most this many in flight, so this is the queue depth
	// the backend sees.
	fuseMaxBackground = 128
	// fuseMaxReaders bounds the goroutines reading and serving requests, and so the memory of one device (a buffer
	// of fuseMaxWrite plus a page each, about 26 MiB at most); beyond it the kernel queues.
	fuseMaxReaders = fuseMaxBackground + 64
	// fuseIdleReaders is how many readers stay waiting for requests when the device is idle.
	fuseIdleReaders = 2
)

// fuseServer serves the FUSE connection of one disk file: it reads the kernel's requests from the /dev/fuse
// descriptor and answers them from a diskFS. Each request is served by the goroutine that read it; whenever no
// reader is left waiting, a new one starts (up to fuseMaxReaders), so requests are served in parallel while an
// idle device keeps fuseIdleReaders goroutines.
//
// The server keeps no state of its own beyond the INIT negotiation, so a server started with resumed set takes
// over a connection that another (dead) process initialised: it asks the kernel to send again the requests the
// dead server had read but not answered (FUSE_NOTIFY_RESEND) and serves them like any other.
type fuseServer struct {
	fd  int // /dev/fuse; closed when the loop ends
	fs  *diskFS
	log *slog.Logger

	bufs sync.Pool // *[]byte of bufLen

	mu      sync.Mutex
	readers int  // goroutines in the loop
	idle    int  // of those, the ones waiting for a request
	active  int  // requests being served
	paused  bool // requests read are left unanswered, for the next server (see pause)
	drained *sync.Cond
	stopErr error

	hasResend chan bool     // receives, once, whether the kernel can re-send requests (from INIT)
	served    chan struct{} // closed when the connection has ended and every reader returned
}

const bufLen = fuseMaxWrite + 4096 // a WRITE request of fuseMaxWrite with its headers; a READ reply

// maxReadSize bounds the READ requests served: the kernel sends at most max_read (fuseMaxWrite) bytes.
const maxReadSize = 1 << 20

func newFUSEServer(fd int, fs *diskFS, log *slog.Logger) *fuseServer {
	s := &fuseServer{fd: fd, fs: fs, log: log, hasResend: make(chan bool, 1), served: make(chan struct{})}
	s.bufs.New = func() any { b := make([]byte, bufLen); return &b }
	s.drained = sync.NewCond(&s.mu)
	return s
}

// start starts serving. With resumed, the connection was initialised by an earlier server: the kernel is asked to
// send again what that server left unanswered.
func (s *fuseServer) start(resumed bool) error {
	if resumed {
		var n [outHeaderSize]byte
		putOutHeader(n[:], outHeaderSize, -notifyResend, 0) // a notification: unique 0, its code in the error field
		if _, err := unix.Write(s.fd, n[:]); err != nil {
			return fmt.Errorf("ask the kernel to resend the requests of the previous server: %w", err)
		}
	}
	s.mu.Lock()
	s.readers, s.idle = 1, 1
	s.mu.Unlock()
	go s.loop()
	return nil
}

// loop reads and serves requests until the connection ends.
func (s *fuseServer) loop() {
	bp := s.bufs.Get().(*[]byte)
	defer s.bufs.Put(bp)
	for {
		n, err := unix.Read(s.fd, *bp)
		if err != nil {
			switch {
			case errors.Is(err, unix.EINTR), errors.Is(err, unix.EAGAIN):
				continue
			case errors.Is(err, unix.ENOENT): // the request was interrupted before it was read
				continue
			}
			s.exit(err)
			return
		}
		s.mu.Lock()
		if s.paused {
			// Left in the kernel's list of requests being processed: the next server has them sent again.
			s.mu.Unlock()
			continue
		}
		s.idle--
		s.active++
		if s.idle == 0 && s.readers < fuseMaxReaders {
			s.readers++
			s.idle++
			go s.loop()
		}
		s.mu.Unlock()

		s.handle((*bp)[:n], *bp)

		s.mu.Lock()
		if s.active--; s.active == 0 {
			s.drained.Broadcast()
		}
		if s.idle >= fuseIdleReaders {
			s.readers--
			s.mu.Unlock()
			return
		}
		s.idle++
		s.mu.Unlock()
	}
}

// pause stops serving: requests read from now on are left unanswered (a server that resumes the connection has
// the kernel send them again), and pause returns once the requests being served are answered, or when ctx ends.
// It is for a process that exits while a Holder keeps its devices: what it still serves is finished, nothing
// else is started.
func (s *fuseServer) pause(ctx context.Context) {
	stop := context.AfterFunc(ctx, func() {
		s.mu.Lock()
		s.drained.Broadcast()
		s.mu.Unlock()
	})
	defer stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.paused = true
	for s.active > 0 && ctx.Err() == nil {
		s.drained.Wait()
	}
}

// exit ends a reader whose read failed: ENODEV means the connection ended (unmounted, or aborted).
func (s *fuseServer) exit(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.readers--
	s.idle--
	if !errors.Is(err, unix.ENODEV) && s.stopErr == nil {
		s.stopErr = err
		s.log.Error("reading FUSE requests failed; the device stops", "device", s.fs.id, "err", err)
	}
	if s.readers == 0 {
		unix.Close(s.fd)
		close(s.served)
	}
}

// handle serves one request; buf is the reader's buffer, which the request is in and a READ reply is built in.
func (s *fuseServer) handle(req, buf []byte) {
	h, body, err := parseRequest(req)
	if err != nil {
		s.log.Error("malformed FUSE request", "device", s.fs.id, "err", err)
		if len(req) >= 16 {
			s.reply(h.unique, syscall.EIO, nil)
		}
		return
	}
	switch h.opcode {
	case opForget, opBatchForget, opInterrupt:
		// No reply. Requests are not interruptible: a backend read ends in bounded time.
	case opInit:
		out, hasResend, err := initReply(body, fuseMaxWrite, fuseMaxBackground)
		if err != nil {
			s.log.Error("cannot serve this kernel's FUSE", "device", s.fs.id, "err", err)
			s.reply(h.unique, syscall.EPROTO, nil)
			return
		}
		select {
		case s.hasResend <- hasResend:
		default:
		}
		s.reply(h.unique, 0, out)
	case opGetattr:
		out, errno := s.fs.getattr(h.nodeID)
		s.reply(h.unique, errno, out)
	case opOpen:
		flags, err := parseOpenFlags(body)
		if err != nil {
			s.reply(h.unique, syscall.EINVAL, nil)
			return
		}
		out, errno := s.fs.open(h.nodeID, flags)
		s.reply(h.unique, errno, out)
	case opRead:
		in, err := parseReadIn(body)
		if err != nil || in.size > maxReadSize {
			s.reply(h.unique, syscall.EINVAL, nil)
			return
		}
		out := buf
		if int(in.size) > len(buf)-outHeaderSize {
			out = make([]byte, outHeaderSize+int(in.size))
		}
		n, errno := s.fs.read(int64(in.offset), out[outHeaderSize:outHeaderSize+int(in.size)])
		if errno != 0 {
			s.reply(h.unique, errno, nil)
			return
		}
		putOutHeader(out, outHeaderSize+n, 0, h.unique)
		s.write(out[:outHeaderSize+n])
	case opWrite:
		off, data, err := parseWriteIn(body)
		if err != nil {
			s.reply(h.unique, syscall.EINVAL, nil)
			return
		}
		n, errno := s.fs.write(int64(off), data)
		if errno != 0 {
			s.reply(h.unique, errno, nil)
			return
		}
		s.reply(h.unique, 0, writeOut(n))
	case opFallocate:
		in, err := parseFallocIn(body)
		if err != nil {
			s.reply(h.unique, syscall.EINVAL, nil)
			return
		}
		s.reply(h.unique, s.fs.fallocate(in), nil)
	case opStatfs:
		// statfs always reaches the server (the kernel does not cache it): it probes whether a device is served.
		s.reply(h.unique, 0, statfsOut(s.fs.b.Size()))
	case opFsync:
		s.reply(h.unique, s.fs.fsync(), nil)
	case opFlush, opRelease, opDestroy:
		s.reply(h.unique, 0, nil)
	case opLookup:
		s.reply(h.unique, syscall.ENOENT, nil)
	default:
		s.reply(h.unique, syscall.ENOSYS, nil)
	}
}

// reply answers request unique with errno, or with body if errno is 0.
func (s *fuseServer) reply(unique uint64, errno syscall.Errno, body []byte) {
	if errno != 0 {
		body = nil
	}
	b := make([]byte, outHeaderSize+len(body))
	putOutHeader(b, len(b), int32(errno), unique)
	copy(b[outHeaderSize:], body)
	s.write(b)
}

// write writes a reply. ENOENT means the request is gone (interrupted, or the connection aborted): nothing to do.
func (s *fuseServer) write(b []byte) {
	if _, err := unix.Write(s.fd, b); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) {
		s.log.Warn("writing a FUSE reply failed", "device", s.fs.id, "err", err)
	}
}
