package snapshotter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/image"
)

// Snapshot labels the snapshotter reads or writes (FORMAT.md §2.8).
const (
	// LabelTargetRef is set by containerd's unpacker: the Prepare is a pull that will commit under this name.
	LabelTargetRef = "containerd.io/snapshot.ref"
	// LabelImageRef names the image a layer is pulled from (set by lazy-pull tools such as upstream's `ctr rpull`).
	LabelImageRef = "containerd.io/snapshot/image-ref"
	// LabelCRIImageRef is LabelImageRef as the CRI plugin sets it.
	LabelCRIImageRef = "containerd.io/snapshot/cri.image-ref"
	// LabelCRIManifestDigest is the digest of the manifest of the image the CRI plugin pulls (for the node's
	// platform).
	LabelCRIManifestDigest = "containerd.io/snapshot/cri.manifest-digest"
	// LabelCRILayerDigest is the digest of the layer a pull unpacks, and LabelCRIImageLayers the digests of it and
	// of the layers above it in its image, comma-separated (as many as a label holds), as the CRI plugin and obd
	// pull set them: a layer that lists only itself is the image's top layer.
	LabelCRILayerDigest = "containerd.io/snapshot/cri.layer-digest"
	LabelCRIImageLayers = "containerd.io/snapshot/cri.image-layers"
	// LabelDownloadBlob = "download" asks for a full download of an overlaybd layer instead of a lazy one.
	LabelDownloadBlob = "containerd.io/snapshot/overlaybd/download-remote-blob"
	// LabelRemote marks a committed snapshot whose content is read lazily from the registry.
	LabelRemote = "containerd.io/snapshot/remote"
	// LabelRecordTrace = "yes" with LabelRecordTracePath on a container's snapshot (ctr run --snapshotter-label)
	// records the image's start into that file, or prefetches it when it holds a trace (upstream's labels).
	LabelRecordTrace     = "containerd.io/snapshot/overlaybd/record-trace"
	LabelRecordTracePath = "containerd.io/snapshot/overlaybd/record-trace-path"
	// LabelRemoteValue is the value of LabelRemote.
	LabelRemoteValue = "remote snapshot"
)

// commitFile is the name of an overlaybd blob unpacked into a layer's fs directory.
const commitFile = "overlaybd.commit"

// Magic numbers that open an overlaybd layer file: a ZFile (compressed) or a raw LSMT file.
var (
	zfileMagic = []byte("ZFile\x00\x01\x00")
	lsmtMagic  = []byte("LSMT\x00\x01\x02\x00")
)

// isRemoteLayer reports whether labels of a Prepare describe a pull of an overlaybd layer to be read lazily.
func isRemoteLayer(labels map[string]string) bool {
	if labels[LabelTargetRef] == "" || labels[image.AnnotationBlobDigest] == "" || labels[image.AnnotationBlobSize] == "" {
		return false
	}
	if labels[image.AnnotationAccelerationLayer] == "yes" || labels[LabelDownloadBlob] == "download" {
		return false
	}
	return imageRef(labels) != ""
}

// isLayerUnpack reports whether a Prepare with labels unpacks an overlaybd layer blob or an acceleration layer
// that containerd downloads: these get plain overlayfs mounts, never the device of the chain below.
func isLayerUnpack(labels map[string]string) bool {
	if labels[LabelTargetRef] == "" {
		return false
	}
	return labels[image.AnnotationBlobDigest] != "" || labels[image.AnnotationAccelerationLayer] == "yes"
}

// imageRef returns the image reference of labels, "" if there is none.
func imageRef(labels map[string]string) string {
	if r := labels[LabelImageRef]; r != "" {
		return r
	}
	return labels[LabelCRIImageRef]
}

// layerKind says how a committed snapshot takes part in an image chain.
type layerKind int

