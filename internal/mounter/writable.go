package mounter

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/device"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/lsmt"
)

// quotaFile is the file at the root of a container's filesystem that holds its quota: an immutable file of
// allocated but unwritten blocks (no data reaches the writable layer) that takes all the free space but the
// quota, so that every writer, root included, gets ENOSPC past it, in a VM as in a container. Only
// CAP_LINUX_IMMUTABLE (not in a container's default set) can remove it. Sealing removes it.
const quotaFile = ".obd-quota"

var _ snapshotter.WritableMounter = (*Mounter)(nil)

// MountWritable attaches layers with the writable layer w on top as a writable device id and, with a target,
// mounts its filesystem read-write (with online discard) there; see snapshotter.WritableMounter. The first attach
// of a layer gives the image's filesystem a journal if it has none (images are made without one: they are mounted
// read-only), so that a crash leaves a filesystem that the journal makes consistent again, and applies w.Quota.
func (m *Mounter) MountWritable(ctx context.Context, id string, layers []snapshotter.Layer, traceFile string, w snapshotter.WritableLayer, target string) (string, error) {
	defer m.locks.Lock(id)()
	img := m.image(id)
	if img == nil {
		m.track.attaching(id, layers)
		var err error
		if img, err = m.attach(ctx, id, layers, traceFile, &w); err != nil {
			m.track.failed(id, err)
			return "", err
		}
		m.setImage(id, img)
	}
	if target != "" || w.Quota > 0 {
		if err := m.mountQuota(ctx, img, w, target); err != nil {
			m.mountFailed(ctx, id, img, err)
			return "", err
		}
	}
	m.track.attached(id, img)
	return img.dev.Path, nil
}

// mountQuota mounts the filesystem of a writable layer at target, if there is one, and applies its quota (through a
// mount of its own in w.Dir when there is no target).
func (m *Mounter) mountQuota(ctx context.Context, img *mounted, w snapshotter.WritableLayer, target string) error {
	mount := func(at string) error {
		err := os.MkdirAll(at, 0o755)
		if err == nil {
			err = img.dev.Mount(ctx, at, m.opts.FSType, []string{"discard"})
		}
		if err != nil {
			return fmt.Errorf("container layer %s: mount %s (%s) read-write at %s: %w", img.dev.ID, img.dev.Path, m.opts.FSType, at, err)
		}
		return nil
	}
	if target != "" {
		if err := mount(target); err != nil {
			return err
		}
		img.targets[target] = true
		if w.Quota > 0 {
			return applyQuota(target, w.Quota)
		}
		return nil
	}
	at := filepath.Join(w.Dir, "quota-mnt")
	if err := mount(at); err != nil {
		return err
	}
	err := applyQuota(at, w.Quota)
	return errors.Join(err, device.Unmount(at))
}

// SealWritable removes the quota file, unmounts and detaches the device of id and turns w's layer into a sealed
// LSMT file at dst, which stacks on layers as a read-only layer (upstream's overlaybd-commit --seal). The
// filesystem is clean once its unmount succeeded; a device still in use is an error and nothing is sealed.
func (m *Mounter) SealWritable(ctx context.Context, id string, layers []snapshotter.Layer, w snapshotter.WritableLayer, dst string) error {
	defer m.locks.Lock(id)()
	if err := m.unmountWritable(ctx, id, layers, w); err != nil {
		return fmt.Errorf("seal container layer %s: %w", id, err)
	}
	u, err := openUpper(w.Dir, false)
	if err != nil {
		return fmt.Errorf("seal container layer %s: %w", id, err)
	}
	defer u.closeFiles()
	if _, err := u.rw.Seal(); err != nil {
		return fmt.Errorf("seal container layer %s: %w", id, err)
	}
	if err := u.data.Sync(); err != nil {
		return fmt.Errorf("seal container layer %s: %w", id, err)
	}
	if err := os.Rename(u.data.Name(), dst); err != nil {
		return fmt.Errorf("seal container layer %s: %w", id, err)
	}
	if err := os.Remove(u.index.Name()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("seal container layer %s: %w", id, err)
	}
	m.opts.Logger.Info("sealed container layer", "id", id, "file", dst)
	return nil
}

