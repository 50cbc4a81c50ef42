package snapshotter

import (
	"context"

	digest "github.com/opencontainers/go-digest"
)

// Layer is one overlaybd layer of an image chain, bottom first.
type Layer struct {
	// Digest and Size name the layer's overlaybd blob. Digest is empty for a locally unpacked layer whose snapshot
	// carries no blob labels (LocalPath is then the only source).
	Digest digest.Digest
	Size   int64
	// ImageRef is where to fetch the blob lazily: the image reference (host/repo:tag) from the
	// containerd.io/snapshot/image-ref or containerd.io/snapshot/cri.image-ref label of the pull.
	ImageRef string
	// LocalPath is set when the blob was downloaded and unpacked locally: the path of its overlaybd.commit file.
	LocalPath string
	// Target is the original layer blob of a TurboOCI layer (label …/turbo-oci/target-digest), fetched lazily from
	// ImageRef's repository: the layer's own blob holds only filesystem metadata. "" for an overlaybd layer.
	Target digest.Digest
	// FsType is the layer's …/overlaybd/blob-fs-type label, "fstype[;mountopts[;mkfsopts]]" ("" for ext4).
	FsType string
}

// ImageMounter attaches the virtual disk of an overlaybd layer stack and mounts its filesystem. The snapshotter
// calls it for every Prepare, View and Mounts of a snapshot whose parent chain is overlaybd, and at start-up for
// every such active snapshot, so both methods must be idempotent and safe for concurrent use with distinct ids.
// The snapshotter never calls them concurrently for the same id.
type ImageMounter interface {
	// Mount makes the virtual disk of layers available read-only (ext4) at target; idempotent for the same
	// layers+target. id is stable per image chain (the snapshot id of the chain's topmost overlaybd layer).
	Mount(ctx context.Context, id string, layers []Layer, target string) error
	// Unmount undoes Mount; it succeeds when nothing is mounted at target.
	Unmount(ctx context.Context, id string, target string) error
}

// TraceMounter is an ImageMounter that also takes an image's trace file (upstream's conventions): an empty file
// asks it to record the image's layer reads into the file; a trace file (an acceleration layer's, or one recorded
// before) is prefetched as soon as the device is attached. The file is used when the image is attached, not by
// later mounts of an attached image.
type TraceMounter interface {
	ImageMounter
	MountTrace(ctx context.Context, id string, layers []Layer, target, traceFile string) error
}

// Starter is an ImageMounter told when a container is about to start over an image it mounted: the snapshotter
// calls Starting after it prepared an active snapshot over the image's mountpoint (the image attached and mounted
// first, if it was not). It must return at once.
type Starter interface {
	ImageMounter
	Starting(id string)
}

// Preloader is an ImageMounter that can start what attaching an image will need as soon as a pull has committed
// its layers, before any container asks for it: the layers opened (their headers and indexes fetched into the
// cache) and, with a trace file, the recorded start prefetched. The snapshotter calls Preload after each commit of
// a snapshot over an overlaybd chain; it must return at once. An attach of id takes over what a preload of id
// started, and Unmount of id stops it.
type Preloader interface {
	ImageMounter
	Preload(id string, layers []Layer, traceFile string)
}

// The files of a writable layer in WritableLayer.Dir (upstream's names).
const (
	WritableDataFile  = "writable_data"
	WritableIndexFile = "writable_index"
)

// WritableLayer is a container's writable block layer (rw_mode dir or dev): an LSMT writable layer stacked on the
// image's layers, so that the container writes to the image's own filesystem instead of an overlayfs upper
// directory.
type WritableLayer struct {
	// Dir holds the layer's files, WritableDataFile and WritableIndexFile; they are created on first use.
	Dir string
	// Quota bounds, in bytes, how much the container may add to the filesystem when the layer is created (0: the
	// disk's free space); writes past it get ENOSPC.
	Quota int64
}

// WritableMounter is an ImageMounter that can also attach an image with a container's writable layer on top. The
// snapshotter calls it for the active snapshots of containers in rw_mode dir or dev, with the snapshot's id as id,
// and Unmount(id, target) when the snapshot is removed or committed.
type WritableMounter interface {
	ImageMounter
	// MountWritable attaches layers with w on top as a writable device (idempotent) and returns the device's path.
	// With a target it also mounts the device's filesystem read-write there (dir mode); without one the device is
	// left for the runtime to use (dev mode). traceFile is as for TraceMounter ("" for none).
	MountWritable(ctx context.Context, id string, layers []Layer, traceFile string, w WritableLayer, target string) (string, error)
	// SealWritable unmounts and detaches the device of id and turns w's layer into a read-only overlaybd layer
	// file at dst, an LSMT file that stacks on layers.
	SealWritable(ctx context.Context, id string, layers []Layer, w WritableLayer, dst string) error
}
