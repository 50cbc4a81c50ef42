package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/device"
)

// tmpPrefix names the temp directories of runs; each holds the pid of its run in pidFile.
const (
	tmpPrefix = "obd-bench-io-"
	pidFile   = "pid"
)

// reclaimStale removes what runs killed without a chance to clean up (kill -9, a crash) left in workDir: the obd
// devices their FUSE servers no longer serve, the file systems mounted under their directories, the loop devices
// under those, and the directories. Directories of live runs are left alone.
func reclaimStale(ctx context.Context, workDir string) error {
	if workDir == "" {
		workDir = os.TempDir()
	}
	dirs, err := filepath.Glob(filepath.Join(workDir, tmpPrefix+"*"))
	if err != nil {
		return err
	}
	var errs []error
	for _, dir := range dirs {
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			continue
		}
		// Only directories this program made: they hold the pid of their run (an -image-dir may well match the
		// pattern too, and must stay).
		b, err := os.ReadFile(filepath.Join(dir, pidFile))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 || pid != os.Getpid() && syscall.Kill(pid, 0) == nil {
			continue // not ours, or a run in progress
		}
		logf("removing what an earlier run left in %s", dir)
		if err := reclaimDir(ctx, dir); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

func reclaimDir(ctx context.Context, dir string) error {
	// Stale obd devices: their loop devices, the file systems on them and their FUSE files.
	fl := device.NewFuseLoop(quietLogger(false))
	if _, err := fl.Reconcile(ctx, filepath.Join(dir, "state")); err != nil {
		return err
	}
	// What is still mounted below dir (the plain baselines), deepest first.
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return err
	}
	slices.SortFunc(mounts, func(a, b *mountinfo.Info) int { return len(b.Mountpoint) - len(a.Mountpoint) })
	for _, m := range mounts {
		if err := unix.Unmount(m.Mountpoint, 0); err != nil {
			if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("unmount %s: %w", m.Mountpoint, err)
			}
		}
		if idx, ok := strings.CutPrefix(m.Source, "/dev/loop"); ok {
			if n, err := strconv.Atoi(idx); err == nil {
				p := &plainMount{loop: m.Source, idx: n, target: m.Mountpoint}
				if err := p.close(); err != nil {
					return err
				}
			}
		}
	}
	return removeUnmounted(dir)
}

// removeUnmounted removes dir unless something is still mounted below it (then removing could reach into the
// mounted file system): that is an error naming the mounts.
func removeUnmounted(dir string) error {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return err
	}
	if len(mounts) > 0 {
		var mps []string
		for _, m := range mounts {
			mps = append(mps, m.Mountpoint)
		}
		return fmt.Errorf("not removing %s: still mounted below it: %s (the next run removes them)", dir, strings.Join(mps, ", "))
	}
	return os.RemoveAll(dir)
}