// unmountWritable takes the quota file out of the filesystem of id (mounting it for that if it is not mounted),
// then unmounts it everywhere and detaches the device. The caller holds id's lock.
func (m *Mounter) unmountWritable(ctx context.Context, id string, layers []snapshotter.Layer, w snapshotter.WritableLayer) error {
	img := m.image(id)
	if img == nil {
		// Not attached by this process: drop what an earlier one left, then attach it here.
		if err := m.opts.Frontend.Detach(ctx, id); err != nil {
			return err
		}
		var err error
		if img, err = m.attach(ctx, id, layers, "", &w); err != nil {
			return err
		}
		m.setImage(id, img)
	}
	var root string
	for t := range img.targets {
		root = t
	}
	var err error
	if root == "" {
		root = filepath.Join(w.Dir, "seal-mnt")
		if err = os.MkdirAll(root, 0o700); err == nil {
			if err = img.dev.Mount(ctx, root, m.opts.FSType, nil); err == nil {
				img.targets[root] = true
			}
		}
	}
	if err == nil {
		err = removeQuota(root)
	}
	for t := range img.targets {
		if uerr := device.Unmount(t); uerr != nil {
			err = errors.Join(err, uerr)
			continue
		}
		delete(img.targets, t)
	}
	if err != nil {
		return err
	}
	m.setImage(id, nil)
	m.track.remove(id)
	return errors.Join(m.opts.Frontend.Detach(ctx, id), img.close())
}

// upper is an open writable layer: a sparse LSMT layer (data at 4096+offset, overwritten in place, discards
// punched out) whose index file records only discards. Sparse, not append-only: its data file never holds more than
// the live data, and every write the kernel was told is done is in the data file, so a daemon that dies loses
// nothing that a new one cannot find again.
type upper struct {
	rw          *lsmt.RW
	data, index *os.File
	quota       int64
}

// openUpper opens the writable layer in dir; with create, it makes a new one when there is none.
func openUpper(dir string, create bool) (*upper, error) {
	flags := os.O_RDWR
	if create {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
		flags |= os.O_CREATE
	}
	data, err := os.OpenFile(filepath.Join(dir, snapshotter.WritableDataFile), flags, 0o600)
	if err != nil {
		return nil, err
	}
	index, err := os.OpenFile(filepath.Join(dir, snapshotter.WritableIndexFile), flags, 0o600)
	if err != nil {
		data.Close()
		return nil, err
	}
	u := &upper{data: data, index: index}
	st, err := data.Stat()
	if err == nil {
		if st.Size() == 0 && create {
			// Virtual size 0: the stack gives it the image's.
			u.rw, err = lsmt.CreateRW(data, index, 0, lsmt.CreateOptions{Sparse: true})
		} else {
			u.rw, err = lsmt.OpenRW(data, index)
		}
	}
	if err != nil {
		u.closeFiles()
		return nil, fmt.Errorf("writable layer in %s: %w", dir, err)
	}
	return u, nil
}

// close writes what the layer buffers, syncs and closes its files.
func (u *upper) close() error {
	err := u.rw.Close()
	if serr := u.rw.Sync(); serr != nil && !errors.Is(serr, lsmt.ErrClosed) && err == nil {
		err = serr
	}
	for _, f := range []*os.File{u.data, u.index} {
		if serr := f.Sync(); serr != nil && err == nil {
			err = serr
		}
	}
	u.closeFiles()
	return err
}

func (u *upper) closeFiles() {
	u.data.Close()
	u.index.Close()
}

// allocated returns the bytes the layer's data file takes on disk.
func (u *upper) allocated() int64 {
	st, err := u.data.Stat()
	if err != nil {
		return 0
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		return sys.Blocks * 512
	}
	return st.Size()
}

// writableBackend serves a stack with a writable layer: writes of zeros (the loop device's write-zeroes, mkfs and
// tune2fs zeroing) become discards, which take no space.
type writableBackend struct {
	stackBackend
	upper *upper
}

// zeros is compared against to find writes of zeros.
var zeros = make([]byte, 64<<10)

