package profile

import (
	"context"
	"fmt"
	"os"
	"slices"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
)

// Push pushes src (a registry reference to an overlaybd image, resolved for platform) with traceFile as its
// acceleration layer to dst and returns the new manifest's descriptor. The layers of the image's manifest must be
// those of want (the profiled image's overlaybd layers, bottom first), so that the trace's layer indexes name the
// right blobs. dst is a repository of src's registry: the layers are mounted from src's repository when the
// registry allows it, else copied.
func Push(ctx context.Context, rc *registry.Client, src, dst image.Ref, platform image.Platform, want []Layer, traceFile []byte) (ocispec.Descriptor, error) {
	if dst.Host() != src.Host() {
		return ocispec.Descriptor{}, fmt.Errorf("push %s: an accelerated image is pushed to the registry of its image (%s)", dst, src.Host())
	}
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
	tmp, err := os.CreateTemp("", "obd-accel-layer-")
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(layer)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	img := &image.Image{Manifest: newManifest, ManifestDesc: ocispec.Descriptor{MediaType: md.MediaType,
		Digest: digest.FromBytes(newManifest), Size: int64(len(newManifest))}, Config: newConfig, ConfigDesc: nm.Config}
	for _, l := range nm.Layers {
		b := image.Blob{Desc: l, Repos: []string{src.Repository()}}
		if l.Digest == ldesc.Digest {
			b = image.Blob{Desc: l, Path: tmp.Name()}
		}
		img.Layers = append(img.Layers, b)
	}
	tag := dst.Tag
	if dst.Digest != "" {
		tag = ""
		if dst.Digest != img.ManifestDesc.Digest {
			return ocispec.Descriptor{}, fmt.Errorf("%s: the accelerated manifest is %s, not the digest asked for", dst, img.ManifestDesc.Digest)
		}
	}
	if err := image.NewRegistrySink(rc, dst).PutImage(ctx, img, tag, false); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("push %s: %w", dst, err)
	}
	return img.ManifestDesc, nil
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
