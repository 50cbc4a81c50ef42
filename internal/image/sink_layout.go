package image

import (
	"context"
	"fmt"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// LayoutSink writes images into an OCI layout, created when the first image is written.
type LayoutSink struct {
	dir string
	lay *Layout
}

// NewLayoutSink returns a sink writing into the OCI layout dir.
func NewLayoutSink(dir string) *LayoutSink { return &LayoutSink{dir: dir} }

func (s *LayoutSink) open() error {
	if s.lay != nil {
		return nil
	}
	lay, err := CreateLayout(s.dir)
	s.lay = lay
	return err
}

// PutImage moves the layer blob files into the layout and stores the config and the manifest.
func (s *LayoutSink) PutImage(ctx context.Context, img *Image, tag string, entry bool) error {
	if err := s.open(); err != nil {
		return err
	}
	for _, b := range img.Layers {
		if b.Path == "" {
			return fmt.Errorf("layer %s: no local copy of the blob to store", b.Desc.Digest)
		}
		if err := s.lay.PutBlobFile(b.Path, b.Desc.Digest, b.Desc.Size); err != nil {
			return err
		}
	}
	if _, err := s.lay.PutBlobBytes(img.ConfigDesc.MediaType, img.Config); err != nil {
		return err
	}
	if entry {
		_, err := s.lay.PutBlobBytes(img.ManifestDesc.MediaType, img.Manifest)
		return err
	}
	desc := img.ManifestDesc
	desc.ArtifactType = artifactType(img.Manifest)
	return s.PutIndex(ctx, desc, img.Manifest, tag)
}

// PutIndex stores b and lists it in index.json, under tag or untagged.
func (s *LayoutSink) PutIndex(ctx context.Context, desc ocispec.Descriptor, b []byte, tag string) error {
	if err := s.open(); err != nil {
		return err
	}
	if _, err := s.lay.PutBlobBytes(desc.MediaType, b); err != nil {
		return err
	}
	if tag == "" {
		return s.lay.AddManifest(desc)
	}
	return s.lay.TagManifest(tag, desc)
}
