package pull

import (
	"context"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
)

// Referrer finds the overlaybd image attached to the image r names as an OCI referrer ('obd convert --referrer',
// with or without --turbo): one whose subject is r's index or manifest, else one whose subject is the manifest for
// platform in r's index. It returns nil when there is none; a registry that fails to list referrers (while it serves
// the image) is a *ListError. A native overlaybd image is taken before a TurboOCI one (it reads faster); of several,
// the last listed: the referrers tag schema lists them in the order they were pushed.
func Referrer(ctx context.Context, rc *registry.Client, r image.Ref, platform image.Platform) (*ocispec.Descriptor, error) {
	sel := r.Tag
	if r.Digest != "" {
		sel = r.Digest.String()
	}
	desc, b, err := rc.Resolve(ctx, r.Host(), r.Repository(), sel)
	if err != nil {
		return nil, err
	}
	subjects := []ocispec.Descriptor{desc}
	if image.IsIndex(desc.MediaType) {
		idx, err := image.ParseIndex(b)
		if err != nil {
			return nil, err
		}
		if m, err := image.SelectPlatform(idx, platform); err == nil {
			subjects = append(subjects, m)
		}
	}
	return referrerOf(ctx, rc, r.Host(), r.Repository(), subjects)
}

// referrerOf returns the overlaybd referrer of the first of subjects that has one (see Referrer), or nil.
func referrerOf(ctx context.Context, rc *registry.Client, host, repo string, subjects []ocispec.Descriptor) (*ocispec.Descriptor, error) {
	for _, s := range subjects {
		refs, err := rc.Referrers(ctx, host, repo, s, "")
		if err != nil {
			return nil, &ListError{err}
		}
		for _, at := range []string{image.ArtifactTypeOverlaybd, image.ArtifactTypeTurboOCI} {
			for i := len(refs) - 1; i >= 0; i-- {
				if refs[i].ArtifactType == at {
					return &refs[i], nil
				}
			}
		}
	}
	return nil, nil
}

// ListError is a failure to list an image's referrers: the image itself can still be pulled.
type ListError struct{ Err error }

func (e *ListError) Error() string { return "list referrers: " + e.Err.Error() }
func (e *ListError) Unwrap() error { return e.Err }
