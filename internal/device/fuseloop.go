package device

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// FuseLoop is the Frontend for hosts with FUSE and loop devices but no ublk, NBD or TCMU. Each device is a single
// regular file served by an in-process FUSE server (go-fuse) and mounted at StateDir/<id>/disk, with a loop device
// on top of it: the kernel mounts the loop device, the loop device reads the file (direct I/O), and every read of
// the file is a call of Backend.ReadAt.
//
// The loop device has 512-byte sectors (any filesystem block size mounts), does direct I/O on the file, and has
// neither partition scanning nor autoclear: it stays until Detach. FUSE requests are at most 128 KiB, with up to 128
// in flight per device, each served in its own goroutine. An idle device costs about 0.5 MB of Go heap and three
// goroutines, plus kernel memory for the loop device and the FUSE connection.
//
// Files and names: the FUSE filesystem has type "fuse.obd"; the loop device's backing file is
// StateDir/<escaped id>/disk, which is how ListAttached and a restarted daemon find the device again.
//
// Crash behaviour: the FUSE server runs in this process, so the devices live only as long as it does. If the
// process dies, the kernel aborts its FUSE connections; from then on every read of the loop device fails with EIO
// at once (nothing hangs) and so do reads of the filesystems mounted on it, except for pages already in their page
// cache. The loop devices and mounts stay until someone removes them. When the daemon comes back, Attach with the
// same id and StateDir finds the stale device and replaces it: it unmounts what is mounted from it (lazily if in
// use), clears the old loop device (at its last close, if still open) and attaches a new one, which the caller
// mounts again; Reconcile does the same removal for the stale devices nobody attaches again. Running containers
// whose root filesystem was on a stale device do not recover. The stale loop device cannot be switched to a new
// server in place: LOOP_CHANGE_FD works only if the dead file can still report its size (it can here: the
// attributes are cached), but it marks the block device dead, which shuts down the ext4 mounted on it. Surviving a
// crash without errors needs a process that keeps /dev/fuse open and a new server that resumes the connection
// (FUSE_NOTIFY_RESEND); go-fuse's server can only start on a connection that has not been initialised yet, so
// that needs a FUSE request loop of our own and is not done.
type FuseLoop struct {
	log    *slog.Logger
	obs    ReadObserver // nil: reads are not observed
	holder *Holder      // nil: connections end with this process
	// readAheadKB is the read_ahead_kb given to every loop device attached (see WithReadAhead).
	readAheadKB int

	mu        sync.Mutex
	slots     map[string]*slot    // by device id
	stateDirs map[string]struct{} // every StateDir seen, searched by Detach for devices of a previous process
}

// slot serializes the Attach and Detach calls of one device id and holds the device while it is attached.
type slot struct {
	mu   sync.Mutex
	refs int         // callers holding or waiting for mu; guarded by FuseLoop.mu
	att  *attachment // guarded by mu
}

// attachment is a device served by this FuseLoop.
type attachment struct {
	dev    *Device
	srv    *fuseServer
	served chan struct{} // closed when the server's loop has returned
}

// running reports whether the FUSE server of a is still serving.
func (a *attachment) running() bool {
	select {
	case <-a.served:
		return false
	default:
		return true
	}
}

// NewFuseLoop returns a FuseLoop that logs to logger (slog.Default() if nil).
func NewFuseLoop(logger *slog.Logger, opts ...FuseLoopOption) *FuseLoop {
	if logger == nil {
		logger = slog.Default()
	}
	f := &FuseLoop{log: logger, slots: map[string]*slot{}, stateDirs: map[string]struct{}{}, readAheadKB: DefaultReadAheadKB}
	for _, o := range opts {
		o(f)
	}
	return f
}

// FuseLoopOption configures a FuseLoop.
type FuseLoopOption func(*FuseLoop)

