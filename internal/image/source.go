package image

import (
	"archive/tar"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/iocount"
)

// Source is an image to read: manifest, config and layer blobs.
type Source interface {
	// Ref is where the image came from.
	Ref() Ref
	// Manifest is the image manifest (for one platform) and its descriptor.
	Manifest() (ocispec.Manifest, ocispec.Descriptor)
	// Config returns the config blob, digest-checked.
	Config(ctx context.Context) ([]byte, error)
	// OpenLayer streams layer i's blob as stored (possibly compressed). The reader fails at EOF when the bytes do not
	// match the descriptor's digest and size.
	OpenLayer(ctx context.Context, i int) (io.ReadCloser, error)
	Close() error
}

// OpenLocalSource opens an image from an OCI layout or a docker-save archive.
func OpenLocalSource(ref Ref, platform Platform) (Source, error) {
	switch ref.Transport {
	case TransportOCI:
		lay, err := OpenLayout(ref.Path)
		if err != nil {
			return nil, err
		}
		d, err := lay.Resolve(ref)
		if err != nil {
			return nil, err
		}
		m, md, err := lay.Manifest(d, platform)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", ref, err)
		}
		return &layoutSource{ref: ref, lay: lay, m: m, md: md}, nil
	case TransportDockerArchive:
		return openDockerArchive(ref)
	}
	return nil, fmt.Errorf("%s: not a local image reference", ref)
}

type layoutSource struct {
	ref Ref
	lay *Layout
	m   ocispec.Manifest
	md  ocispec.Descriptor
}

func (s *layoutSource) Ref() Ref                                         { return s.ref }
func (s *layoutSource) Manifest() (ocispec.Manifest, ocispec.Descriptor) { return s.m, s.md }
func (s *layoutSource) Close() error                                     { return nil }

func (s *layoutSource) Config(ctx context.Context) ([]byte, error) {
	return s.lay.ReadBlob(s.m.Config)
}

func (s *layoutSource) OpenLayer(ctx context.Context, i int) (io.ReadCloser, error) {
	d := s.m.Layers[i]
	f, err := s.lay.OpenBlob(d)
	if err != nil {
		return nil, err
	}
	return NewVerifyingReader(f, d), nil
}

// dockerArchive is a `docker save` tar: manifest.json lists the config and layer files of each image.
type dockerArchive struct {
	ref    Ref
	f      *os.File
	files  map[string]*io.SectionReader
	m      ocispec.Manifest
	md     ocispec.Descriptor
	config string
	layers []string
}

func openDockerArchive(ref Ref) (Source, error) {
	f, err := os.Open(ref.Path)
	if err != nil {
		return nil, err
	}
	a := &dockerArchive{ref: ref, f: f, files: map[string]*io.SectionReader{}}
	if err := a.index(); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", ref, err)
	}
	return a, nil
}

