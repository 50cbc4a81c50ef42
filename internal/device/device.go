// Package device presents a virtual disk (an overlaybd layer stack) to the kernel as a block device that can be mounted.
// The Frontend interface hides how; FuseLoop, a FUSE-served file behind a loop device, works on any kernel with FUSE and loop.
package device

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Backend is the virtual disk to serve (an overlaybd layer stack): random reads; writes only for writable disks.
// ReadAt may be called concurrently. It must return in bounded time: a read that cannot be served should fail, and
// the failure reaches the kernel as EIO.
type Backend interface {
	io.ReaderAt
	// Size is the size of the disk in bytes; FuseLoop requires a multiple of 512.
	Size() int64
}

// WritableBackend is a Backend that also accepts writes. If it also has a Sync() error method, fsync on the device
// calls it.
type WritableBackend interface {
	Backend
	io.WriterAt
}

// Frontend turns a Backend into a block device the kernel can mount. FuseLoop is the implementation here; ublk,
// NBD or TCMU frontends can be added for hosts that have them.
type Frontend interface {
	// Attach makes b available as a block device named by id. It is idempotent per id: attaching an id that is
	// already attached returns the existing device.
	Attach(ctx context.Context, id string, b Backend, opts AttachOptions) (*Device, error)
	// Detach removes the device named by id, unmounting its mounts first. Detaching an unknown id is not an error.
	Detach(ctx context.Context, id string) error
}

// AttachOptions says how to attach a device.
type AttachOptions struct {
	// ReadOnly attaches the device read-only. A writable device needs a WritableBackend.
	ReadOnly bool
	// StateDir is the directory where the frontend keeps its per-device files (for FuseLoop, the mount point of
	// the FUSE file that backs the loop device). Several devices share one StateDir; it must be an absolute path
	// on a local filesystem, and should be the same across daemon restarts so that devices can be found again.
	StateDir string
}

// Device is an attached block device.
type Device struct {
	// ID is the id the device was attached with.
	ID string
	// Path is the block device node, e.g. /dev/loop7.
	Path string
	// Size is the size of the device in bytes.
	Size int64
	// ReadOnly reports whether the device rejects writes.
	ReadOnly bool
	// BackingFile is the file the block device reads from (for FuseLoop, the FUSE-served file).
	BackingFile string
}

// ErrBusy is wrapped by errors about mounts or devices that are still in use.
var ErrBusy = errors.New("busy")

// Mount mounts the device's filesystem of type fstype at target, which must exist. opts are mount(8)-style
// options; the generic flags (ro, nosuid, nodev, noexec, noatime, …) become mount flags and the rest is passed to
// the filesystem. A read-only device is always mounted read-only. Mounting a device where it is already mounted
// succeeds and does nothing; mounting it over another mount is an error.
func (d *Device) Mount(ctx context.Context, target, fstype string, opts []string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	target, err := filepath.Abs(target)
	if err != nil {
		return fmt.Errorf("mount %s: %w", d.ID, err)
	}
	dev, err := deviceNumber(d.Path)
	if err != nil {
		return fmt.Errorf("mount %s on %s: %w", d.ID, target, err)
	}
	mounts, err := readMountInfo()
	if err != nil {
		return fmt.Errorf("mount %s on %s: %w", d.ID, target, err)
	}
	// The last mount at a path is the one that is visible there.
	for i := len(mounts) - 1; i >= 0; i-- {
		if m := mounts[i]; m.mountPoint == target {
			if m.dev == dev {
				return nil
			}
			return fmt.Errorf("mount %s on %s: %s (%s) is already mounted there; unmount it first", d.ID, target, m.source, m.fsType)
		}
	}
	flags, data := parseMountOptions(opts)
	if d.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount(d.Path, target, fstype, flags, data); err != nil {
		return fmt.Errorf("mount %s (%s) on %s as %s -o %s: %w", d.ID, d.Path, target, fstype, strings.Join(opts, ","), err)
	}
	return nil
}

// mountFlags maps the generic mount(8) options to mount flags: set adds the bits, clear removes them.
var mountFlags = map[string]struct{ set, clear uintptr }{
	"ro":          {set: unix.MS_RDONLY},
	"rw":          {clear: unix.MS_RDONLY},
	"nosuid":      {set: unix.MS_NOSUID},
	"suid":        {clear: unix.MS_NOSUID},
	"nodev":       {set: unix.MS_NODEV},
	"dev":         {clear: unix.MS_NODEV},
	"noexec":      {set: unix.MS_NOEXEC},
	"exec":        {clear: unix.MS_NOEXEC},
	"noatime":     {set: unix.MS_NOATIME},
	"atime":       {clear: unix.MS_NOATIME},
	"nodiratime":  {set: unix.MS_NODIRATIME},
	"relatime":    {set: unix.MS_RELATIME},
	"strictatime": {set: unix.MS_STRICTATIME},
	"sync":        {set: unix.MS_SYNCHRONOUS},
	"async":       {clear: unix.MS_SYNCHRONOUS},
	"dirsync":     {set: unix.MS_DIRSYNC},
	"defaults":    {},
}

// parseMountOptions splits mount(8)-style options into mount flags and the filesystem's data string.
func parseMountOptions(opts []string) (flags uintptr, data string) {
	var rest []string
	for _, o := range opts {
		if f, ok := mountFlags[o]; ok {
			flags = flags&^f.clear | f.set
			continue
		}
		rest = append(rest, o)
	}
	return flags, strings.Join(rest, ",")
}

// Unmount unmounts the filesystem at target. It is idempotent: a target that is not a mount point, or does not
// exist, is not an error. When the filesystem is busy (open files, working directories, mounts below it), it is
// detached lazily — it disappears from the tree now and is released when its last user goes — and the returned
// error wraps ErrBusy so that the caller knows the device below is still in use.
func Unmount(target string) error {
	err := unix.Unmount(target, 0)
	switch {
	case err == nil, errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
		return nil
	case errors.Is(err, unix.EBUSY):
		if lerr := unix.Unmount(target, unix.MNT_DETACH); lerr != nil && !errors.Is(lerr, unix.EINVAL) {
			return fmt.Errorf("unmount %s: %w (lazy unmount also failed: %v)", target, ErrBusy, lerr)
		}
		return fmt.Errorf("unmount %s: %w: detached lazily; it is released when the last process using it (open file, cwd or a mount below it) lets go — see 'fuser -vm'", target, ErrBusy)
	default:
		return fmt.Errorf("unmount %s: %w", target, err)
	}
}

// deviceNumber returns the device number of the block device node at path.
func deviceNumber(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, fmt.Errorf("%s is not a block device", path)
	}
	return st.Rdev, nil
}
