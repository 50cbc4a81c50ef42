package cachesnap

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
)

// RegistryClient returns a client for a registry host.
type RegistryClient func(host string) (*registry.Client, error)

// IsFile says whether a snapshot location is a file (file:PATH, a path ending in .tar, or one starting with / or
// .), and its path; other locations are oci:DIR[:TAG] or registry references.
func IsFile(s string) (string, bool) {
	if p, ok := strings.CutPrefix(s, "file:"); ok {
		return p, true
	}
	return s, strings.HasSuffix(s, ".tar") || strings.HasPrefix(s, "/") || strings.HasPrefix(s, ".")
}

// Write writes the snapshot file read from r to dst (a file, oci:DIR[:TAG] or REGISTRY/REPO:TAG) and returns its
// data bytes and index.
func Write(ctx context.Context, dst string, r io.Reader, client RegistryClient) (int64, Index, error) {
	if path, ok := IsFile(dst); ok {
		return WriteFile(r, path)
	}
	ref, err := image.ParseRef(dst)
	if err != nil {
		return 0, Index{}, err
	}
	tag := ref.Tag
	if tag == "" {
		tag = "latest"
	}
	switch ref.Transport {
	case image.TransportOCI:
		return WriteArtifact(ctx, r, image.NewLayoutSink(ref.Path), tag)
	case image.TransportRegistry:
		rc, err := client(ref.Host())
		if err != nil {
			return 0, Index{}, err
		}
		defer rc.Close()
		return WriteArtifact(ctx, r, image.NewRegistrySink(rc, ref), tag)
	}
	return 0, Index{}, fmt.Errorf("%s: write a cache snapshot to a file, oci:DIR[:TAG] or a registry", dst)
}

// Open opens the snapshot at src (a file, oci:DIR[:TAG] or REGISTRY/REPO:TAG[@DIGEST]) as a snapshot file stream.
func Open(ctx context.Context, src string, client RegistryClient) (io.ReadCloser, error) {
	if path, ok := IsFile(src); ok {
		return os.Open(path)
	}
	ref, err := image.ParseRef(src)
	if err != nil {
		return nil, err
	}
	switch ref.Transport {
	case image.TransportOCI:
		lay, err := image.OpenLayout(ref.Path)
		if err != nil {
			return nil, err
		}
		d, err := lay.Resolve(ref)
		if err != nil {
			return nil, err
		}
		manifest, err := lay.ReadBlob(d)
		if err != nil {
			return nil, err
		}
		return OpenArtifact(manifest, func(d ocispec.Descriptor) (io.ReadCloser, error) { return lay.OpenBlob(d) }, func() {})
	case image.TransportRegistry:
		rc, err := client(ref.Host())
		if err != nil {
			return nil, err
		}
		sel := ref.Tag
		if ref.Digest != "" {
			sel = ref.Digest.String()
		}
		_, manifest, err := rc.Resolve(ctx, ref.Host(), ref.Repository(), sel)
		if err != nil {
			rc.Close()
			return nil, err
		}
		return OpenArtifact(manifest, func(d ocispec.Descriptor) (io.ReadCloser, error) {
			return rc.FetchBlob(ctx, ref.Host(), ref.Repository(), d)
		}, func() { rc.Close() })
	}
	return nil, fmt.Errorf("%s: read a cache snapshot from a file, oci:DIR[:TAG] or a registry", src)
}
