package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"

	"github.com/obdproject/obd/internal/units"
)

// Writable modes of a container's snapshot over an overlaybd image (upstream's rwMode and its label).
const (
	// RWOverlayfs gives the container an overlayfs upper directory over the image's read-only mount.
	RWOverlayfs = "overlayfs"
	// RWDir stacks a writable layer on the image's layers and mounts its filesystem read-write for the container:
	// the mount returned is a bind mount of it.
	RWDir = "dir"
	// RWDev stacks a writable layer as RWDir does but mounts nothing: the mount returned is the block device,
	// for a runtime that hands it to a VM, or mounts it itself.
	RWDev = "dev"
)

// Labels of a container's snapshot that choose its writable layer.
const (
	// LabelWritable is RWDir, RWDev or RWOverlayfs: the container's mode, over the node's rw_mode.
	LabelWritable = "containerd.io/snapshot/overlaybd.writable"
	// LabelDiskQuota bounds what a container in RWDir or RWDev may write ("20g", "512MiB"), over the node's
	// rootfs_quota.
	LabelDiskQuota = "containerd.io/snapshot/disk_quota"
	// LabelLocalCommitPath is set by the snapshotter on a snapshot committed from a writable layer: the path of
	// its sealed overlaybd layer file, which 'obd commit' (or upstream's buildkit integration) packs into an image.
	LabelLocalCommitPath = "containerd.io/snapshot/overlaybd.localcommitpath"
)

// WithWritable sets the node's default writable mode for containers over overlaybd images (RWOverlayfs if
// empty) and their default quota in bytes (0: none); the labels LabelWritable and LabelDiskQuota override them.
func WithWritable(mode string, quota int64) Option {
	return func(s *Snapshotter) { s.rwMode, s.quota = mode, quota }
}

// ParseMode checks a writable mode; "" is RWOverlayfs.
func ParseMode(m string) (string, error) {
	switch m {
	case "", RWOverlayfs:
		return RWOverlayfs, nil
	case RWDir, RWDev:
		return m, nil
	}
	return "", fmt.Errorf("writable mode %q: want %s, %s or %s", m, RWOverlayfs, RWDir, RWDev)
}

// writableOf returns the writable mode and quota that labels of a new container snapshot ask for, the node's
// defaults where they say nothing.
func (s *Snapshotter) writableOf(labels map[string]string) (mode string, quota int64, err error) {
	mode, quota = s.rwMode, s.quota
	if v, ok := labels[LabelWritable]; ok {
		mode = v
	}
	if mode, err = ParseMode(mode); err != nil {
		return "", 0, fmt.Errorf("label %s: %w", LabelWritable, err)
	}
	if v, ok := labels[LabelDiskQuota]; ok {
		if quota, err = units.ParseBytes(v); err != nil {
			return "", 0, fmt.Errorf("label %s: %w", LabelDiskQuota, err)
		}
	}
	return mode, quota, nil
}

// writableLabels records a snapshot's writable layer in its labels: the mode and quota it was made with stay its
// own whatever the node's configuration becomes.
func writableLabels(mode string, quota int64) snapshots.Opt {
	return func(info *snapshots.Info) error {
		if info.Labels == nil {
			info.Labels = map[string]string{}
		}
		info.Labels[LabelWritable] = mode
		if quota > 0 {
			info.Labels[LabelDiskQuota] = strconv.FormatInt(quota, 10)
		} else {
			delete(info.Labels, LabelDiskQuota)
		}
		return nil
	}
}

// withLabel sets one label of a snapshot, keeping the others.
func withLabel(k, v string) snapshots.Opt {
	return func(info *snapshots.Info) error {
		if info.Labels == nil {
			info.Labels = map[string]string{}
		}
		info.Labels[k] = v
		return nil
	}
}

// writableInfo returns the mode and quota of an active snapshot with a writable layer; ok is false for any other.
func writableInfo(info snapshots.Info) (mode string, quota int64, ok bool) {
	if info.Kind != snapshots.KindActive {
		return "", 0, false
	}
	mode = info.Labels[LabelWritable]
	if mode != RWDir && mode != RWDev {
		return "", 0, false
	}
	quota, _ = strconv.ParseInt(info.Labels[LabelDiskQuota], 10, 64)
	return mode, quota, true
}

// createWritable creates the active snapshot key of a container with a writable layer over plan's image.
func (s *Snapshotter) createWritable(ctx context.Context, wm WritableMounter, key, parent string, plan *imagePlan, mode string, quota int64, opts []snapshots.Opt) ([]mount.Mount, error) {
	if _, err := s.inner.Prepare(ctx, key, parent, append(opts, writableLabels(mode, quota))...); err != nil {
		return nil, err
	}
	id, _, err := s.snapshotID(ctx, key)
	var ms []mount.Mount
	if err == nil {
		unlock := s.locks.Lock(id)
		ms, err = s.mountWritable(ctx, wm, id, plan, mode, quota)
		unlock()
	}
	if err != nil {
		if rerr := s.inner.Remove(ctx, key); rerr != nil {
			s.log.Warn("cannot roll back snapshot after failed writable layer", "key", key, "error", rerr)
		}
		return nil, fmt.Errorf("prepare snapshot %q with a writable layer (%s): %w", key, mode, err)
	}
	s.log.Info("snapshot with a writable layer over overlaybd image", "key", key, "image", plan.imageRef, "mode", mode, "quota", quota, "id", id)
	return ms, nil
}

// snapshotID returns the id and info of the snapshot key.
func (s *Snapshotter) snapshotID(ctx context.Context, key string) (id string, info snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return id, info, err
}

