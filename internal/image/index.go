package image

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/atomicfile"
)

// Top returns the descriptor (with its media type) and bytes of what ref names in the layout: an image manifest
// or an index, without choosing a platform.
func (l *Layout) Top(ref Ref) (ocispec.Descriptor, []byte, error) {
	d, err := l.Resolve(ref)
	if err != nil {
		return d, nil, err
	}
	b, err := l.ReadBlob(d)
	if err != nil {
		return d, nil, fmt.Errorf("%s: %w", ref, err)
	}
	if d.MediaType == "" {
		d.MediaType = sniffMediaType(b)
	}
	return ocispec.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: d.Size}, b, nil
}

// OpenLayoutManifest opens the image manifest desc of the OCI layout ref.Path as a Source (for the entries of an
// index, which index.json need not list).
func OpenLayoutManifest(ref Ref, desc ocispec.Descriptor) (Source, error) {
	lay, err := OpenLayout(ref.Path)
	if err != nil {
		return nil, err
	}
	switch desc.MediaType {
	case ocispec.MediaTypeImageManifest, MediaTypeDockerManifest, "":
	default:
		return nil, fmt.Errorf("%s: %s has media type %q, not an image manifest", ref, desc.Digest, desc.MediaType)
	}
	m, md, err := lay.Manifest(desc, DefaultPlatform())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, err)
	}
	return &layoutSource{ref: ref, lay: lay, m: m, md: md}, nil
}

// IsIndex reports whether mediaType is an OCI index or a Docker manifest list.
func IsIndex(mediaType string) bool {
	return mediaType == ocispec.MediaTypeImageIndex || mediaType == MediaTypeDockerManifestList
}

// AddManifest lists desc in index.json without a tag (e.g. a referrer, found through its subject), unless index.json
// lists that digest already.
func (l *Layout) AddManifest(desc ocispec.Descriptor) error {
	idx, err := l.Index()
	if err != nil {
		return err
	}
	for _, d := range idx.Manifests {
		if d.Digest == desc.Digest {
			return nil
		}
	}
	desc.Annotations = nil
	idx.Manifests = append(idx.Manifests, desc)
	b, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(l.Dir, ocispec.ImageIndexFile), b, 0o644)
}

// TagManifest points tag at desc in index.json, like Tag, and drops untagged entries of the same digest (listed by
// AddManifest before).
func (l *Layout) TagManifest(tag string, desc ocispec.Descriptor) error {
	if err := l.Tag(tag, desc); err != nil {
		return err
	}
	idx, err := l.Index()
	if err != nil {
		return err
	}
	n := len(idx.Manifests)
	idx.Manifests = slices.DeleteFunc(idx.Manifests, func(d ocispec.Descriptor) bool {
		return d.Digest == desc.Digest && d.Annotations[ocispec.AnnotationRefName] == ""
	})
	if len(idx.Manifests) == n {
		return nil
	}
	b, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(l.Dir, ocispec.ImageIndexFile), b, 0o644)
}
