package image

import (
	"context"
	"fmt"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/registry"
)

// PushLayout pushes the image tagged tag in an OCI layout to a registry reference unchanged: blobs first, the
// manifest (same bytes, same digest) last.
func PushLayout(ctx context.Context, c *registry.Client, lay *Layout, tag string, dst Ref) error {
	d, err := lay.Resolve(Ref{Tag: tag})
	if err != nil {
		return err
	}
	m, md, err := lay.Manifest(d, DefaultPlatform())
	if err != nil {
		return err
	}
	for _, b := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		f, err := lay.OpenBlob(b)
		if err != nil {
			return err
		}
		err = c.PushBlob(ctx, dst.Host(), dst.Repository(), b, f)
		f.Close()
		if err != nil {
			return fmt.Errorf("push %s: %w", dst, err)
		}
	}
	mb, err := lay.ReadBlob(md)
	if err != nil {
		return err
	}
	if _, err := c.PushManifest(ctx, dst.Host(), dst.Repository(), dst.Tag, md.MediaType, mb); err != nil {
		return fmt.Errorf("push %s: %w", dst, err)
	}
	return nil
}