// writableLayer returns the writable layer of snapshot id.
func (s *Snapshotter) writableLayer(id string, quota int64) WritableLayer {
	return WritableLayer{Dir: s.blockPath(id), Quota: quota}
}

// writableTarget returns where the filesystem of a writable snapshot is mounted: "" for RWDev.
func (s *Snapshotter) writableTarget(id, mode string) string {
	if mode == RWDev {
		return ""
	}
	return s.mountpoint(id)
}

// mountWritable attaches (idempotently) the writable layer of snapshot id over plan's layers and returns the mounts
// of the container: a bind mount of its filesystem (RWDir) or its block device (RWDev). The caller holds id's
// lock.
func (s *Snapshotter) mountWritable(ctx context.Context, wm WritableMounter, id string, plan *imagePlan, mode string, quota int64) ([]mount.Mount, error) {
	target := s.writableTarget(id, mode)
	dev, err := wm.MountWritable(ctx, id, plan.layers, plan.trace, s.writableLayer(id, quota), target)
	if err != nil {
		// Text only, as in attach: the error crosses gRPC.
		return nil, fmt.Errorf("mount image %s with a writable layer: %s", plan.imageRef, err)
	}
	if mode == RWDev {
		return []mount.Mount{{Type: "ext4", Source: dev, Options: []string{"rw", "discard"}}}, nil
	}
	return []mount.Mount{{Type: "bind", Source: target, Options: []string{"rw", "rbind"}}}, nil
}

// writableMounter returns the mounter as a WritableMounter, or an error saying it cannot give writable layers.
func (s *Snapshotter) writableMounter() (WritableMounter, error) {
	wm, ok := s.mounter.(WritableMounter)
	if !ok {
		return nil, errors.New("this snapshotter's image mounter cannot give containers a writable layer (rw_mode dir or dev)")
	}
	return wm, nil
}

// mountsWritable returns the mounts of the writable snapshot key (id, info), attaching its layer again if needed.
func (s *Snapshotter) mountsWritable(ctx context.Context, id string, info snapshots.Info, mode string, quota int64) ([]mount.Mount, error) {
	wm, err := s.writableMounter()
	if err != nil {
		return nil, err
	}
	plan, err := s.planChain(ctx, info.Parent)
	if err == nil && plan == nil {
		err = errors.New("its parent is no longer an overlaybd image")
	}
	if err != nil {
		return nil, fmt.Errorf("mounts of snapshot %q: %w", info.Name, err)
	}
	unlock := s.locks.Lock(id)
	defer unlock()
	return s.mountWritable(ctx, wm, id, plan, mode, quota)
}

// commitWritable seals the writable layer of the active snapshot key (id) into its fs/overlaybd.commit: the
// committed snapshot is a local overlaybd layer on top of the image's, which containers and later commits stack on.
func (s *Snapshotter) commitWritable(ctx context.Context, id string, info snapshots.Info, name, key string, quota int64, opts []snapshots.Opt) error {
	wm, err := s.writableMounter()
	if err != nil {
		return err
	}
	plan, err := s.planChain(ctx, info.Parent)
	if err == nil && plan == nil {
		err = errors.New("its parent is no longer an overlaybd image")
	}
	if err != nil {
		return fmt.Errorf("commit snapshot %q as %q: %w", key, name, err)
	}
	unlock := s.locks.Lock(id)
	defer unlock()
	dst := filepath.Join(s.upperPath(id), commitFile)
	if err := wm.SealWritable(ctx, id, plan.layers, s.writableLayer(id, quota), dst); err != nil {
		return fmt.Errorf("commit snapshot %q as %q: %w", key, name, err)
	}
	if err := s.inner.Commit(ctx, name, key, append(opts, withLabel(LabelLocalCommitPath, dst))...); err != nil {
		return err
	}
	s.log.Info("committed writable layer as an overlaybd layer", "key", key, "name", name, "file", dst)
	return nil
}

// removeWritable detaches the writable layer of the active snapshot key (id) and removes the snapshot.
func (s *Snapshotter) removeWritable(ctx context.Context, id, key, mode string) error {
	unlock := s.locks.Lock(id)
	defer unlock()
	if err := s.mounter.Unmount(ctx, id, s.writableTarget(id, mode)); err != nil {
		return fmt.Errorf("remove snapshot %q: detach its writable layer: %w", key, err)
	}
	return s.inner.Remove(ctx, key)
}

// writableUsage returns the space the writable layer of snapshot id takes on disk.
func (s *Snapshotter) writableUsage(id string) snapshots.Usage {
	var u snapshots.Usage
	for _, name := range []string{WritableDataFile, WritableIndexFile} {
		st, err := os.Stat(filepath.Join(s.blockPath(id), name))
		if err != nil {
			continue
		}
		u.Inodes++
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			u.Size += sys.Blocks * 512
		}
	}
	return u
}

// reconcileWritable attaches again the writable layer of the active snapshot info after a restart.
func (s *Snapshotter) reconcileWritable(ctx context.Context, info snapshots.Info, mode string, quota int64) error {
	id, _, err := s.snapshotID(ctx, info.Name)
	if err == nil {
		_, err = s.mountsWritable(ctx, id, info, mode, quota)
	}
	l := s.log.With("key", info.Name, "mode", mode)
	if err != nil {
		l.Warn("cannot attach a container's writable layer again", "error", err)
		return fmt.Errorf("snapshot %q: %w", info.Name, err)
	}
	l.Info("container's writable layer attached again")
	return nil
}
