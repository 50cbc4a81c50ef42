package device

import (
	"io"
	"log/slog"
	"sync/atomic"
	"syscall"
	"time"
)

// diskFS is a FUSE filesystem whose root is a single regular file: the disk. It is mounted on a regular file, so
// the only operations the kernel sends are on that one inode. Every open is direct_io: the page cache lives above
// the loop device, not below it. It keeps no state per request or open file, which is what lets a new server take
// over a connection (see fuseServer).
type diskFS struct {
	id  string
	b   Backend
	w   io.WriterAt // nil for a read-only disk
	log *slog.Logger
	obs ReadObserver // nil: reads are not observed

	// A failing backend fails every read; errors are logged at most once a second, with the count of those not
	// logged in between.
	lastErrLog atomic.Int64 // unix nanoseconds
	unlogged   atomic.Int64
}

// logError logs a failed backend call unless one was logged less than a second ago.
func (fs *diskFS) logError(msg string, args ...any) {
	now := time.Now().UnixNano()
	last := fs.lastErrLog.Load()
	if now-last < int64(time.Second) || !fs.lastErrLog.CompareAndSwap(last, now) {
		fs.unlogged.Add(1)
		return
	}
	args = append(args, "device", fs.id, "errors_not_logged", fs.unlogged.Swap(0))
	fs.log.Error(msg, args...)
}

// attrTimeout is how long the kernel may cache the attributes of the disk file, which never change.
const attrTimeout = 365 * 24 * time.Hour

// getattr describes the disk file.
func (fs *diskFS) getattr(node uint64) ([]byte, syscall.Errno) {
	if node != fuseRootID {
		return nil, syscall.ENOENT
	}
	mode := uint32(syscall.S_IFREG | 0o400)
	if fs.w != nil {
		mode |= 0o200
	}
	return attrOut(fileAttr{size: uint64(fs.b.Size()), mode: mode, blksize: 4096}, uint64(attrTimeout/time.Second)), 0
}

// open opens the disk file: direct I/O, writable only for a writable disk.
func (fs *diskFS) open(node uint64, flags uint32) ([]byte, syscall.Errno) {
	if node != fuseRootID {
		return nil, syscall.ENOENT
	}
	if fs.w == nil && flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, syscall.EROFS
	}
	openFlags := uint32(fopenDirectIO)
	if fs.w != nil {
		openFlags |= fopenParallelDirectWrites
	}
	return openOut(openFlags), 0
}

// read serves a read of len(buf) bytes at off from the backend; it returns the bytes read, fewer only at the end
// of the disk. Any backend error becomes EIO, logged with the device id, range and cause.
func (fs *diskFS) read(off int64, buf []byte) (int, syscall.Errno) {
	if off < 0 {
		return 0, syscall.EINVAL // an offset beyond 2^63 in the request
	}
	want := min(int64(len(buf)), max(fs.b.Size()-off, 0))
	if want == 0 {
		return 0, 0
	}
	var done func(int, error)
	if fs.obs != nil {
		done = fs.obs(fs.id, off, want)
	}
	n, err := fs.b.ReadAt(buf[:want], off)
	if int64(n) == want {
		// io.ReaderAt may return io.EOF together with a full read at the end of the disk.
		if done != nil {
			done(n, nil)
		}
		return n, 0
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	if done != nil {
		done(n, err)
	}
	fs.logError("device read failed, returning EIO", "offset", off, "length", want, "err", err)
	return 0, syscall.EIO
}

// write writes data at off to the backend.
func (fs *diskFS) write(off int64, data []byte) (int, syscall.Errno) {
	if fs.w == nil {
		return 0, syscall.EROFS
	}
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off+int64(len(data)) > fs.b.Size() {
		fs.logError("device write beyond the end of the disk, returning ENOSPC", "offset", off, "length", len(data), "size", fs.b.Size())
		return 0, syscall.ENOSPC
	}
	n, err := fs.w.WriteAt(data, off)
	if err != nil {
		fs.logError("device write failed, returning EIO", "offset", off, "length", len(data), "err", err)
		return n, syscall.EIO
	}
	return n, 0
}

// Discarder is a WritableBackend that can discard ranges: they read as zeros afterwards and need no space. The
// loop device turns a discard (and a write of zeros) into a hole punched in the FUSE file, which reaches Discard.
type Discarder interface {
	Discard(off, n int64) error
}

// fallocate serves the hole punches and zero ranges the loop device makes of discards and writes of zeros; both
// become a Discard of the backend. Other modes (allocation, which a disk file does not need) are refused.
func (fs *diskFS) fallocate(in fallocIn) syscall.Errno {
	d, ok := fs.w.(Discarder)
	if !ok {
		return syscall.EOPNOTSUPP
	}
	const keepSize, punchHole, zeroRange = 0x01, 0x02, 0x10
	if in.mode&^(keepSize|punchHole|zeroRange) != 0 || in.mode&(punchHole|zeroRange) == 0 {
		return syscall.EOPNOTSUPP
	}
	off, n := int64(in.offset), int64(in.length)
	if off < 0 || n < 0 || off%512 != 0 || n%512 != 0 || off > fs.b.Size()-n {
		return syscall.EINVAL
	}
	if err := d.Discard(off, n); err != nil {
		fs.logError("device discard failed, returning EIO", "offset", off, "length", n, "err", err)
		return syscall.EIO
	}
	return 0
}

// fsync calls the backend's Sync method if it has one.
func (fs *diskFS) fsync() syscall.Errno {
	s, ok := fs.b.(interface{ Sync() error })
	if !ok {
		return 0
	}
	if err := s.Sync(); err != nil {
		fs.logError("device sync failed, returning EIO", "err", err)
		return syscall.EIO
	}
	return 0
}