func isZero(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(zeros))
		if !bytes.Equal(p[:n], zeros[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}

func (b writableBackend) WriteAt(p []byte, off int64) (int, error) {
	if len(p)%lsmt.SectorSize == 0 && isZero(p) {
		if err := b.Stack.Discard(off, int64(len(p))); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	return b.Stack.WriteAt(p, off)
}

func (b writableBackend) Discard(off, n int64) error { return b.Stack.Discard(off, n) }

// Sync makes the layer's writes durable (the kernel's flush: fsync in the container reaches it).
func (b writableBackend) Sync() error { return b.upper.rw.Sync() }

// superblock holds the fields of an ext4 superblock that preparing a writable filesystem reads.
type superblock struct {
	blockSize          int64
	blocks, freeBlocks int64
	reservedBlocks     int64
	hasJournal         bool
}

// readSuperblock reads the ext4 superblock of a disk (1,024 bytes at offset 1,024).
func readSuperblock(r io.ReaderAt) (superblock, error) {
	b := make([]byte, 1024)
	if _, err := r.ReadAt(b, 1024); err != nil && !(errors.Is(err, io.EOF)) {
		return superblock{}, fmt.Errorf("read the ext4 superblock: %w", err)
	}
	return parseSuperblock(b)
}

func parseSuperblock(b []byte) (superblock, error) {
	le := binary.LittleEndian
	if len(b) < 1024 || le.Uint16(b[0x38:]) != 0xEF53 {
		return superblock{}, errors.New("no ext4 superblock (a writable layer needs an ext4 image)")
	}
	logBS := le.Uint32(b[0x18:])
	if logBS > 6 {
		return superblock{}, fmt.Errorf("ext4 superblock: block size 2^%d KiB", logBS)
	}
	sb := superblock{
		blockSize:      1024 << logBS,
		blocks:         int64(le.Uint32(b[0x4:])),
		freeBlocks:     int64(le.Uint32(b[0xC:])),
		reservedBlocks: int64(le.Uint32(b[0x8:])),
		hasJournal:     le.Uint32(b[0x5C:])&0x4 != 0,
	}
	if le.Uint32(b[0x60:])&0x80 != 0 { // 64bit
		sb.blocks |= int64(le.Uint32(b[0x150:])) << 32
		sb.freeBlocks |= int64(le.Uint32(b[0x158:])) << 32
		sb.reservedBlocks |= int64(le.Uint32(b[0x154:])) << 32
	}
	if sb.blocks <= 0 || sb.freeBlocks < 0 || sb.freeBlocks > sb.blocks {
		return superblock{}, fmt.Errorf("ext4 superblock: %d free blocks of %d", sb.freeBlocks, sb.blocks)
	}
	return sb, nil
}

// journalSize returns the journal, in MiB, that a filesystem of blocks*blockSize bytes gets: a 64th of it, from
// 4 MiB (jbd2's least, 1,024 blocks) to 64 MiB.
func journalSize(sb superblock) int64 {
	return min(64, max(4, sb.blocks*sb.blockSize>>20/64))
}

// prepareFS gives the filesystem on dev (read through r) a journal if it has none and, for a quota, drops the blocks
// reserved for root: the quota file leaves the same space to every writer. It is idempotent, so an attach that a
// crash interrupted is finished by the next one; a filesystem that needs nothing is not touched (it may be
// mounted).
func prepareFS(ctx context.Context, dev string, r io.ReaderAt, quota bool) error {
	sb, err := readSuperblock(r)
	if err != nil {
		return err
	}
	if !sb.hasJournal {
		if err := tune2fs(ctx, "-O", "has_journal", "-J", "size="+strconv.FormatInt(journalSize(sb), 10), dev); err != nil {
			return fmt.Errorf("add a journal: %w", err)
		}
	}
	if quota && sb.reservedBlocks != 0 {
		if err := tune2fs(ctx, "-r", "0", dev); err != nil {
			return fmt.Errorf("drop the reserved blocks: %w", err)
		}
	}
	return nil
}

// tune2fs runs e2fsprogs' tune2fs.
func tune2fs(ctx context.Context, args ...string) error {
	path, err := exec.LookPath("tune2fs")
	if err != nil {
		return fmt.Errorf("a writable layer needs tune2fs (e2fsprogs): %w", err)
	}
	out, err := exec.CommandContext(ctx, path, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("tune2fs %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// applyQuota makes the quota file in the filesystem mounted at root, unless it is there: quota bytes stay free.
func applyQuota(root string, quota int64) error {
	path := filepath.Join(root, quotaFile)
	if _, err := os.Lstat(path); err == nil {
		return nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		return err
	}
	// Bavail: what unprivileged writers may use, which ext4's own reserve (root's) already leaves out.
	size := max(0, int64(st.Bavail)*st.Bsize-quota) / st.Bsize * st.Bsize
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o400)
	if err != nil {
		return err
	}
	err = nil
	if size > 0 {
		err = unix.Fallocate(int(f.Fd()), 0, 0, size)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = setImmutable(path, true)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("make the quota file %s of %d bytes: %w", path, size, err)
	}
	return nil
}

// removeQuota removes the quota file from the filesystem mounted at root, if it is there.
func removeQuota(root string) error {
	path := filepath.Join(root, quotaFile)
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := setImmutable(path, false); err != nil {
		return fmt.Errorf("remove the quota file %s: %w", path, err)
	}
	return os.Remove(path)
}

// fsImmutableFL is FS_IMMUTABLE_FL of linux/fs.h.
const fsImmutableFL = 0x10

// setImmutable sets or clears the immutable flag of a file (chattr +i).
func setImmutable(path string, on bool) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	flags, err := unix.IoctlGetUint32(fd, unix.FS_IOC_GETFLAGS)
	if err != nil {
		return err
	}
	if on {
		flags |= fsImmutableFL
	} else {
		flags &^= fsImmutableFL
	}
	return unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, int(flags))
}
