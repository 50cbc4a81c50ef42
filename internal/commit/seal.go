package commit

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/snapshotter"
)

// Sealed is a container's writable layers, sealed: the files to pack, over the image the container runs.
type Sealed struct {
	// Image is the name of the container's image in containerd.
	Image string
	// Snapshot is the committed snapshot holding the container's changes.
	Snapshot string
	// Layers are the sealed layer files of the container's snapshot chain, bottom first: the one just sealed and
	// those of earlier commits it stacks on.
	Layers []string
}

// Seal commits the writable layer of container id through containerd: the snapshotter seals it into a layer
// file, and the container gets a new, empty writable layer over it, so it keeps its files and can start again.
// The container must have no task (its filesystem must be unmounted) and its snapshot a writable layer (rw_mode
// dir or dev) of the snapshotter named sn.
func Seal(ctx context.Context, c *client.Client, id, sn string) (*Sealed, error) {
	ctr, err := c.LoadContainer(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	info, err := ctr.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", id, err)
	}
	if info.Snapshotter != sn {
		return nil, fmt.Errorf("container %s uses snapshotter %q, not %q: only a container on obd's snapshotter with a writable layer can be committed", id, info.Snapshotter, sn)
	}
	if t, err := ctr.Task(ctx, nil); err == nil {
		st, _ := t.Status(ctx)
		return nil, fmt.Errorf("container %s has a task (%s): its filesystem is in use; stop and delete the task first (ctr task kill, ctr task delete)", id, st.Status)
	} else if !errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("container %s: task: %w", id, err)
	}
	ss := c.SnapshotService(sn)
	key := info.SnapshotKey
	active, err := ss.Stat(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("container %s: snapshot %q: %w", id, key, err)
	}
	if m := active.Labels[snapshotter.LabelWritable]; m != snapshotter.RWDir && m != snapshotter.RWDev {
		return nil, fmt.Errorf("container %s has no writable overlaybd layer (its writable mode is %q): create it with the label %s=dir (or rw_mode dir in obd.toml)", id, m, snapshotter.LabelWritable)
	}
	// A lease keeps the committed snapshot from containerd's garbage collector until the container's new snapshot
	// refers to it.
	ctx, done, err := c.WithLease(ctx)
	if err != nil {
		return nil, err
	}
	defer done(context.WithoutCancel(ctx))
	name := key + "@obd-commit-" + strconv.FormatInt(time.Now().UnixNano(), 10)
	if err := ss.Commit(ctx, name, key); err != nil {
		return nil, fmt.Errorf("container %s: commit snapshot %q: %w", id, key, err)
	}
	if _, err := ss.Prepare(ctx, key, name, snapshots.WithLabels(active.Labels)); err != nil {
		return nil, fmt.Errorf("container %s: its changes are committed as snapshot %q, but a new writable layer over them failed: %w (create a container from that snapshot)", id, name, err)
	}
	s := &Sealed{Image: info.Image, Snapshot: name}
	for p := name; p != ""; {
		si, err := ss.Stat(ctx, p)
		if err != nil {
			return nil, fmt.Errorf("container %s: snapshot %q: %w", id, p, err)
		}
		path, ok := si.Labels[snapshotter.LabelLocalCommitPath]
		if !ok {
			break
		}
		s.Layers = append([]string{path}, s.Layers...)
		p = si.Parent
	}
	if len(s.Layers) == 0 {
		return nil, fmt.Errorf("container %s: snapshot %q has no label %s: is %q obd's snapshotter?", id, name, snapshotter.LabelLocalCommitPath, sn)
	}
	return s, nil
}

// ContainerdBase reads the manifest and config of the image name from containerd's content store (a lazily
// pulled overlaybd image has them, not its layers) for the platform of this machine.
func ContainerdBase(ctx context.Context, c *client.Client, name string) (Base, error) {
	img, err := c.ImageService().Get(ctx, name)
	if err != nil {
		return Base{}, fmt.Errorf("image %s: %w", name, err)
	}
	cs := c.ContentStore()
	m, err := images.Manifest(ctx, cs, img.Target, platforms.Default())
	if err != nil {
		return Base{}, fmt.Errorf("image %s: %w", name, err)
	}
	cfg, err := content.ReadBlob(ctx, cs, m.Config)
	if err != nil {
		return Base{}, fmt.Errorf("image %s: config: %w", name, err)
	}
	mt := m.MediaType
	if mt == "" {
		mt = ocispec.MediaTypeImageManifest
	}
	return Base{Manifest: m, MediaType: mt, Config: cfg}, nil
}