const (
	kindNormal layerKind = iota // an overlayfs layer directory
	kindBlock                   // an overlaybd layer, remote or locally unpacked
	kindAccel                   // an acceleration layer: a prefetch trace, not part of the filesystem
)

// chainLayer is one committed snapshot of a parent chain.
type chainLayer struct {
	id, name string
	dir      string // the snapshot's fs directory
	kind     layerKind
	layer    Layer // for kindBlock
}

// imagePlan says how snapshots over an overlaybd chain are mounted: the chain's overlaybd layers as one device
// filesystem at a mountpoint, with the chain's normal layers (if any) stacked above it.
type imagePlan struct {
	id       string   // snapshot id of the topmost overlaybd layer: the ImageMounter id and mountpoint owner
	name     string   // that snapshot's name
	layers   []Layer  // overlaybd layers, bottom first
	uppers   []string // fs directories of normal layers above the device, top first
	imageRef string   // for messages
	trace    string   // trace file of the image: its acceleration layer's, a registered profile, or one named by labels; "" for none
}

// traceFile is the name of the trace in an acceleration layer.
const traceFile = "trace"

// planChain classifies the committed chain ending at parent. It returns nil when the chain has no overlaybd layer
// or when parent is missing or not committed (the overlay snapshotter then reports the problem), and an error
// when overlaybd layers lie above normal ones, which no block device can represent.
func (s *Snapshotter) planChain(ctx context.Context, parent string) (*imagePlan, error) {
	var chain []chainLayer // top first
	errParent := errors.New("parent missing or not committed")
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		for name := parent; name != ""; {
			id, info, _, err := storage.GetInfo(ctx, name)
			if err != nil {
				if name == parent && errdefs.IsNotFound(err) {
					return errParent
				}
				return fmt.Errorf("snapshot %q: %w", name, err)
			}
			if info.Kind != snapshots.KindCommitted {
				return errParent
			}
			cl, err := s.classify(id, info)
			if err != nil {
				return err
			}
			chain = append(chain, cl)
			name = info.Parent
		}
		return nil
	})
	switch {
	case errors.Is(err, errParent):
		return nil, nil
	case err != nil:
		return nil, err
	}
	p, err := buildPlan(chain)
	if p != nil && p.trace == "" {
		p.trace = s.registeredProfile(p.name)
	}
	return p, err
}

// buildPlan turns a classified chain (top first) into a plan; see planChain.
func buildPlan(chain []chainLayer) (*imagePlan, error) {
	// The overlaybd part is the bottom of the chain: block layers and acceleration layers.
	bottom := len(chain)
	for bottom > 0 && chain[bottom-1].kind != kindNormal {
		bottom--
	}
	for _, cl := range chain[:bottom] {
		if cl.kind == kindBlock {
			return nil, fmt.Errorf("overlaybd layer %q%s lies above normal layer %q: overlaybd layers must form the bottom of a chain",
				cl.name, imageSuffix(cl.layer.ImageRef), chain[bottom-1].name)
		}
	}
	var p *imagePlan
	for i := len(chain) - 1; i >= bottom; i-- {
		if chain[i].kind == kindAccel && p != nil {
			p.trace = filepath.Join(chain[i].dir, traceFile)
		}
		if chain[i].kind != kindBlock {
			continue
		}
		if p == nil {
			p = &imagePlan{}
		}
		p.id, p.name = chain[i].id, chain[i].name
		p.layers = append(p.layers, chain[i].layer)
		if r := chain[i].layer.ImageRef; r != "" {
			p.imageRef = r
		}
	}
	if p == nil {
		return nil, nil
	}
	if p.imageRef == "" {
		p.imageRef = "(locally unpacked)"
	}
	for _, cl := range chain[:bottom] {
		p.uppers = append(p.uppers, cl.dir)
	}
	return p, nil
}

func imageSuffix(ref string) string {
	if ref == "" {
		return ""
	}
	return " of image " + ref
}