// ReadObserver is told about every read the kernel sends to a device's backend: it is called before the
// backend's ReadAt with the device id, offset and length, and the function it returns (which may be nil) is
// called after it with the bytes read and the error (nil when the read was served). Both run on the FUSE
// request's goroutine: they must be cheap and safe for concurrent use.
type ReadObserver func(id string, off, length int64) (done func(n int, err error))

// WithReadObserver makes the FuseLoop report the backend reads of the devices it attaches from now on to obs
// (for metrics and the audit log of slow reads).
func WithReadObserver(obs ReadObserver) FuseLoopOption {
	return func(f *FuseLoop) { f.obs = obs }
}

// DefaultReadAheadKB is the kernel's default read-ahead of a block device (VM_READAHEAD_PAGES), which obd sets on
// every loop device it attaches.
const DefaultReadAheadKB = 128

// WithReadAhead sets the read_ahead_kb of the loop devices attached from now on: the most the kernel reads ahead
// of a sequential reader, and the window it reads around a page fault, on the image's filesystem. Every byte read
// ahead of a cold image is fetched from the registry. A loop device keeps the read_ahead_kb it had when it was
// last used, which can be anything (one attached over a file with a large I/O size gets 2,560 KiB): obd sets it on
// each attach so that what a start fetches does not depend on which device it got. 0 leaves the device's value.
func WithReadAhead(kb int) FuseLoopOption {
	return func(f *FuseLoop) { f.readAheadKB = kb }
}

// WithHolder makes the devices outlive this process: h keeps their FUSE connections, and Attach resumes a held
// connection whose server died instead of replacing the device (see Holder).
func WithHolder(h *Holder) FuseLoopOption {
	return func(f *FuseLoop) { f.holder = h }
}

var _ Frontend = (*FuseLoop)(nil)

func (f *FuseLoop) lock(id string) *slot {
	f.mu.Lock()
	s := f.slots[id]
	if s == nil {
		s = &slot{}
		f.slots[id] = s
	}
	s.refs++
	f.mu.Unlock()
	s.mu.Lock()
	return s
}

func (f *FuseLoop) unlock(id string, s *slot) {
	att := s.att
	s.mu.Unlock()
	f.mu.Lock()
	s.refs--
	if s.refs == 0 && att == nil {
		delete(f.slots, id)
	}
	f.mu.Unlock()
}

