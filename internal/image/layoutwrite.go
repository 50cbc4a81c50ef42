package image

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"

	digest "github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/atomicfile"
)

// CreateLayout opens dir as an OCI image layout for writing, creating it when it does not exist.
func CreateLayout(dir string) (*Layout, error) {
	if l, err := OpenLayout(dir); err == nil {
		return l, nil
	} else if _, serr := os.Stat(filepath.Join(dir, ocispec.ImageLayoutFile)); serr == nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755); err != nil {
		return nil, fmt.Errorf("create OCI layout: %w", err)
	}
	b, _ := json.Marshal(ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
	if err := atomicfile.Write(filepath.Join(dir, ocispec.ImageLayoutFile), b, 0o644); err != nil {
		return nil, fmt.Errorf("create OCI layout: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dir, ocispec.ImageIndexFile)); os.IsNotExist(err) {
		b, _ := json.MarshalIndent(ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{}}, "", "  ")
		if err := atomicfile.Write(filepath.Join(dir, ocispec.ImageIndexFile), b, 0o644); err != nil {
			return nil, fmt.Errorf("create OCI layout: %w", err)
		}
	}
	return &Layout{Dir: dir}, nil
}

// PutBlobBytes stores a small blob and returns its descriptor.
func (l *Layout) PutBlobBytes(mediaType string, b []byte) (ocispec.Descriptor, error) {
	d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	if _, err := os.Stat(l.BlobPath(d.Digest)); err == nil {
		return d, nil
	}
	return d, atomicfile.Write(l.BlobPath(d.Digest), b, 0o644)
}

// PutBlobFile moves (or, across filesystems, copies) the file at path into the layout as a blob of the given digest
// and size, which the caller computed while writing it.
func (l *Layout) PutBlobFile(path string, d digest.Digest, size int64) error {
	dst := l.BlobPath(d)
	if st, err := os.Stat(dst); err == nil && st.Size() == size {
		return os.Remove(path)
	}
	if err := os.Rename(path, dst); err == nil {
		return nil
	}
	src, err := os.Open(path)
	if err != nil {
		return err
	}
	defer src.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".blob-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tmp, h), src)
	if err == nil {
		err = tmp.Close()
	} else {
		tmp.Close()
	}
	if err != nil {
		return fmt.Errorf("store blob %s: %w", d, err)
	}
	if got := digest.NewDigest(digest.SHA256, h); got != d || n != size {
		return fmt.Errorf("store blob %s: copied %d bytes with digest %s, want %d bytes", d, n, got, size)
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return err
	}
	return os.Remove(path)
}

// Tag points tag at desc in index.json, replacing an earlier manifest of that tag.
func (l *Layout) Tag(tag string, desc ocispec.Descriptor) error {
	idx, err := l.Index()
	if err != nil {
		return err
	}
	desc.Annotations = map[string]string{ocispec.AnnotationRefName: tag}
	out := idx.Manifests[:0]
	for _, d := range idx.Manifests {
		if d.Annotations[ocispec.AnnotationRefName] != tag {
			out = append(out, d)
		}
	}
	idx.Manifests = append(out, desc)
	b, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(l.Dir, ocispec.ImageIndexFile), b, 0o644)
}

// WriteImage stores an image made of uncompressed layer tars under tag: each layer gzip'd with the given media type
// (default OCI tar+gzip), a config from cfg with its rootfs filled in (OS and architecture default to linux/amd64),
// and an OCI manifest. It returns the manifest's descriptor.
func (l *Layout) WriteImage(tag string, layers [][]byte, layerMediaType string, cfg ocispec.Image) (ocispec.Descriptor, error) {
	if layerMediaType == "" {
		layerMediaType = ocispec.MediaTypeImageLayerGzip
	}
	if cfg.OS == "" {
		cfg.OS, cfg.Architecture = "linux", "amd64"
	}
	cfg.RootFS = ocispec.RootFS{Type: "layers"}
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest}
	for _, layer := range layers {
		var gz bytes.Buffer
		zw := gzip.NewWriter(&gz)
		if _, err := zw.Write(layer); err != nil {
			return ocispec.Descriptor{}, err
		}
		if err := zw.Close(); err != nil {
			return ocispec.Descriptor{}, err
		}
		d, err := l.PutBlobBytes(layerMediaType, gz.Bytes())
		if err != nil {
			return ocispec.Descriptor{}, err
		}
		m.Layers = append(m.Layers, d)
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, digest.FromBytes(layer))
	}
	cb, err := json.Marshal(cfg)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	if m.Config, err = l.PutBlobBytes(ocispec.MediaTypeImageConfig, cb); err != nil {
		return ocispec.Descriptor{}, err
	}
	mb, err := json.Marshal(m)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	md, err := l.PutBlobBytes(ocispec.MediaTypeImageManifest, mb)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	return md, l.Tag(tag, md)
}
