package image

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Media types of manifests and indexes obd reads (OCI and Docker schema 2).
const (
	MediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	MediaTypeDockerConfig       = "application/vnd.docker.container.image.v1+json"
	MediaTypeDockerLayer        = "application/vnd.docker.image.rootfs.diff.tar"
	MediaTypeDockerLayerGzip    = "application/vnd.docker.image.rootfs.diff.tar.gzip"
)

// maxMetadataSize bounds manifests, indexes and configs read into memory.
const maxMetadataSize = 8 << 20

// Layout is an OCI image layout directory.
type Layout struct {
	Dir string
}

// OpenLayout checks that dir is an OCI image layout.
func OpenLayout(dir string) (*Layout, error) {
	b, err := os.ReadFile(filepath.Join(dir, ocispec.ImageLayoutFile))
	if err != nil {
		return nil, fmt.Errorf("OCI layout %s: %w (is it an OCI image layout directory?)", dir, err)
	}
	var l ocispec.ImageLayout
	if err := json.Unmarshal(b, &l); err != nil {
		return nil, fmt.Errorf("OCI layout %s: %s: %w", dir, ocispec.ImageLayoutFile, err)
	}
	if l.Version != ocispec.ImageLayoutVersion {
		return nil, fmt.Errorf("OCI layout %s: unsupported imageLayoutVersion %q (want %q)", dir, l.Version, ocispec.ImageLayoutVersion)
	}
	return &Layout{Dir: dir}, nil
}

// Index reads the layout's index.json.
func (l *Layout) Index() (ocispec.Index, error) {
	b, err := readLimited(filepath.Join(l.Dir, ocispec.ImageIndexFile))
	if err != nil {
		return ocispec.Index{}, fmt.Errorf("OCI layout %s: %w", l.Dir, err)
	}
	idx, err := ParseIndex(b)
	if err != nil {
		return ocispec.Index{}, fmt.Errorf("OCI layout %s: index.json: %w", l.Dir, err)
	}
	return idx, nil
}

// BlobPath is where the layout keeps a blob.
func (l *Layout) BlobPath(d digest.Digest) string {
	return filepath.Join(l.Dir, "blobs", d.Algorithm().String(), d.Encoded())
}

// ReadBlob reads a small blob (manifest, index, config) whole and checks its size and digest.
func (l *Layout) ReadBlob(desc ocispec.Descriptor) ([]byte, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("blob %q: %w", desc.Digest, err)
	}
	if desc.Size > maxMetadataSize {
		return nil, fmt.Errorf("blob %s: %d bytes is too large for metadata (limit %d)", desc.Digest, desc.Size, maxMetadataSize)
	}
	b, err := readLimited(l.BlobPath(desc.Digest))
	if err != nil {
		return nil, fmt.Errorf("blob %s: %w", desc.Digest, err)
	}
	if int64(len(b)) != desc.Size {
		return nil, fmt.Errorf("blob %s: size %d, descriptor says %d", desc.Digest, len(b), desc.Size)
	}
	if got := desc.Digest.Algorithm().FromBytes(b); got != desc.Digest {
		return nil, fmt.Errorf("blob %s: content digest is %s", desc.Digest, got)
	}
	return b, nil
}

// OpenBlob opens a blob for random access and checks that its size matches the descriptor.
func (l *Layout) OpenBlob(desc ocispec.Descriptor) (*os.File, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("blob %q: %w", desc.Digest, err)
	}
	f, err := os.Open(l.BlobPath(desc.Digest))
	if err != nil {
		return nil, fmt.Errorf("blob %s: %w", desc.Digest, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("blob %s: %w", desc.Digest, err)
	}
	if st.Size() != desc.Size {
		f.Close()
		return nil, fmt.Errorf("blob %s: size %d, descriptor says %d", desc.Digest, st.Size(), desc.Size)
	}
	return f, nil
}

// Resolve finds the descriptor of ref (a tag or digest) in the layout's index.
func (l *Layout) Resolve(ref Ref) (ocispec.Descriptor, error) {
	idx, err := l.Index()
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	var tags []string
	for _, d := range idx.Manifests {
		name := d.Annotations[ocispec.AnnotationRefName]
		if ref.Digest != "" && d.Digest == ref.Digest || ref.Digest == "" && name == ref.Tag {
			return d, nil
		}
		if name != "" {
			tags = append(tags, name)
		}
	}
	if ref.Digest != "" {
		return ocispec.Descriptor{}, fmt.Errorf("%s: no manifest %s in index.json", ref, ref.Digest)
	}
	return ocispec.Descriptor{}, fmt.Errorf("%s: no tag %q in index.json (tags: %s)", ref, ref.Tag, strings.Join(tags, ", "))
}

// Platform is an os/arch[/variant] selector for multi-platform images.
type Platform struct{ OS, Architecture, Variant string }

// DefaultPlatform is the platform of the running binary.
func DefaultPlatform() Platform { return Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH} }

// ParsePlatform parses "os/arch[/variant]".
func ParsePlatform(s string) (Platform, error) {
	parts := strings.Split(s, "/")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
		return Platform{}, fmt.Errorf("platform %q: want os/arch[/variant], e.g. linux/amd64", s)
	}
	p := Platform{OS: parts[0], Architecture: parts[1]}
	if len(parts) == 3 {
		p.Variant = parts[2]
	}
	return p, nil
}