// Attach serves b as a block device named by id (see FuseLoop for how). It is idempotent: while this FuseLoop
// serves id, it returns the same *Device. A stale device of the same id, whose FUSE server died, is replaced (see
// FuseLoop); a device of the same id served by another live FuseLoop or process is an error.
func (f *FuseLoop) Attach(ctx context.Context, id string, b Backend, opts AttachOptions) (*Device, error) {
	dir, err := deviceDir(opts.StateDir, id)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", id, err)
	}
	size := b.Size()
	if size <= 0 || size%loopSectorSize != 0 {
		return nil, fmt.Errorf("attach %s: disk size %d is not a positive multiple of %d", id, size, loopSectorSize)
	}
	var w WritableBackend
	if !opts.ReadOnly {
		var ok bool
		if w, ok = b.(WritableBackend); !ok {
			return nil, fmt.Errorf("attach %s: a writable device needs a backend with WriteAt; attach it read-only", id)
		}
	}
	f.mu.Lock()
	f.stateDirs[filepath.Clean(opts.StateDir)] = struct{}{}
	f.mu.Unlock()

	s := f.lock(id)
	defer f.unlock(id, s)
	if a := s.att; a != nil {
		if a.running() {
			if a.dev.ReadOnly != opts.ReadOnly || filepath.Dir(a.dev.BackingFile) != dir {
				return nil, fmt.Errorf("attach %s: already attached as %s (read-only %v, backing file %s) with other options; detach it first",
					id, a.dev.Path, a.dev.ReadOnly, a.dev.BackingFile)
			}
			return a.dev, nil
		}
		f.log.Warn("FUSE server of device stopped; attaching again", "device", id, "loop", a.dev.Path)
		s.att = nil
	}
	disk := filepath.Join(dir, diskName)
	if a, err := f.resumeHeld(ctx, id, disk, b, w); err != nil {
		return nil, fmt.Errorf("attach %s: %w", id, err)
	} else if a != nil {
		s.att = a
		return a.dev, nil
	}
	st, err := inspect(disk)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", id, err)
	}
	if st.served {
		where := "a FUSE server"
		if len(st.loops) > 0 {
			where = loopPath(st.loops[0])
		}
		return nil, fmt.Errorf("attach %s: already attached (%s on %s) and served by another FuseLoop or process; detach it there first",
			id, where, disk)
	}
	if len(st.loops) > 0 || st.fuseMounts > 0 {
		f.log.Warn("replacing stale device left by a dead FUSE server", "device", id, "loops", st.loops, "fuse_mounts", st.fuseMounts)
		if err := discardStale(ctx, f.log.With("device", id), disk, st.loops); err != nil {
			return nil, fmt.Errorf("attach %s: remove stale device: %w", id, err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("attach %s: %w", id, err)
	}
	// The FUSE filesystem is mounted on this empty file.
	if fd, err := unix.Open(disk, unix.O_CREAT|unix.O_RDONLY|unix.O_CLOEXEC, 0o600); err != nil {
		return nil, fmt.Errorf("attach %s: create %s: %w", id, disk, err)
	} else {
		unix.Close(fd)
	}
	a, err := f.serve(id, disk, b, w)
	if err != nil {
		return nil, fmt.Errorf("attach %s: %w", id, err)
	}
	dio, err := f.attachLoop(ctx, a)
	if err != nil {
		if terr := teardown(context.WithoutCancel(ctx), disk, nil, a.served); terr != nil {
			f.log.Error("cleaning up after a failed attach", "device", id, "err", terr)
		}
		return nil, fmt.Errorf("attach %s: %w", id, err)
	}
	f.log.Info("attached device", "device", id, "loop", a.dev.Path, "size", size, "read_only", opts.ReadOnly, "direct_io", dio)
	f.hold(id, a)
	s.att = a
	return a.dev, nil
}

// hold gives the connection of a new device to the holder, if there is one and the kernel can re-send requests to
// a new server (FUSE_NOTIFY_RESEND, Linux 6.9): without that, the requests a dead server had read would wait
// forever, so the device is better off failing with EIO when its server dies.
func (f *FuseLoop) hold(id string, a *attachment) {
	if f.holder == nil {
		return
	}
	var resend bool
	select {
	case resend = <-a.srv.hasResend:
	default: // INIT was answered before the loop device could open the file
	}
	if !resend {
		f.log.Warn("the kernel cannot resend FUSE requests (Linux 6.9 and newer can): the device fails with EIO if this process dies", "device", id)
		return
	}
	if err := f.holder.Put(id, a.srv.fd, HeldDevice{Size: a.dev.Size, ReadOnly: a.dev.ReadOnly}); err != nil {
		f.log.Error("cannot hand the device's connection to the holder: the device fails with EIO if this process dies", "device", id, "err", err)
	}
}

// Suspend stops serving every device this FuseLoop serves, for a process about to exit while its Holder keeps the
// devices: the requests being served are answered (until ctx ends), later ones wait in the kernel for the next
// process, which resumes the devices (Attach). Without a Holder it does nothing. The FuseLoop must not be used
// afterwards.
func (f *FuseLoop) Suspend(ctx context.Context) {
	if f.holder == nil {
		return
	}
	f.mu.Lock()
	ids := make([]string, 0, len(f.slots))
	for id := range f.slots {
		ids = append(ids, id)
	}
	f.mu.Unlock()
	var srvs []*fuseServer
	for _, id := range ids {
		s := f.lock(id)
		if a := s.att; a != nil {
			srvs = append(srvs, a.srv)
		}
		f.unlock(id, s)
	}
	var wg sync.WaitGroup
	for _, srv := range srvs {
		wg.Go(func() { srv.pause(ctx) })
	}
	wg.Wait()
}

// resumeHeld takes over the device at disk if the holder holds its connection: the server that served it died
// (this process restarted), its loop device and mounts are still there, and requests wait in the kernel. It
// returns nil, nil if there is nothing to resume; a held connection of another size or mode, or that no longer
// serves the disk, is dropped (the device is then stale and replaced).
func (f *FuseLoop) resumeHeld(ctx context.Context, id, disk string, b Backend, w WritableBackend) (*attachment, error) {
	if f.holder == nil {
		return nil, nil
	}
	fd, meta, err := f.holder.Get(id)
	if err != nil || fd < 0 {
		return nil, err
	}
	if meta.Size != b.Size() || meta.ReadOnly != (w == nil) {
		unix.Close(fd)
		f.log.Warn("the held device has another size or mode than the image attached now: replacing it", "device", id,
			"held_size", meta.Size, "size", b.Size(), "held_read_only", meta.ReadOnly)
		return nil, f.holder.Delete(id)
	}
	a, err := f.resume(id, disk, fd, b, w)
	if err == nil && a.dev.Path == "" {
		// The previous server died between mounting the file and attaching the loop device.
		_, err = f.attachLoop(ctx, a)
	}
	if err != nil {
		f.log.Warn("cannot resume the held device: replacing it", "device", id, "err", err)
		if derr := f.holder.Delete(id); derr != nil {
			return nil, derr
		}
		if a != nil {
			// Without the holder's descriptor, unmounting the file ends the connection and the server.
			if terr := unmountFUSE(disk); terr != nil {
				return nil, terr
			}
			<-a.served
		}
		return nil, nil
	}
	f.log.Info("resumed device whose server had died", "device", id, "loop", a.dev.Path, "size", a.dev.Size, "read_only", a.dev.ReadOnly)
	// Put it again through this process's Holder, which then hands it to a new holder process if this one dies.
	if err := f.holder.Put(id, a.srv.fd, meta); err != nil {
		f.log.Error("cannot hand the resumed device's connection to the holder", "device", id, "err", err)
	}
	return a, nil
}

// diskName is the name of the FUSE-served file in a device's directory.
const diskName = "disk"

// fuseType is the filesystem type of the FUSE mounts, as /proc/self/mountinfo shows it.
const fuseType = "fuse.obd"

// serve mounts a FUSE filesystem serving b at disk and starts its server.
func (f *FuseLoop) serve(id, disk string, b Backend, w WritableBackend) (*attachment, error) {
	fs := &diskFS{id: id, b: b, log: f.log, obs: f.obs}
	flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
	if w != nil {
		fs.w = w
	} else {
		flags |= unix.MS_RDONLY
	}
	// O_CLOEXEC: a child process that inherited the descriptor would keep the connection open after this process
	// dies (reads would hang instead of failing); only a Holder keeps it, on purpose.
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("serve %s with FUSE: %w", disk, err)
	}
	opts := fmt.Sprintf("fd=%d,rootmode=%o,user_id=%d,group_id=%d,max_read=%d", fd, unix.S_IFREG, os.Geteuid(), os.Getegid(), fuseMaxWrite)
	if err := unix.Mount("obd", disk, fuseType, flags, opts); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("serve %s with FUSE: mount: %w", disk, err)
	}
	srv := newFUSEServer(fd, fs, f.log)
	if err := srv.start(false); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &attachment{dev: &Device{ID: id, Size: b.Size(), ReadOnly: w == nil, BackingFile: disk}, srv: srv, served: srv.served}, nil
}

