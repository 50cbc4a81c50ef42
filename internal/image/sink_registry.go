package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/registry/remote"

	"github.com/obdproject/obd/internal/registry"
)

// RegistrySink pushes images to a registry repository.
type RegistrySink struct {
	c         *registry.Client
	dst       Ref
	mountFrom []string
}

// NewRegistrySink returns a sink pushing to dst's repository. Layer blobs the repository lacks are mounted from
// mountFrom (other repositories of the registry, e.g. the source's) when one of them has them.
func NewRegistrySink(c *registry.Client, dst Ref, mountFrom ...string) *RegistrySink {
	return &RegistrySink{c: c, dst: dst, mountFrom: mountFrom}
}

// PutImage pushes the layer blobs (skipped when the repository has them, mounted from other repositories of the
// registry that do), the config, then the manifest.
func (s *RegistrySink) PutImage(ctx context.Context, img *Image, tag string, entry bool) error {
	host, repo := s.dst.Host(), s.dst.Repository()
	for _, b := range img.Layers {
		if err := s.putLayer(ctx, b); err != nil {
			return fmt.Errorf("layer %s: %w", b.Desc.Digest, err)
		}
	}
	if err := s.c.PushBlob(ctx, host, repo, img.ConfigDesc, bytes.NewReader(img.Config)); err != nil {
		return err
	}
	if entry {
		tag = ""
	}
	return s.PutIndex(ctx, img.ManifestDesc, img.Manifest, tag)
}

func (s *RegistrySink) putLayer(ctx context.Context, b Blob) error {
	host := s.dst.Host()
	var r io.ReadCloser
	if b.Path != "" {
		f, err := os.Open(b.Path)
		if err != nil {
			return err
		}
		r = f
	} else {
		r = &remoteBlobReader{ctx: ctx, c: s.c, host: host, repos: b.Repos, desc: b.Desc}
	}
	defer r.Close()
	return s.c.PushBlob(ctx, host, s.dst.Repository(), b.Desc, r, append(b.Repos[:len(b.Repos):len(b.Repos)], s.mountFrom...)...)
}

// PutIndex pushes a manifest or index. A registry that refuses to delete the referrers index a referrer replaces
// is no failure: the manifest and the new referrers index are pushed.
func (s *RegistrySink) PutIndex(ctx context.Context, desc ocispec.Descriptor, b []byte, tag string) error {
	_, err := s.c.PushManifest(ctx, s.dst.Host(), s.dst.Repository(), tag, desc.MediaType, b)
	var re *remote.ReferrersError
	if errors.As(err, &re) && re.IsReferrersIndexDelete() {
		return nil
	}
	return err
}

// remoteBlobReader streams a blob from the first of repos that serves it, opened on the first Read (it is read
// only when no cross-repository mount works).
type remoteBlobReader struct {
	ctx   context.Context
	c     *registry.Client
	host  string
	repos []string
	desc  ocispec.Descriptor
	rc    io.ReadCloser
}

func (r *remoteBlobReader) Read(p []byte) (int, error) {
	if r.rc == nil {
		var errs []error
		for _, repo := range r.repos {
			rc, err := r.c.FetchBlob(r.ctx, r.host, repo, r.desc)
			if err == nil {
				r.rc = rc
				break
			}
			errs = append(errs, err)
		}
		if r.rc == nil {
			return 0, fmt.Errorf("reused layer %s: no local copy and no registry copy to read: %w (convert with --no-db)", r.desc.Digest, errors.Join(errs...))
		}
	}
	return r.rc.Read(p)
}

func (r *remoteBlobReader) Close() error {
	if r.rc != nil {
		return r.rc.Close()
	}
	return nil
}

// PushLayout pushes the image tagged tag in an OCI layout to a registry reference unchanged (same manifest bytes,
// same digest).
func PushLayout(ctx context.Context, c *registry.Client, lay *Layout, tag string, dst Ref) error {
	d, err := lay.Resolve(Ref{Tag: tag})
	if err != nil {
		return err
	}
	m, md, err := lay.Manifest(d, DefaultPlatform())
	if err != nil {
		return err
	}
	img := &Image{ManifestDesc: md, ConfigDesc: m.Config}
	if img.Manifest, err = lay.ReadBlob(md); err != nil {
		return err
	}
	if img.Config, err = lay.ReadBlob(m.Config); err != nil {
		return err
	}
	for _, l := range m.Layers {
		img.Layers = append(img.Layers, Blob{Desc: l, Path: lay.BlobPath(l.Digest)})
	}
	if err := NewRegistrySink(c, dst).PutImage(ctx, img, dst.Tag, false); err != nil {
		return fmt.Errorf("push %s: %w", dst, err)
	}
	return nil
}
