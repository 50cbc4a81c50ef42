package cache

import (
	"os"

	"golang.org/x/sys/unix"
)

// punchHole frees the disk space of [off, off+n) in f, keeping its size.
func punchHole(f *os.File, off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// willNeed starts reading [off, off+n) of f into the page cache, without waiting for it. f may be closed
// meanwhile (the blob evicted): then it fails.
func willNeed(f *os.File, off, n int64) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	cerr := rc.Control(func(fd uintptr) { err = unix.Fadvise(int(fd), off, n, unix.FADV_WILLNEED) })
	if cerr != nil {
		return cerr
	}
	return err
}