// resume serves b on fd, the held connection of the device at disk whose server died (see Holder), and finds its
// loop device. On error the server may be running: the caller tears the device down.
func (f *FuseLoop) resume(id, disk string, fd int, b Backend, w WritableBackend) (*attachment, error) {
	fs := &diskFS{id: id, b: b, w: w, log: f.log, obs: f.obs}
	srv := newFUSEServer(fd, fs, f.log)
	if err := srv.start(true); err != nil {
		unix.Close(fd)
		return nil, err
	}
	a := &attachment{dev: &Device{ID: id, Size: b.Size(), ReadOnly: w == nil, BackingFile: disk}, srv: srv, served: srv.served}
	st, err := inspect(disk)
	if err != nil {
		return a, err
	}
	if !st.served {
		return a, fmt.Errorf("the held connection does not serve %s", disk)
	}
	if len(st.loops) > 0 {
		a.dev.Path = loopPath(st.loops[0])
	}
	return a, nil
}

// attachLoop puts a new loop device on top of the served file, sets its read-ahead (see WithReadAhead) and
// reports whether it does direct I/O.
func (f *FuseLoop) attachLoop(ctx context.Context, a *attachment) (dio bool, err error) {
	flags := unix.O_RDWR
	if a.dev.ReadOnly {
		flags = unix.O_RDONLY
	}
	// unix.Open, not os.OpenFile: the Go runtime would register the FUSE file with its poller, which sends a POLL
	// request to our own server.
	fd, err := unix.Open(a.dev.BackingFile, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, fmt.Errorf("open %s: %w", a.dev.BackingFile, err)
	}
	defer unix.Close(fd)
	idx, dio, err := loopAttach(ctx, fd, a.dev.ReadOnly, a.dev.BackingFile)
	if err != nil {
		return false, err
	}
	a.dev.Path = loopPath(idx)
	if f.readAheadKB > 0 {
		if err := setReadAhead(idx, f.readAheadKB); err != nil {
			f.log.Warn("the loop device keeps its read-ahead", "device", a.dev.Path, "err", err)
		}
	}
	return dio, nil
}

