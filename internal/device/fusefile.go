package device

import (
	"io"
	"log/slog"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// diskFS is a FUSE filesystem whose root is a single regular file: the disk. It is mounted on a regular file, so
// the only operations the kernel sends are on that one inode. Every open is direct_io: the page cache lives above
// the loop device, not below it.
type diskFS struct {
	fuse.RawFileSystem // ENOSYS for everything not implemented below

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

func (fs *diskFS) String() string { return "obd" }

func (fs *diskFS) attr(out *fuse.Attr) {
	size := fs.b.Size()
	out.Ino = fuse.FUSE_ROOT_ID
	out.Size = uint64(size)
	out.Blocks = uint64(size+511) / 512
	out.Blksize = 4096
	out.Nlink = 1
	out.Mode = syscall.S_IFREG | 0o400
	if fs.w != nil {
		out.Mode |= 0o200
	}
}

// attrTimeout is how long the kernel may cache the attributes of the disk file, which never change.
const attrTimeout = 365 * 24 * time.Hour

// GetAttr describes the disk file.
func (fs *diskFS) GetAttr(_ <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	if in.NodeId != fuse.FUSE_ROOT_ID {
		return fuse.ENOENT
	}
	fs.attr(&out.Attr)
	out.SetTimeout(attrTimeout)
	return fuse.OK
}

func (fs *diskFS) Open(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.NodeId != fuse.FUSE_ROOT_ID {
		return fuse.ENOENT
	}
	if fs.w == nil && in.Flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return fuse.Status(syscall.EROFS)
	}
	out.OpenFlags = fuse.FOPEN_DIRECT_IO
	if fs.w != nil {
		out.OpenFlags |= fuse.FOPEN_PARALLEL_DIRECT_WRITES
	}
	return fuse.OK
}

// Read serves a read from the backend. go-fuse serves requests in parallel goroutines. Any backend error becomes
// EIO, logged with the device id, range and cause.
func (fs *diskFS) Read(_ <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	off := int64(in.Offset)
	want := min(int64(len(buf)), max(fs.b.Size()-off, 0))
	if want == 0 {
		return fuse.ReadResultData(nil), fuse.OK
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
		return fuse.ReadResultData(buf[:n]), fuse.OK
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	if done != nil {
		done(n, err)
	}
	fs.logError("device read failed, returning EIO", "offset", off, "length", want, "err", err)
	return nil, fuse.EIO
}

func (fs *diskFS) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	return fs.Writev(cancel, in, [][]byte{data})
}

// Writev writes to the backend; it exists so that go-fuse does not copy WRITE payloads split across buffers.
func (fs *diskFS) Writev(_ <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	if fs.w == nil {
		return 0, fuse.Status(syscall.EROFS)
	}
	off := int64(in.Offset)
	var written int
	for _, d := range data {
		if off+int64(len(d)) > fs.b.Size() {
			fs.logError("device write beyond the end of the disk, returning ENOSPC", "offset", off, "length", len(d), "size", fs.b.Size())
			return uint32(written), fuse.Status(syscall.ENOSPC)
		}
		n, err := fs.w.WriteAt(d, off)
		written += n
		if err != nil {
			fs.logError("device write failed, returning EIO", "offset", off, "length", len(d), "err", err)
			return uint32(written), fuse.EIO
		}
		off += int64(n)
	}
	return uint32(written), fuse.OK
}

// Fsync calls the backend's Sync method if it has one.
func (fs *diskFS) Fsync(_ <-chan struct{}, _ *fuse.FsyncIn) fuse.Status {
	s, ok := fs.b.(interface{ Sync() error })
	if !ok {
		return fuse.OK
	}
	if err := s.Sync(); err != nil {
		fs.logError("device sync failed, returning EIO", "err", err)
		return fuse.EIO
	}
	return fuse.OK
}

func (fs *diskFS) Flush(_ <-chan struct{}, _ *fuse.FlushIn) fuse.Status { return fuse.OK }

func (fs *diskFS) Release(_ <-chan struct{}, _ *fuse.ReleaseIn) {}

// StatFs always goes to the server (the kernel does not cache it), so it is used to probe whether the server of a
// mount is still alive.
func (fs *diskFS) StatFs(_ <-chan struct{}, _ *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	out.Bsize = 4096
	out.Frsize = 4096
	out.Blocks = uint64(fs.b.Size()) / 4096
	out.Files = 1
	out.NameLen = 255
	return fuse.OK
}
