package profile

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"slices"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
)

// Push pushes src (a registry reference to an overlaybd image, resolved for platform) with traceFile as its
// acceleration layer to dst and returns the new manifest's descriptor. The layers of the image's manifest must be
// those of want (the profiled image's overlaybd layers, bottom first), so that the trace's layer indexes name the
// right blobs. dst may be another repository or registry: the layers are mounted from src's repository when the
// registry allows it, else copied.
func Push(ctx context.Context, rc *registry.Client, src, dst image.Ref, platform image.Platform, want []Layer, traceFile []byte) (ocispec.Descriptor, error) {
	source, err := image.OpenRegistrySource(ctx, rc, src, platform)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	defer source.Close()
	m, md := source.Manifest()
	blocks, err := image.BlockLayers(m)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%s: %w", src, err)
	}
	have := make([]Layer, len(blocks))
	for i, b := range blocks {
		have[i] = Layer{Digest: b.BlobDigest, Size: b.BlobSize}
	}
	if !slices.Equal(have, want) {
		return ocispec.Descriptor{}, fmt.Errorf("%s: its overlaybd layers differ from those of the profiled image (the tag moved since the start was recorded?)", src)
	}
	_, manifest, err := rc.Resolve(ctx, src.Host(), src.Repository(), md.Digest.String())
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	config, err := source.Config(ctx)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	layer, ldesc, err := AccelerationLayer(traceFile)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	newManifest, newConfig, err := Accelerate(manifest, config, ldesc)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("%s: %w", src, err)
	}
	nm, err := image.ParseManifest(newManifest)
	if err != nil {
		return ocispec.Descriptor{}, err
	}

	for _, l := range nm.Layers {
		var r io.Reader
		switch l.Digest {
		case ldesc.Digest:
			r = bytes.NewReader(layer)
		default:
			r = &lazyBlob{open: func() (io.ReadCloser, error) { return rc.FetchBlob(ctx, src.Host(), src.Repository(), l) }}
		}
		err := pushBlob(ctx, rc, src, dst, l, r)
		if c, ok := r.(io.Closer); ok {
			c.Close()
		}
		if err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	if err := pushBlob(ctx, rc, src, dst, nm.Config, bytes.NewReader(newConfig)); err != nil {
		return ocispec.Descriptor{}, err
	}
	tag := dst.Tag
	if dst.Digest != "" {
		tag = ""
	}
	desc, err := rc.PushManifest(ctx, dst.Host(), dst.Repository(), tag, md.MediaType, newManifest)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	if dst.Digest != "" && dst.Digest != desc.Digest {
		return desc, fmt.Errorf("%s: the accelerated manifest is %s, not the digest asked for", dst, desc.Digest)
	}
	return desc, nil
}

// pushBlob pushes one blob to dst, mounting it from src's repository when both are on one registry.
func pushBlob(ctx context.Context, rc *registry.Client, src, dst image.Ref, desc ocispec.Descriptor, r io.Reader) error {
	var from []string
	if src.Host() == dst.Host() {
		from = append(from, src.Repository())
	}
	return rc.PushBlob(ctx, dst.Host(), dst.Repository(), desc, r, from...)
}

// lazyBlob is a blob stream opened at its first read, so that a blob the registry already has or mounts is never
// fetched.
type lazyBlob struct {
	open func() (io.ReadCloser, error)
	rc   io.ReadCloser
}

func (b *lazyBlob) Read(p []byte) (int, error) {
	if b.rc == nil {
		rc, err := b.open()
		if err != nil {
			return 0, err
		}
		b.rc = rc
	}
	return b.rc.Read(p)
}

func (b *lazyBlob) Close() error {
	if b.rc == nil {
		return nil
	}
	return b.rc.Close()
}

// DefaultTag returns the reference an accelerated image is pushed to when none is named: src's tag with "-accel"
// appended, or the tag "accel" for a reference by digest alone.
func DefaultTag(src image.Ref) image.Ref {
	dst := src
	dst.Digest = ""
	dst.Tag = "accel"
	if src.Tag != "" {
		dst.Tag = src.Tag + "-accel"
	}
	return dst
}