// Detach unmounts every filesystem mounted from the device (in this mount namespace), clears the loop device,
// unmounts the FUSE file and stops its server. It finds devices that this FuseLoop attached, and devices left by a
// previous process under a StateDir that this FuseLoop was given (by Attach or Reconcile). If a filesystem on the
// device is busy, it is detached lazily and Detach fails with an error wrapping ErrBusy, leaving the device served;
// call Detach again once the users are gone. Detaching an unknown id does nothing.
func (f *FuseLoop) Detach(ctx context.Context, id string) error {
	s := f.lock(id)
	defer f.unlock(id, s)
	if a := s.att; a != nil {
		idx, err := loopIndex(a.dev.Path)
		if err != nil {
			return fmt.Errorf("detach %s: %w", id, err)
		}
		if err := teardown(ctx, a.dev.BackingFile, []int{idx}, a.served); err != nil {
			return fmt.Errorf("detach %s: %w", id, err)
		}
		if f.holder != nil {
			if err := f.holder.Delete(id); err != nil {
				f.log.Warn("the holder still holds the connection of a detached device", "device", id, "err", err)
			}
		}
		s.att = nil
		f.log.Info("detached device", "device", id, "loop", a.dev.Path)
		return nil
	}
	if err := f.dropHeld(id); err != nil {
		return fmt.Errorf("detach %s: %w", id, err)
	}
	f.mu.Lock()
	dirs := make([]string, 0, len(f.stateDirs))
	for d := range f.stateDirs {
		dirs = append(dirs, d)
	}
	f.mu.Unlock()
	for _, root := range dirs {
		dir, err := deviceDir(root, id)
		if err != nil {
			return fmt.Errorf("detach %s: %w", id, err)
		}
		disk := filepath.Join(dir, diskName)
		st, err := inspect(disk)
		if err != nil {
			return fmt.Errorf("detach %s: %w", id, err)
		}
		if len(st.loops) == 0 && st.fuseMounts == 0 {
			continue
		}
		if st.served {
			return fmt.Errorf("detach %s: %s is served by another FuseLoop or process; detach it there", id, disk)
		}
		if err := discardStale(ctx, f.log.With("device", id), disk, st.loops); err != nil {
			return fmt.Errorf("detach %s: %w", id, err)
		}
		f.log.Info("detached stale device left by a dead FUSE server", "device", id, "loops", st.loops)
	}
	return nil
}