// classify says what the committed snapshot id/info contributes to an image chain.
func (s *Snapshotter) classify(id string, info snapshots.Info) (chainLayer, error) {
	cl := chainLayer{id: id, name: info.Name, dir: s.upperPath(id)}
	l := info.Labels
	if l[image.AnnotationAccelerationLayer] == "yes" {
		cl.kind = kindAccel
		return cl, nil
	}
	if l[LabelRemote] == LabelRemoteValue {
		dg, size, err := blobLabels(l)
		if err != nil {
			return cl, fmt.Errorf("remote snapshot %q: %w", info.Name, err)
		}
		cl.kind = kindBlock
		cl.layer = Layer{Digest: dg, Size: size, ImageRef: imageRef(l), FsType: l[image.AnnotationFsType]}
		if t := l[image.AnnotationTurboTarget]; t != "" {
			if cl.layer.Target, err = digest.Parse(t); err != nil {
				return cl, fmt.Errorf("remote snapshot %q: label %s: %w", info.Name, image.AnnotationTurboTarget, err)
			}
		}
		return cl, nil
	}
	path := filepath.Join(cl.dir, commitFile)
	if isOverlaybdFile(path) {
		cl.kind = kindBlock
		cl.layer = Layer{ImageRef: imageRef(l), LocalPath: path, FsType: l[image.AnnotationFsType]}
		if dg, size, err := blobLabels(l); err == nil {
			cl.layer.Digest, cl.layer.Size = dg, size
		}
		return cl, nil
	}
	cl.kind = kindNormal
	return cl, nil
}

// blobLabels parses the overlaybd blob digest and size labels.
func blobLabels(l map[string]string) (digest.Digest, int64, error) {
	dg, err := digest.Parse(l[image.AnnotationBlobDigest])
	if err != nil {
		return "", 0, fmt.Errorf("label %s=%q: %w", image.AnnotationBlobDigest, l[image.AnnotationBlobDigest], err)
	}
	size, err := strconv.ParseInt(l[image.AnnotationBlobSize], 10, 64)
	if err != nil || size < 0 {
		return "", 0, fmt.Errorf("label %s=%q is not a size", image.AnnotationBlobSize, l[image.AnnotationBlobSize])
	}
	return dg, size, nil
}

// isOverlaybdFile reports whether path is a regular file that starts with the ZFile or LSMT magic.
func isOverlaybdFile(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var b [8]byte
	if _, err := io.ReadFull(f, b[:]); err != nil {
		return false
	}
	return bytes.Equal(b[:], zfileMagic) || bytes.Equal(b[:], lsmtMagic)
}

// mounts turns the overlay snapshotter's mounts for a snapshot over the chain into mounts over the device
// filesystem at mountpoint: the lowerdirs of the overlaybd layers become the one mountpoint.
func (p *imagePlan) mounts(key string, kind snapshots.Kind, inner []mount.Mount, mountpoint string) ([]mount.Mount, error) {
	lowers := append(append([]string(nil), p.uppers...), mountpoint)
	if kind == snapshots.KindView && len(lowers) == 1 {
		return []mount.Mount{{Type: "bind", Source: mountpoint, Options: []string{"ro", "rbind"}}}, nil
	}
	if len(inner) != 1 || inner[0].Type != "overlay" {
		return nil, fmt.Errorf("snapshot %q: unexpected overlay snapshotter mounts %+v", key, inner)
	}
	m := inner[0]
	m.Options = append([]string(nil), m.Options...)
	lowerdir := "lowerdir=" + strings.Join(lowers, ":")
	replaced := false
	for i, o := range m.Options {
		if strings.HasPrefix(o, "lowerdir=") {
			m.Options[i], replaced = lowerdir, true
		}
	}
	if !replaced {
		return nil, fmt.Errorf("snapshot %q: overlay snapshotter mount has no lowerdir: %+v", key, inner)
	}
	return []mount.Mount{m}, nil
}
