package main

import (
	"context"
	"errors"

	"github.com/obdproject/obd/internal/snapshotter"
)

// newImageMounter returns the ImageMounter the daemon uses for overlaybd images.
// TODO(wiring): replace with the registry + block cache + LSMT + FUSE/loop device stack once it is in the tree.
func newImageMounter() snapshotter.ImageMounter { return unavailableMounter{} }

// errNoLazyMounts is what containers of overlaybd images get from a build without the device stack.
var errNoLazyMounts = errors.New("overlaybd lazy mounts are not available in this build")

// unavailableMounter fails every mount: normal images work, overlaybd images cannot run.
type unavailableMounter struct{}

func (unavailableMounter) Mount(context.Context, string, []snapshotter.Layer, string) error {
	return errNoLazyMounts
}

// Unmount succeeds: this mounter never mounted anything, and removing images must keep working.
func (unavailableMounter) Unmount(context.Context, string, string) error { return nil }