// teardown removes a device: the mounts of its loop devices, the loop devices, the FUSE mounts at disk, and the
// device's directory. If served is not nil, it waits for that server to stop.
func teardown(ctx context.Context, disk string, loops []int, served <-chan struct{}) error {
	if err := clearLoops(ctx, loops); err != nil {
		return err
	}
	if err := unmountFUSE(disk); err != nil {
		return err
	}
	if served != nil {
		// Once the FUSE filesystem is unmounted and the loop device has let go of its file, the kernel ends the
		// connection and the server's loop returns.
		t := time.NewTimer(10 * time.Second)
		defer t.Stop()
		select {
		case <-served:
		case <-ctx.Done():
			return fmt.Errorf("wait for the FUSE server of %s to stop: %w", disk, ctx.Err())
		case <-t.C:
			return fmt.Errorf("FUSE server of %s did not stop 10s after unmount (is the file still open somewhere? see 'fuser -v %s'): %w", disk, disk, ErrBusy)
		}
	}
	return removeDeviceDir(disk)
}

// clearLoops unmounts the filesystems mounted from the loop devices and clears them.
func clearLoops(ctx context.Context, loops []int) error {
	if len(loops) == 0 {
		return nil
	}
	mounts, err := readMountInfo()
	if err != nil {
		return err
	}
	for _, idx := range loops {
		dev, err := deviceNumber(loopPath(idx))
		if err != nil {
			return err
		}
		for _, mp := range mountsOf(mounts, dev) {
			if err := Unmount(mp); err != nil {
				return fmt.Errorf("unmount %s from %s: %w", loopPath(idx), mp, err)
			}
		}
		if err := loopClear(ctx, idx, 5*time.Second); err != nil {
			return err
		}
	}
	return nil
}

// discardStale removes what is left of a device whose FUSE server is gone, without waiting for its users: the
// filesystems mounted from its loop devices are unmounted (lazily if in use: they only return EIO anyway), the loop
// devices are cleared (the kernel defers that to the last close of a device still open), the dead FUSE mount is
// detached and the device directory removed. A stale device that is still in use thus lingers, no longer
// reachable under the state directory, until its last user goes; that is logged, not returned as an error.
func discardStale(ctx context.Context, log *slog.Logger, disk string, loops []int) error {
	mounts, err := readMountInfo()
	if err != nil {
		return err
	}
	for _, idx := range loops {
		dev, err := deviceNumber(loopPath(idx))
		if err != nil {
			return err
		}
		for _, mp := range mountsOf(mounts, dev) {
			if err := Unmount(mp); errors.Is(err, ErrBusy) {
				log.Warn("stale filesystem is still in use; detached lazily", "loop", loopPath(idx), "mountpoint", mp)
			} else if err != nil {
				return err
			}
		}
		if err := loopClear(ctx, idx, 0); errors.Is(err, ErrBusy) {
			log.Warn("stale loop device is still open; the kernel clears it at its last close", "loop", loopPath(idx))
		} else if err != nil {
			return err
		}
	}
	if err := unmountFUSE(disk); err != nil {
		return err
	}
	return removeDeviceDir(disk)
}

