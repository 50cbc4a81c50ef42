package image

import (
	"context"
	"fmt"
	"io"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/registry"
)

// registrySource is an image in a registry.
type registrySource struct {
	ref Ref
	c   *registry.Client
	m   ocispec.Manifest
	md  ocispec.Descriptor
}

// OpenRegistrySource resolves a registry reference to the manifest for platform.
func OpenRegistrySource(ctx context.Context, c *registry.Client, ref Ref, platform Platform) (Source, error) {
	sel := ref.Tag
	if ref.Digest != "" {
		sel = ref.Digest.String()
	}
	for depth := 0; depth < 4; depth++ {
		desc, b, err := c.Resolve(ctx, ref.Host(), ref.Repository(), sel)
		if err != nil {
			return nil, err
		}
		mt := desc.MediaType
		if mt == "" {
			mt = sniffMediaType(b)
		}
		switch mt {
		case ocispec.MediaTypeImageManifest, MediaTypeDockerManifest:
			m, err := ParseManifest(b)
			if err != nil {
				return nil, fmt.Errorf("%s: manifest %s: %w", ref, desc.Digest, err)
			}
			return &registrySource{ref: ref, c: c, m: m, md: desc}, nil
		case ocispec.MediaTypeImageIndex, MediaTypeDockerManifestList:
			idx, err := ParseIndex(b)
			if err != nil {
				return nil, fmt.Errorf("%s: index %s: %w", ref, desc.Digest, err)
			}
			next, err := SelectPlatform(idx, platform)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", ref, err)
			}
			sel = next.Digest.String()
		default:
			return nil, fmt.Errorf("%s: unsupported media type %q (want an image manifest or index)", ref, mt)
		}
	}
	return nil, fmt.Errorf("%s: image indexes nested too deeply", ref)
}

func (s *registrySource) Ref() Ref                                         { return s.ref }
func (s *registrySource) Manifest() (ocispec.Manifest, ocispec.Descriptor) { return s.m, s.md }
func (s *registrySource) Close() error                                     { return nil }

func (s *registrySource) Config(ctx context.Context) ([]byte, error) {
	if s.m.Config.Size > maxMetadataSize {
		return nil, fmt.Errorf("config %s: %d bytes is too large", s.m.Config.Digest, s.m.Config.Size)
	}
	rc, err := s.c.FetchBlob(ctx, s.ref.Host(), s.ref.Repository(), s.m.Config)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

func (s *registrySource) OpenLayer(ctx context.Context, i int) (io.ReadCloser, error) {
	return s.c.FetchBlob(ctx, s.ref.Host(), s.ref.Repository(), s.m.Layers[i])
}
