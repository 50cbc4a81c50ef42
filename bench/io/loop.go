package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// plainMount is the baseline: the raw disk file on a plain read-only loop device (buffered like 'mount -o loop,ro',
// or with direct I/O on the file), its ext4 mounted read-only.
type plainMount struct {
	loop   string // /dev/loopN
	idx    int
	target string
}

// mountPlain attaches raw to a free loop device with LOOP_CONFIGURE and mounts its ext4 read-only at target.
func mountPlain(raw, target string, dio bool) (*plainMount, error) {
	fd, err := unix.Open(raw, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: raw, Err: err}
	}
	defer unix.Close(fd)
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: "/dev/loop-control", Err: err}
	}
	defer unix.Close(ctl)
	cfg := unix.LoopConfig{Fd: uint32(fd), Size: 512}
	cfg.Info.Flags = unix.LO_FLAGS_READ_ONLY
	if dio {
		cfg.Info.Flags |= unix.LO_FLAGS_DIRECT_IO
	}
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], raw)
	for range 64 {
		idx, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		path := fmt.Sprintf("/dev/loop%d", idx)
		lfd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, &os.PathError{Op: "open", Path: path, Err: err}
		}
		err = unix.IoctlLoopConfigure(lfd, &cfg)
		unix.Close(lfd)
		if errors.Is(err, unix.EBUSY) {
			continue // another process took it
		}
		if err != nil {
			return nil, fmt.Errorf("LOOP_CONFIGURE %s: %w", path, err)
		}
		p := &plainMount{loop: path, idx: idx, target: target}
		if err := os.MkdirAll(target, 0o755); err != nil {
			return nil, errors.Join(err, p.close())
		}
		if err := unix.Mount(path, target, "ext4", unix.MS_RDONLY, ""); err != nil {
			return nil, errors.Join(fmt.Errorf("mount %s on %s: %w", path, target, err), p.close())
		}
		return p, nil
	}
	return nil, errors.New("no free loop device")
}

// close unmounts the file system and clears the loop device, waiting until the kernel let go of the file.
func (p *plainMount) close() error {
	var errs []error
	if err := unix.Unmount(p.target, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("unmount %s: %w", p.target, err))
	}
	lfd, err := unix.Open(p.loop, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	err = unix.IoctlSetInt(lfd, unix.LOOP_CLR_FD, 0)
	unix.Close(lfd)
	if err != nil && !errors.Is(err, unix.ENXIO) {
		errs = append(errs, fmt.Errorf("LOOP_CLR_FD %s: %w", p.loop, err))
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		b, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/loop/backing_file", p.idx))
		if err != nil || strings.TrimSpace(string(b)) == "" {
			break
		}
		if time.Now().After(deadline) {
			errs = append(errs, fmt.Errorf("%s still bound after 5s", p.loop))
			break
		}
	}
	return errors.Join(errs...)
}