// removeDeviceDir removes the (unmounted) disk file and the device directory that holds it.
func removeDeviceDir(disk string) error {
	if err := os.Remove(disk); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Remove(filepath.Dir(disk)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// unmountFUSE unmounts every FUSE filesystem of ours mounted at disk. A mount still in use (a dead one below a stale
// loop device that is still open) is detached lazily.
func unmountFUSE(disk string) error {
	for range 8 { // mounts can be stacked at the same path
		mounts, err := readMountInfo()
		if err != nil {
			return err
		}
		if countFUSEMounts(mounts, disk) == 0 {
			return nil
		}
		err = unix.Unmount(disk, 0)
		if errors.Is(err, unix.EBUSY) {
			err = unix.Unmount(disk, unix.MNT_DETACH)
		}
		if err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmount FUSE file %s: %w", disk, err)
		}
	}
	return fmt.Errorf("unmount FUSE file %s: still mounted after 8 unmounts", disk)
}

func countFUSEMounts(mounts []mountEntry, disk string) int {
	n := 0
	for _, m := range mounts {
		if m.mountPoint == disk && m.fsType == fuseType {
			n++
		}
	}
	return n
}

// diskState is what the system holds for one device file.
type diskState struct {
	loops      []int // loop devices whose backing file is the disk file
	fuseMounts int   // FUSE mounts of ours at the disk file
	served     bool  // the topmost FUSE mount answers, and the loop devices (if any) read from it
}

// inspect finds the loop devices and FUSE mounts of the device file disk and whether a live server serves them.
// A live server answers at once; the probe blocks only if that server is alive but stuck (for example stopped
// with SIGSTOP).
func inspect(disk string) (diskState, error) {
	var st diskState
	loops, err := listLoops()
	if err != nil {
		return st, err
	}
	for _, l := range loops {
		if l.backing == disk {
			st.loops = append(st.loops, l.index)
		}
	}
	mounts, err := readMountInfo()
	if err != nil {
		return st, err
	}
	st.fuseMounts = countFUSEMounts(mounts, disk)
	if st.fuseMounts == 0 {
		return st, nil
	}
	// statfs is never answered from a cache: it fails with ENOTCONN at once if the server is gone.
	var sfs unix.Statfs_t
	if err := unix.Statfs(disk, &sfs); err != nil || sfs.Type != unix.FUSE_SUPER_MAGIC {
		return st, nil
	}
	var fst unix.Stat_t
	if err := unix.Stat(disk, &fst); err != nil {
		return st, nil
	}
	st.served = true
	for _, idx := range st.loops {
		info, err := loopStatus(idx)
		if err != nil || info.Device != fst.Dev || info.Inode != fst.Ino {
			st.served = false // the loop device reads a file of an older mount at the same path
		}
	}
	return st, nil
}

// AttachedInfo describes a device found by ListAttached.
type AttachedInfo struct {
	// ID is the device id.
	ID string
	// Path is the loop device node, or "" for a FUSE file without a loop device (an interrupted attach or detach).
	Path string
	// BackingFile is the FUSE-served file of the device.
	BackingFile string
	// Served reports whether a live FUSE server (of this or another process) serves the device. A device that is
	// not served is stale: its reads fail with EIO.
	Served bool
}

// ListAttached returns the devices attached by FuseLoop under stateRoot (the StateDir given to Attach), whichever
// process attached them: the loop devices whose backing file is stateRoot/<id>/disk, and FUSE files there without
// a loop device. It is how a restarted daemon finds what a previous run left behind.
func ListAttached(stateRoot string) ([]AttachedInfo, error) {
	root, err := filepath.Abs(stateRoot)
	if err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list devices in %s: %w", root, err)
	}
	var out []AttachedInfo
	for _, e := range ents {
		id, ok := decodeID(e.Name())
		if !ok || !e.IsDir() {
			continue
		}
		disk := filepath.Join(root, e.Name(), diskName)
		st, err := inspect(disk)
		if err != nil {
			return nil, fmt.Errorf("list devices in %s: %w", root, err)
		}
		for _, idx := range st.loops {
			out = append(out, AttachedInfo{ID: id, Path: loopPath(idx), BackingFile: disk, Served: st.served})
		}
		if len(st.loops) == 0 && st.fuseMounts > 0 {
			out = append(out, AttachedInfo{ID: id, BackingFile: disk, Served: st.served})
		}
	}
	return out, nil
}

