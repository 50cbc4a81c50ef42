// Package commit turns a container's writable overlaybd layer into a new image ('obd commit', upstream's
// overlaybd-commit followed by a push). Seal commits the container's snapshot through containerd, which makes the
// snapshotter seal its writable layer into a local layer file, and gives the container a fresh writable layer
// over it; Build packs the sealed layer files into ZFile-compressed overlaybd layer blobs stacked on the base
// image's layers (or, squashed, into one layer holding the whole filesystem) and writes the manifest and config.
// Nothing in an image built here depends on the time or the machine: the same sealed layers over the same base give
// the same digests.
package commit

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/tarwrap"
	"github.com/obdproject/obd/zfile"
)

// Base is the image a container runs: the overlaybd image its writable layers stack on.
type Base struct {
	Manifest ocispec.Manifest
	// MediaType is the manifest's media type (Docker schema 2 or OCI); the new manifest keeps it.
	MediaType string
	Config    []byte
	// Fetch streams one of the manifest's layer blobs, its digest checked. It is called for the layers that are
	// needed: all of them to squash, those not in Repos otherwise.
	Fetch func(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error)
	// Repos are repositories of the destination registry that hold the base image's layer blobs: the new image
	// refers to them there (a push mounts them) instead of fetching them. Empty: every base layer is fetched.
	Repos []string
}

// Options tune Build.
type Options struct {
	// Squash makes one layer of the base image's layers and the sealed ones.
	Squash bool
	// ZFile is the compression of the new layers.
	ZFile zfile.Options
	// WorkDir receives the blob files ("": the temp dir); the Result owns them.
	WorkDir string
	// Comment is the history entry of the new layer (default "obd commit").
	Comment string
}

// Result is a built image; Cleanup removes its blob files.
type Result struct {
	Image *image.Image
	// New counts the layers made from sealed layers (1 when squashed).
	New int
	dir string
}

// Cleanup removes the result's work directory.
func (r *Result) Cleanup() error { return os.RemoveAll(r.dir) }

// Build packs the sealed layer files (bottom first) over base into an image.
func Build(ctx context.Context, base Base, sealed []string, opts Options) (_ *Result, err error) {
	if len(sealed) == 0 {
		return nil, errors.New("commit: no sealed layer to commit")
	}
	layers, err := image.BlockLayers(base.Manifest)
	if err != nil {
		return nil, fmt.Errorf("base image: %w", err)
	}
	if len(layers)+len(sealed) > lsmt.MaxLayers && !opts.Squash {
		return nil, fmt.Errorf("the image would have %d layers, overlaybd stacks at most %d: commit with squash", len(layers)+len(sealed), lsmt.MaxLayers)
	}
	diffIDs, err := baseDiffIDs(base, layers)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(opts.WorkDir, "obd-commit-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
		}
	}()
	b := builder{base: base, opts: opts, dir: dir, layers: layers}
	var blobs []image.Blob
	var added []digest.Digest
	if opts.Squash {
		blob, err := b.squash(ctx, sealed)
		if err != nil {
			return nil, err
		}
		blobs, diffIDs, added = []image.Blob{blob}, nil, []digest.Digest{blob.Desc.Digest}
	} else {
		for i, l := range layers {
			blob, err := b.baseBlob(ctx, i, l)
			if err != nil {
				return nil, err
			}
			blobs = append(blobs, blob)
		}
		for i, path := range sealed {
			f, closeFn, err := openSealed(path)
			if err != nil {
				return nil, err
			}
			blob, err := b.pack(f, fmt.Sprintf("layer-%d", i))
			closeFn()
			if err != nil {
				return nil, fmt.Errorf("sealed layer %s: %w", path, err)
			}
			blobs, added = append(blobs, blob), append(added, blob.Desc.Digest)
		}
	}
	img, err := b.metadata(blobs, append(diffIDs, added...), len(added))
	if err != nil {
		return nil, err
	}
	return &Result{Image: img, New: len(added), dir: dir}, nil
}

