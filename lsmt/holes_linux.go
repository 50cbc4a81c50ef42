package lsmt

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// Linux lseek whence values and fallocate modes for sparse files.
const (
	seekData         = 3
	seekHole         = 4
	fallocKeepSize   = 0x1
	fallocPunchHoles = 0x2
)

// holeFile returns the hole operations of a sparse layer's data file.
func holeFile(f WriteAtFile) (HoleFile, error) {
	switch v := f.(type) {
	case HoleFile:
		return v, nil
	case *os.File:
		return osHoles{v}, nil
	}
	return nil, fmt.Errorf("lsmt: a sparse layer needs an *os.File or a HoleFile, got %T", f)
}

type osHoles struct{ f *os.File }

func (h osHoles) SeekData(off int64) (int64, error) {
	n, err := h.f.Seek(off, seekData)
	if errors.Is(err, syscall.ENXIO) {
		return 0, io.EOF
	}
	return n, err
}

func (h osHoles) SeekHole(off int64) (int64, error) { return h.f.Seek(off, seekHole) }

func (h osHoles) PunchHole(off, n int64) error {
	rc, err := h.f.SyscallConn()
	if err != nil {
		return err
	}
	var perr error
	if err := rc.Control(func(fd uintptr) {
		perr = syscall.Fallocate(int(fd), fallocPunchHoles|fallocKeepSize, off, n)
	}); err != nil {
		return err
	}
	return perr
}
