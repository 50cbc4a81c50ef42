package snapshotter

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/image"
)

// Modes of an image in ImageStatus: how the containers' lower filesystem is served.
const (
	ModeLazy      = "lazy"      // overlaybd layers read from the registry on demand
	ModeLocal     = "local"     // overlaybd layers downloaded and unpacked by containerd, read from local files
	ModeMixed     = "mixed"     // some overlaybd layers local, the others lazy
	ModeOverlayfs = "overlayfs" // a normal image: its unpacked layer directories, as containerd's overlayfs does
	ModeInvalid   = "invalid"   // a chain the snapshotter cannot mount (its error is the reason)
)

// ImageStatus says how the active and view snapshots (container root filesystems) over one image are served and
// why. Overlaybd images are grouped by their mount id, normal images by their parent snapshot.
type ImageStatus struct {
	// MountID is the ImageMounter id of an overlaybd image, "" otherwise.
	MountID string
	// Parent is the committed snapshot the first listed snapshot is made over (the image's top layer).
	Parent string
	// ImageRef is the image reference from the layers' labels, "" when the pull set none.
	ImageRef string
	Mode     string
	// Reason says in a sentence why the image is served in Mode, and what to do about an unwanted mode.
	Reason string
	// Layers are the overlaybd layers, bottom first (none for ModeOverlayfs).
	Layers []Layer
	// Snapshots are the keys of the active and view snapshots over the image.
	Snapshots []string
	// Writable are the containers' writable layers (RWDir, RWDev) among Snapshots.
	Writable []WritableStatus
}

// WritableStatus is a container's writable layer over an image.
type WritableStatus struct {
	Key string
	// MountID is the ImageMounter id of the layer's device (the snapshot's id).
	MountID string
	Mode    string
	Quota   int64
	// Bytes is the space the layer's files take on disk: what the container wrote and kept.
	Bytes int64
}

// Status describes every image that active or view snapshots are made over, sorted by mount id and parent.
func (s *Snapshotter) Status(ctx context.Context) ([]ImageStatus, error) {
	var users []snapshots.Info
	if err := s.inner.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if info.Kind != snapshots.KindCommitted && info.Parent != "" && !isLayerUnpack(info.Labels) {
			users = append(users, info)
		}
		return nil
	}); err != nil && !errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("snapshotter status: %w", err)
	}
	byKey := map[string]*ImageStatus{}
	var out []*ImageStatus
	for _, u := range users {
		st, err := s.imageStatus(ctx, u.Parent)
		if err != nil {
			return nil, err
		}
		key := "parent:" + st.Parent
		if st.MountID != "" {
			key = "mount:" + st.MountID
		}
		if prev := byKey[key]; prev != nil {
			st = prev
		} else {
			byKey[key] = st
			out = append(out, st)
		}
		st.Snapshots = append(st.Snapshots, u.Name)
		if mode, quota, ok := writableInfo(u); ok {
			if id, _, err := s.snapshotID(ctx, u.Name); err == nil {
				st.Writable = append(st.Writable, WritableStatus{Key: u.Name, MountID: id, Mode: mode, Quota: quota, Bytes: s.writableUsage(id).Size})
			}
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].MountID != out[j].MountID {
			return out[i].MountID < out[j].MountID
		}
		return out[i].Parent < out[j].Parent
	})
	res := make([]ImageStatus, len(out))
	for i, st := range out {
		sort.Strings(st.Snapshots)
		sort.Slice(st.Writable, func(a, b int) bool { return st.Writable[a].Key < st.Writable[b].Key })
		res[i] = *st
	}
	return res, nil
}

// imageStatus classifies the chain ending at parent.
func (s *Snapshotter) imageStatus(ctx context.Context, parent string) (*ImageStatus, error) {
	st := &ImageStatus{Parent: parent}
	type entry struct {
		id   string
		info snapshots.Info
	}
	var chain []entry // top first
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		for name := parent; name != ""; {
			id, info, _, err := storage.GetInfo(ctx, name)
			if err != nil {
				return err
			}
			chain = append(chain, entry{id, info})
			name = info.Parent
		}
		return nil
	}); err != nil {
		st.Mode, st.Reason = ModeInvalid, fmt.Sprintf("parent chain of %q: %v", parent, err)
		return st, nil
	}
	for _, e := range chain {
		if st.ImageRef = imageRef(e.info.Labels); st.ImageRef != "" {
			break
		}
	}
	plan, err := s.planChain(ctx, parent)
	switch {
	case err != nil:
		st.Mode, st.Reason = ModeInvalid, err.Error()
		return st, nil
	case plan == nil:
		st.Mode = ModeOverlayfs
		st.Reason = "a normal image (no layer has overlaybd blob labels): unpacked by containerd and served by overlayfs; convert it with 'obd convert' to pull it lazily"
		return st, nil
	}
	st.MountID, st.Layers = plan.id, plan.layers
	if plan.imageRef != "" && plan.imageRef != "(locally unpacked)" {
		st.ImageRef = plan.imageRef
	}
	local, why := 0, ""
	for _, e := range chain {
		l := e.info.Labels
		if l[LabelRemote] == LabelRemoteValue || l[image.AnnotationAccelerationLayer] == "yes" ||
			!isOverlaybdFile(filepath.Join(s.upperPath(e.id), commitFile)) {
			continue
		}
		local++
		if why == "" {
			why = downloadReason(l)
		}
	}
	switch {
	case local == 0:
		st.Mode = ModeLazy
		st.Reason = "overlaybd layers are read from the registry on demand and kept in the block cache"
	case local == len(plan.layers):
		st.Mode = ModeLocal
		st.Reason = "every overlaybd layer was downloaded: " + why
	default:
		st.Mode = ModeMixed
		st.Reason = fmt.Sprintf("%d of %d overlaybd layers were downloaded (%s); the others are read on demand", local, len(plan.layers), why)
	}
	return st, nil
}

// downloadReason explains, from the labels of a layer that containerd downloaded, why it was not pulled lazily.
func downloadReason(labels map[string]string) string {
	switch {
	case labels[LabelDownloadBlob] == "download":
		return "the pull asked for a full download (label " + LabelDownloadBlob + "=download)"
	case imageRef(labels) == "":
		return "the pull passed no image reference (label " + LabelImageRef + " or " + LabelCRIImageRef +
			"), so containerd downloaded and unpacked the layers; pull with 'obd pull', or for CRI pulls set disable_snapshot_annotations = false in containerd's config"
	}
	return "containerd downloaded and unpacked the layers"
}

// LayerBlobs returns the overlaybd layer blobs of the images pulled on this node: the blob digests of its
// committed snapshots.
func (s *Snapshotter) LayerBlobs(ctx context.Context) (map[digest.Digest]bool, error) {
	blobs := map[digest.Digest]bool{}
	err := s.inner.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if info.Kind == snapshots.KindCommitted {
			if dg, _, err := blobLabels(info.Labels); err == nil {
				blobs[dg] = true
			}
		}
		return nil
	})
	if err != nil && !errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("snapshotter: list layers: %w", err)
	}
	return blobs, nil
}