// baseDiffIDs returns the diff_ids of the base image's block layers (its config lists one per manifest layer,
// acceleration layer included).
func baseDiffIDs(base Base, layers []image.BlockLayer) ([]digest.Digest, error) {
	var cfg struct {
		RootFS ocispec.RootFS `json:"rootfs"`
	}
	if err := json.Unmarshal(base.Config, &cfg); err != nil {
		return nil, fmt.Errorf("base image config: %w", err)
	}
	ids := cfg.RootFS.DiffIDs
	if len(ids) == len(layers) {
		return ids, nil
	}
	if len(ids) != len(base.Manifest.Layers) {
		return nil, fmt.Errorf("base image config lists %d diff_ids for %d layers", len(ids), len(base.Manifest.Layers))
	}
	var out []digest.Digest
	for i, l := range base.Manifest.Layers {
		if l.Annotations[image.AnnotationAccelerationLayer] != "yes" {
			out = append(out, ids[i])
		}
	}
	return out, nil
}

type builder struct {
	base   Base
	opts   Options
	dir    string
	layers []image.BlockLayer
}

// baseBlob returns base layer i as a blob of the new image: found in the destination's repositories, or fetched.
func (b *builder) baseBlob(ctx context.Context, i int, l image.BlockLayer) (image.Blob, error) {
	if len(b.base.Repos) > 0 {
		return image.Blob{Desc: l.Descriptor, Repos: b.base.Repos}, nil
	}
	path, err := b.fetch(ctx, i, l)
	return image.Blob{Desc: l.Descriptor, Path: path}, err
}

// fetch stores base layer i in the work directory.
func (b *builder) fetch(ctx context.Context, i int, l image.BlockLayer) (string, error) {
	rc, err := b.base.Fetch(ctx, l.Descriptor)
	if err != nil {
		return "", fmt.Errorf("base layer %d (%s): %w", i, l.BlobDigest, err)
	}
	defer rc.Close()
	path := filepath.Join(b.dir, fmt.Sprintf("base-%d.blob", i))
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	_, err = io.CopyBuffer(f, rc, make([]byte, 1<<20))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("base layer %d (%s): %w", i, l.BlobDigest, err)
	}
	return path, nil
}

// squash fetches the base layers and commits them with the sealed ones into one layer.
func (b *builder) squash(ctx context.Context, sealed []string) (image.Blob, error) {
	var files []*lsmt.File
	var closers []func()
	defer func() {
		for _, c := range closers {
			c()
		}
	}()
	for i, l := range b.layers {
		path, err := b.fetch(ctx, i, l)
		if err != nil {
			return image.Blob{}, err
		}
		f, err := os.Open(path)
		if err != nil {
			return image.Blob{}, err
		}
		closers = append(closers, func() { f.Close() })
		lf, err := image.OpenLayerBlob(f, l.BlobSize, true)
		if err != nil {
			return image.Blob{}, fmt.Errorf("base layer %d (%s): %w", i, l.BlobDigest, err)
		}
		files = append(files, lf)
	}
	for _, path := range sealed {
		f, closeFn, err := openSealed(path)
		if err != nil {
			return image.Blob{}, err
		}
		closers = append(closers, closeFn)
		files = append(files, f)
	}
	stack, err := lsmt.NewStack(files, nil)
	if err != nil {
		return image.Blob{}, err
	}
	return b.pack(stack, "squashed")
}

// openSealed opens a sealed layer file.
func openSealed(path string) (*lsmt.File, func(), error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	st, err := f.Stat()
	if err == nil {
		var lf *lsmt.File
		if lf, err = lsmt.Open(f, st.Size()); err == nil {
			return lf, func() { f.Close() }, nil
		}
	}
	f.Close()
	return nil, nil, fmt.Errorf("sealed layer %s: %w", path, err)
}

