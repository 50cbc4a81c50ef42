package device

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// loopSectorSize is the logical block size of the loop devices: 512 lets filesystems of any block size mount.
const loopSectorSize = 512

// loopPath returns the device node of loop device idx.
func loopPath(idx int) string { return "/dev/loop" + strconv.Itoa(idx) }

// loopIndex parses the index out of a loop device node path.
func loopIndex(path string) (int, error) {
	n, ok := strings.CutPrefix(path, "/dev/loop")
	idx, err := strconv.Atoi(n)
	if !ok || err != nil || idx < 0 {
		return 0, fmt.Errorf("%s is not a loop device node", path)
	}
	return idx, nil
}

// loopAttach binds the open file fd to a free loop device with LOOP_CONFIGURE and returns its index. It asks for
// direct I/O (the backing FUSE file is direct_io anyway: no page cache on both sides of the loop) and falls back to
// buffered I/O if the kernel refuses it; dio reports which one is in effect. AUTOCLEAR is not set: the device must
// outlive the short-lived descriptor used to configure it, and is cleared explicitly by Detach.
func loopAttach(ctx context.Context, fd int, readOnly bool, name string) (idx int, dio bool, err error) {
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, false, &os.PathError{Op: "open", Path: "/dev/loop-control", Err: err}
	}
	defer unix.Close(ctl)

	cfg := unix.LoopConfig{Fd: uint32(fd), Size: loopSectorSize}
	cfg.Info.Flags = unix.LO_FLAGS_DIRECT_IO
	if readOnly {
		cfg.Info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], name)

	// Another process can take the device between LOOP_CTL_GET_FREE and LOOP_CONFIGURE; then LOOP_CONFIGURE says
	// EBUSY and we ask again.
	const attempts = 64
	for range attempts {
		if err := ctx.Err(); err != nil {
			return 0, false, err
		}
		idx, err = getFreeLoop(ctl)
		if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.ENODEV) {
			return 0, false, fmt.Errorf("no free loop device: the kernel's limit is reached (detach unused loop devices, see 'losetup -a', or raise the loop module's max_loop): LOOP_CTL_GET_FREE: %w", err)
		}
		if err != nil {
			return 0, false, fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		err = loopConfigure(idx, &cfg)
		if errors.Is(err, unix.EINVAL) && cfg.Info.Flags&unix.LO_FLAGS_DIRECT_IO != 0 {
			// Kernels that cannot do direct I/O on this file reject the flag.
			cfg.Info.Flags &^= unix.LO_FLAGS_DIRECT_IO
			err = loopConfigure(idx, &cfg)
		}
		if errors.Is(err, unix.EBUSY) {
			continue
		}
		if err != nil {
			return 0, false, fmt.Errorf("LOOP_CONFIGURE %s: %w", loopPath(idx), err)
		}
		return idx, loopDirectIO(idx), nil
	}
	return 0, false, fmt.Errorf("no free loop device after %d attempts (others keep taking them): %w", attempts, unix.EBUSY)
}

// getFreeLoop asks loop-control for a free loop device (a variable for tests of exhaustion).
var getFreeLoop = func(ctl int) (int, error) { return unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE) }

// loopConfigure opens loop device idx and applies cfg to it.
func loopConfigure(idx int, cfg *unix.LoopConfig) error {
	lfd, err := unix.Open(loopPath(idx), unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(lfd)
	return unix.IoctlLoopConfigure(lfd, cfg)
}

// setReadAhead sets the read_ahead_kb of loop device idx.
func setReadAhead(idx, kb int) error {
	p := fmt.Sprintf("/sys/block/loop%d/queue/read_ahead_kb", idx)
	if err := os.WriteFile(p, []byte(strconv.Itoa(kb)), 0); err != nil {
		return fmt.Errorf("set the read-ahead of %s: %w", loopPath(idx), err)
	}
	return nil
}

// readAhead returns the read_ahead_kb of loop device idx.
func readAhead(idx int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/queue/read_ahead_kb", idx))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// loopDirectIO reports whether loop device idx does direct I/O on its backing file.
func loopDirectIO(idx int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/loop/dio", idx))
	return err == nil && strings.TrimSpace(string(b)) == "1"
}

// loopBackingFile returns the path of the file behind loop device idx, or "" if the device is not bound.
func loopBackingFile(idx int) string {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/loop/backing_file", idx))
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(b), "\n")
}

// loopStatus returns the LOOP_GET_STATUS64 information of loop device idx, such as the device and inode numbers
// of the backing file. It fails if the backing file cannot be stat'ed.
func loopStatus(idx int) (*unix.LoopInfo64, error) {
	lfd, err := unix.Open(loopPath(idx), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(lfd)
	return unix.IoctlLoopGetStatus64(lfd)
}

// loopClear unbinds loop device idx from its backing file (LOOP_CLR_FD) and waits up to wait until the kernel has
// let go of the file. If something still holds the device open, the kernel defers the unbinding to the last
// close; then loopClear returns an error wrapping ErrBusy when wait (or ctx) runs out.
func loopClear(ctx context.Context, idx int, wait time.Duration) error {
	lfd, err := unix.Open(loopPath(idx), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: loopPath(idx), Err: err}
	}
	err = unix.IoctlSetInt(lfd, unix.LOOP_CLR_FD, 0)
	unix.Close(lfd)
	if err != nil && !errors.Is(err, unix.ENXIO) { // ENXIO: not bound
		return fmt.Errorf("LOOP_CLR_FD %s: %w", loopPath(idx), err)
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for delay := time.Millisecond; loopBackingFile(idx) != ""; delay = min(2*delay, 100*time.Millisecond) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s is still open by another process (see 'fuser -v %s'); it will be released at its last close: %w",
				loopPath(idx), loopPath(idx), ErrBusy)
		case <-time.After(delay):
		}
	}
	return nil
}

// loopDevice is a bound loop device.
type loopDevice struct {
	index   int
	backing string // path of the backing file
}

// listLoops returns the bound loop devices of the system.
func listLoops() ([]loopDevice, error) {
	names, err := filepath.Glob("/sys/block/loop*")
	if err != nil {
		return nil, err
	}
	var out []loopDevice
	for _, n := range names {
		idx, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(n), "loop"))
		if err != nil {
			continue
		}
		if b := loopBackingFile(idx); b != "" {
			out = append(out, loopDevice{index: idx, backing: b})
		}
	}
	return out, nil
}