// Reconcile cleans up after a previous daemon process: it detaches every stale device under stateDir (listed by
// ListAttached, not served by any live FUSE server, and not attached by this FuseLoop), unmounting what is mounted
// from it. Devices that are served — by this FuseLoop or by another live process — are left alone. It returns
// the devices that remain under stateDir, and the errors of the devices it could not detach (busy ones included).
//
// A restarted daemon should first Attach the devices it still wants (a stale read-only device is then recovered
// in place, keeping its mounts) and then call Reconcile to remove the rest.
func (f *FuseLoop) Reconcile(ctx context.Context, stateDir string) ([]AttachedInfo, error) {
	f.mu.Lock()
	f.stateDirs[filepath.Clean(stateDir)] = struct{}{}
	f.mu.Unlock()
	if f.holder != nil {
		held, err := f.holder.List()
		if err != nil {
			return nil, fmt.Errorf("reconcile: %w", err)
		}
		for id := range held {
			s := f.lock(id)
			if s.att == nil || !s.att.running() {
				f.log.Warn("dropping the held connection of a device nobody attached again", "device", id)
				err = f.dropHeld(id)
			}
			f.unlock(id, s)
			if err != nil {
				return nil, fmt.Errorf("reconcile: %w", err)
			}
		}
	}
	found, err := ListAttached(stateDir)
	if err != nil {
		return nil, err
	}
	var errs []error
	detached := map[string]bool{}
	for _, info := range found {
		if info.Served || detached[info.ID] {
			continue
		}
		if err := f.detachStale(ctx, info); err != nil {
			errs = append(errs, err)
			continue
		}
		detached[info.ID] = true
	}
	var remain []AttachedInfo
	for _, info := range found {
		if !detached[info.ID] {
			remain = append(remain, info)
		}
	}
	return remain, errors.Join(errs...)
}

// dropHeld makes the holder close the connection it holds for a device that this FuseLoop does not serve, so that
// the device is stale (failing with EIO) instead of waiting for a server, and can be removed.
func (f *FuseLoop) dropHeld(id string) error {
	if f.holder == nil {
		return nil
	}
	return f.holder.Delete(id)
}

// detachStale detaches the stale device described by info unless this FuseLoop attached its id meanwhile.
func (f *FuseLoop) detachStale(ctx context.Context, info AttachedInfo) error {
	s := f.lock(info.ID)
	defer f.unlock(info.ID, s)
	if a := s.att; a != nil && a.running() {
		return nil
	}
	st, err := inspect(info.BackingFile)
	if err != nil {
		return fmt.Errorf("reconcile %s: %w", info.ID, err)
	}
	if st.served {
		return nil
	}
	f.log.Warn("detaching stale device left by a dead FUSE server", "device", info.ID, "loops", st.loops)
	if err := discardStale(ctx, f.log.With("device", info.ID), info.BackingFile, st.loops); err != nil {
		return fmt.Errorf("reconcile %s: %w", info.ID, err)
	}
	return nil
}

// deviceDir returns the directory of device id under stateDir.
func deviceDir(stateDir, id string) (string, error) {
	if !filepath.IsAbs(stateDir) {
		return "", fmt.Errorf("state directory %q is not an absolute path", stateDir)
	}
	if id == "" {
		return "", errors.New("empty device id")
	}
	name := encodeID(id)
	if len(name) > 255 {
		return "", fmt.Errorf("device id %q is too long (%d bytes escaped, at most 255)", id, len(name))
	}
	return filepath.Join(filepath.Clean(stateDir), name), nil
}

// encodeID turns a device id into a file name: letters, digits, '-', '_' and non-leading '.' stay, every other
// byte becomes %XX.
func encodeID(id string) string {
	var b strings.Builder
	for i := 0; i < len(id); i++ {
		c := id[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.' && i > 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// decodeID reverses encodeID; ok is false for names encodeID does not produce.
func decodeID(name string) (id string, ok bool) {
	var b strings.Builder
	for i := 0; i < len(name); i++ {
		if name[i] != '%' {
			b.WriteByte(name[i])
			continue
		}
		if i+3 > len(name) {
			return "", false
		}
		v, err := strconv.ParseUint(name[i+1:i+3], 16, 8)
		if err != nil {
			return "", false
		}
		b.WriteByte(byte(v))
		i += 2
	}
	id = b.String()
	return id, id != "" && encodeID(id) == name
}