// PlatformOrDefault parses s as ParsePlatform does; "" is DefaultPlatform.
func PlatformOrDefault(s string) (Platform, error) {
	if s == "" {
		return DefaultPlatform(), nil
	}
	return ParsePlatform(s)
}

func (p Platform) String() string {
	s := p.OS + "/" + p.Architecture
	if p.Variant != "" {
		s += "/" + p.Variant
	}
	return s
}

func (p Platform) matches(q *ocispec.Platform) bool {
	return q != nil && q.OS == p.OS && q.Architecture == p.Architecture && (p.Variant == "" || q.Variant == p.Variant)
}

// Manifest reads the image manifest that desc points to, choosing the platform's manifest when desc is an index.
// It returns the manifest and its own descriptor.
func (l *Layout) Manifest(desc ocispec.Descriptor, platform Platform) (ocispec.Manifest, ocispec.Descriptor, error) {
	for depth := 0; depth < 4; depth++ {
		b, err := l.ReadBlob(desc)
		if err != nil {
			return ocispec.Manifest{}, desc, err
		}
		mt := desc.MediaType
		if mt == "" {
			mt = sniffMediaType(b)
		}
		switch mt {
		case ocispec.MediaTypeImageManifest, MediaTypeDockerManifest:
			m, err := ParseManifest(b)
			if err != nil {
				return m, desc, fmt.Errorf("manifest %s: %w", desc.Digest, err)
			}
			return m, desc, nil
		case ocispec.MediaTypeImageIndex, MediaTypeDockerManifestList:
			idx, err := ParseIndex(b)
			if err != nil {
				return ocispec.Manifest{}, desc, fmt.Errorf("index %s: %w", desc.Digest, err)
			}
			next, err := SelectPlatform(idx, platform)
			if err != nil {
				return ocispec.Manifest{}, desc, fmt.Errorf("index %s: %w", desc.Digest, err)
			}
			desc = next
		default:
			return ocispec.Manifest{}, desc, fmt.Errorf("descriptor %s: unsupported media type %q (want an image manifest or index)", desc.Digest, mt)
		}
	}
	return ocispec.Manifest{}, desc, errors.New("image indexes nested too deeply")
}

// SelectPlatform picks the manifest for platform from an index.
func SelectPlatform(idx ocispec.Index, platform Platform) (ocispec.Descriptor, error) {
	var have []string
	for _, d := range idx.Manifests {
		if platform.matches(d.Platform) {
			return d, nil
		}
		if d.Platform != nil {
			have = append(have, Platform{d.Platform.OS, d.Platform.Architecture, d.Platform.Variant}.String())
		}
	}
	return ocispec.Descriptor{}, fmt.Errorf("no manifest for platform %s (index has: %s)", platform, strings.Join(have, ", "))
}

// ParseManifest parses and checks an image manifest (OCI or Docker schema 2).
func ParseManifest(b []byte) (ocispec.Manifest, error) {
	var m ocispec.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("parse manifest: %w", err)
	}
	if m.SchemaVersion != 2 {
		return m, fmt.Errorf("manifest schemaVersion %d, want 2", m.SchemaVersion)
	}
	if m.MediaType != "" && m.MediaType != ocispec.MediaTypeImageManifest && m.MediaType != MediaTypeDockerManifest {
		return m, fmt.Errorf("manifest has media type %q", m.MediaType)
	}
	if err := checkDescriptor(m.Config); err != nil {
		return m, fmt.Errorf("manifest config: %w", err)
	}
	for i, l := range m.Layers {
		if err := checkDescriptor(l); err != nil {
			return m, fmt.Errorf("manifest layer %d: %w", i, err)
		}
	}
	return m, nil
}

// ParseIndex parses and checks an image index (OCI or Docker manifest list).
func ParseIndex(b []byte) (ocispec.Index, error) {
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		return idx, fmt.Errorf("parse index: %w", err)
	}
	if idx.SchemaVersion != 2 {
		return idx, fmt.Errorf("index schemaVersion %d, want 2", idx.SchemaVersion)
	}
	for i, d := range idx.Manifests {
		if err := checkDescriptor(d); err != nil {
			return idx, fmt.Errorf("index entry %d: %w", i, err)
		}
	}
	return idx, nil
}

func checkDescriptor(d ocispec.Descriptor) error {
	if err := d.Digest.Validate(); err != nil {
		return fmt.Errorf("digest %q: %w", d.Digest, err)
	}
	if d.Size < 0 {
		return fmt.Errorf("%s: negative size %d", d.Digest, d.Size)
	}
	return nil
}

func sniffMediaType(b []byte) string {
	var probe struct {
		MediaType string            `json:"mediaType"`
		Manifests []json.RawMessage `json:"manifests"`
	}
	if json.Unmarshal(b, &probe) != nil {
		return ""
	}
	if probe.MediaType != "" {
		return probe.MediaType
	}
	if probe.Manifests != nil {
		return ocispec.MediaTypeImageIndex
	}
	return ocispec.MediaTypeImageManifest
}

func readLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxMetadataSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxMetadataSize {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, maxMetadataSize)
	}
	return b, nil
}