// pack commits src into a compressed, tar-wrapped layer blob named name in the work directory. The layer's UUID
// is derived from its content, so the blob depends on nothing else.
func (b *builder) pack(src lsmt.Source, name string) (image.Blob, error) {
	h := sha256.New()
	cr, err := lsmt.NewCommitReader(src, lsmt.CommitOptions{})
	if err != nil {
		return image.Blob{}, err
	}
	if _, err := io.CopyBuffer(h, cr, make([]byte, 1<<20)); err != nil {
		return image.Blob{}, err
	}
	if cr, err = lsmt.NewCommitReader(src, lsmt.CommitOptions{UUID: contentUUID(h.Sum(nil))}); err != nil {
		return image.Blob{}, err
	}
	path := filepath.Join(b.dir, name+".blob")
	f, err := os.Create(path)
	if err != nil {
		return image.Blob{}, err
	}
	defer f.Close()
	zsize, err := convert.WriteLayer(f, cr, true, true, b.opts.ZFile)
	if err != nil {
		return image.Blob{}, fmt.Errorf("commit and compress: %w", err)
	}
	size := tarwrap.WrappedSize(zsize)
	h.Reset()
	if _, err := io.CopyBuffer(h, io.NewSectionReader(f, 0, size), make([]byte, 1<<20)); err != nil {
		return image.Blob{}, err
	}
	if err := f.Close(); err != nil {
		return image.Blob{}, err
	}
	d := digest.NewDigest(digest.SHA256, h)
	desc := ocispec.Descriptor{MediaType: b.layerMediaType(), Digest: d, Size: size, Annotations: map[string]string{
		image.AnnotationBlobDigest: d.String(),
		image.AnnotationBlobSize:   strconv.FormatInt(size, 10),
		image.AnnotationVersion:    image.FormatVersion,
	}}
	if fs := b.layers[len(b.layers)-1].Descriptor.Annotations[image.AnnotationFsType]; fs != "" {
		desc.Annotations[image.AnnotationFsType] = fs
	}
	return image.Blob{Desc: desc, Path: path}, nil
}

// contentUUID formats the first 16 bytes of a digest as a UUID.
func contentUUID(sum []byte) string {
	h := fmt.Sprintf("%x", sum[:16])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// layerMediaType is the media type of the new layers: the base image's.
func (b *builder) layerMediaType() string { return b.layers[len(b.layers)-1].Descriptor.MediaType }

// metadata writes the config (the base's, its rootfs and history extended) and the manifest of the new image.
func (b *builder) metadata(blobs []image.Blob, diffIDs []digest.Digest, added int) (*image.Image, error) {
	var cfg map[string]json.RawMessage
	if err := json.Unmarshal(b.base.Config, &cfg); err != nil {
		return nil, fmt.Errorf("base image config: %w", err)
	}
	rootfs, err := json.Marshal(ocispec.RootFS{Type: "layers", DiffIDs: diffIDs})
	if err != nil {
		return nil, err
	}
	cfg["rootfs"] = rootfs
	var history []ocispec.History
	if h, ok := cfg["history"]; ok && !b.opts.Squash {
		if err := json.Unmarshal(h, &history); err != nil {
			return nil, fmt.Errorf("base image config: history: %w", err)
		}
	}
	comment := b.opts.Comment
	if comment == "" {
		comment = "obd commit"
	}
	for range added {
		history = append(history, ocispec.History{CreatedBy: comment})
	}
	if cfg["history"], err = json.Marshal(history); err != nil {
		return nil, err
	}
	img := &image.Image{Layers: blobs}
	if img.Config, err = json.Marshal(cfg); err != nil {
		return nil, err
	}
	cfgType := b.base.Manifest.Config.MediaType
	img.ConfigDesc = ocispec.Descriptor{MediaType: cfgType, Digest: digest.FromBytes(img.Config), Size: int64(len(img.Config))}
	man := ocispec.Manifest{MediaType: b.base.MediaType, Config: img.ConfigDesc, Annotations: b.base.Manifest.Annotations}
	man.SchemaVersion = 2
	for _, bl := range blobs {
		man.Layers = append(man.Layers, bl.Desc)
	}
	if img.Manifest, err = json.MarshalIndent(man, "", "  "); err != nil {
		return nil, err
	}
	img.ManifestDesc = ocispec.Descriptor{MediaType: b.base.MediaType, Digest: digest.FromBytes(img.Manifest), Size: int64(len(img.Manifest))}
	return img, nil
}