// index records where each member lies, then reads manifest.json and picks the image.
func (a *dockerArchive) index() error {
	cr := &iocount.Reader{R: a.f}
	tr := tar.NewReader(cr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read archive: %w", err)
		}
		if h.Typeflag == tar.TypeReg {
			a.files[path.Clean(h.Name)] = io.NewSectionReader(a.f, cr.N, h.Size)
		}
	}
	mf, ok := a.files["manifest.json"]
	if !ok {
		return fmt.Errorf("no manifest.json: not a docker-save archive")
	}
	if mf.Size() > maxMetadataSize {
		return fmt.Errorf("manifest.json too large")
	}
	var entries []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	b, err := io.ReadAll(mf)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, &entries); err != nil {
		return fmt.Errorf("manifest.json: %w", err)
	}
	var tags []string
	for _, e := range entries {
		match := a.ref.Tag == "" && len(entries) == 1
		for _, t := range e.RepoTags {
			tags = append(tags, t)
			if t == a.ref.Tag || path.Base(t) == a.ref.Tag {
				match = true
			}
		}
		if match {
			a.config, a.layers = e.Config, e.Layers
			break
		}
	}
	if a.config == "" {
		return fmt.Errorf("no image %q in manifest.json (tags: %v); name one as docker-archive:FILE:TAG", a.ref.Tag, tags)
	}
	cfg, err := a.member(a.config)
	if err != nil {
		return err
	}
	if cfg.Size() > maxMetadataSize {
		return fmt.Errorf("config %s too large", a.config)
	}
	a.m = ocispec.Manifest{MediaType: MediaTypeDockerManifest}
	a.m.SchemaVersion = 2
	if a.m.Config, err = describe(cfg, MediaTypeDockerConfig); err != nil {
		return fmt.Errorf("config %s: %w", a.config, err)
	}
	for _, l := range a.layers {
		sr, err := a.member(l)
		if err != nil {
			return err
		}
		d, err := describe(sr, MediaTypeDockerLayer)
		if err != nil {
			return fmt.Errorf("layer %s: %w", l, err)
		}
		a.m.Layers = append(a.m.Layers, d)
	}
	mb, _ := json.Marshal(a.m)
	a.md = ocispec.Descriptor{MediaType: MediaTypeDockerManifest, Digest: digest.FromBytes(mb), Size: int64(len(mb))}
	return nil
}

func (a *dockerArchive) member(name string) (*io.SectionReader, error) {
	sr, ok := a.files[path.Clean(name)]
	if !ok {
		return nil, fmt.Errorf("manifest.json names %q, which the archive does not hold", name)
	}
	return sr, nil
}

func describe(sr *io.SectionReader, mediaType string) (ocispec.Descriptor, error) {
	h := digest.SHA256.Digester()
	if _, err := io.Copy(h.Hash(), io.NewSectionReader(sr, 0, sr.Size())); err != nil {
		return ocispec.Descriptor{}, err
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: h.Digest(), Size: sr.Size()}, nil
}

func (a *dockerArchive) Ref() Ref                                         { return a.ref }
func (a *dockerArchive) Manifest() (ocispec.Manifest, ocispec.Descriptor) { return a.m, a.md }
func (a *dockerArchive) Close() error                                     { return a.f.Close() }

func (a *dockerArchive) Config(ctx context.Context) ([]byte, error) {
	sr, err := a.member(a.config)
	if err != nil {
		return nil, err
	}
	return io.ReadAll(NewVerifyingReader(io.NopCloser(io.NewSectionReader(sr, 0, sr.Size())), a.m.Config))
}

func (a *dockerArchive) OpenLayer(ctx context.Context, i int) (io.ReadCloser, error) {
	sr, err := a.member(a.layers[i])
	if err != nil {
		return nil, err
	}
	return NewVerifyingReader(io.NopCloser(io.NewSectionReader(sr, 0, sr.Size())), a.m.Layers[i]), nil
}

// NewVerifyingReader wraps r so that reaching EOF with bytes that do not match desc's size and digest is an error.
func NewVerifyingReader(r io.ReadCloser, desc ocispec.Descriptor) io.ReadCloser {
	return &verifyingReader{r: r, desc: desc, v: desc.Digest.Verifier()}
}

type verifyingReader struct {
	r    io.ReadCloser
	desc ocispec.Descriptor
	v    digest.Verifier
	n    int64
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.n += int64(n)
	v.v.Write(p[:n])
	if v.n > v.desc.Size {
		return n, fmt.Errorf("blob %s: more than the %d bytes the descriptor says", v.desc.Digest, v.desc.Size)
	}
	if err == io.EOF {
		if v.n != v.desc.Size {
			return n, fmt.Errorf("blob %s: %d bytes, descriptor says %d (truncated?)", v.desc.Digest, v.n, v.desc.Size)
		}
		if !v.v.Verified() {
			return n, fmt.Errorf("blob %s: content does not match its digest (corrupt?)", v.desc.Digest)
		}
	}
	return n, err
}

func (v *verifyingReader) Close() error { return v.r.Close() }
