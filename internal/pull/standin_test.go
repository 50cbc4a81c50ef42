package pull

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"testing"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/testenv"
)

// fixture pushes images to a repository of a real registry (docker-registry 2.8: referrers through the tag schema).
type fixture struct {
	t    *testing.T
	rc   *registry.Client
	host string
	repo string
}

func (f *fixture) blob(mediaType string, b []byte) ocispec.Descriptor {
	d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	if err := f.rc.PushBlob(context.Background(), f.host, f.repo, d, bytes.NewReader(b)); err != nil {
		f.t.Fatal(err)
	}
	return d
}

func (f *fixture) manifest(tag string, m any, mediaType string) ocispec.Descriptor {
	b, err := json.Marshal(m)
	if err != nil {
		f.t.Fatal(err)
	}
	d, err := f.rc.PushManifest(context.Background(), f.host, f.repo, tag, mediaType, b)
	if err != nil {
		f.t.Fatal(err)
	}
	return d
}

// plain pushes a normal image of n layers and returns its manifest descriptor, layers and diff IDs.
func (f *fixture) plain(tag string, n int) (ocispec.Descriptor, []ocispec.Descriptor, []digest.Digest) {
	var layers []ocispec.Descriptor
	var diffIDs []digest.Digest
	for i := range n {
		layers = append(layers, f.blob(ocispec.MediaTypeImageLayerGzip, fmt.Appendf(nil, "gzip layer %d of %s", i, tag)))
		diffIDs = append(diffIDs, digest.FromString(fmt.Sprintf("tar %d of %s", i, tag)))
	}
	cfg, _ := json.Marshal(ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: image.DefaultPlatform().Architecture},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: diffIDs}})
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		Config: f.blob(ocispec.MediaTypeImageConfig, cfg), Layers: layers}
	return f.manifest(tag, m, ocispec.MediaTypeImageManifest), layers, diffIDs
}

// referrer attaches an overlaybd image of n layers to subject; targets, if set, make it a TurboOCI one.
func (f *fixture) referrer(subject ocispec.Descriptor, n int, targets []digest.Digest) ([]ocispec.Descriptor, ocispec.Descriptor) {
	artifact := image.ArtifactTypeOverlaybd
	if targets != nil {
		artifact = image.ArtifactTypeTurboOCI
	}
	var layers []ocispec.Descriptor
	for i := range n {
		l := f.blob(ocispec.MediaTypeImageLayer, fmt.Appendf(nil, "overlaybd layer %d over %s %s", i, subject.Digest, artifact))
		l.Annotations = map[string]string{image.AnnotationBlobDigest: l.Digest.String(), image.AnnotationBlobSize: fmt.Sprint(l.Size),
			image.AnnotationVersion: image.FormatVersion}
		if targets != nil {
			l.Annotations[image.AnnotationVersion] = image.TurboVersion
			l.Annotations[image.AnnotationTurboTarget] = targets[i].String()
		}
		layers = append(layers, l)
	}
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest, ArtifactType: artifact,
		Config: f.blob(ocispec.MediaTypeImageConfig, fmt.Appendf(nil, `{"rootfs":{"type":"layers"},"n":%d}`, n)), Layers: layers, Subject: &subject}
	return layers, f.manifest("", m, ocispec.MediaTypeImageManifest)
}

func TestFindStandin(t *testing.T) {
	host := testenv.Registry(t, "")
	rc, err := registry.New(registry.Options{PlainHTTP: true, Credentials: registry.StaticCredentials("", "")})
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	ctx := context.Background()
	f := &fixture{t: t, rc: rc, host: host, repo: "app"}
	ref := func(tag string) image.Ref {
		r, err := image.ParseRef(host + "/app:" + tag)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	platform := image.DefaultPlatform() // of the index

	// A native conversion attached to the manifest.
	m, _, diffIDs := f.plain("native", 3)
	want, rdesc := f.referrer(m, 3, nil)
	st, err := FindStandin(ctx, rc, ref("native"), m.Digest)
	if err != nil || st == nil {
		t.Fatalf("FindStandin: %+v, %v", st, err)
	}
	if st.Ref.Digest != rdesc.Digest || st.Ref.Name != host+"/app" || len(st.Layers) != 3 || len(st.Chain) != 3 {
		t.Fatalf("stand-in %+v, want %s with 3 layers", st, rdesc.Digest)
	}
	chain := identity.ChainIDs(diffIDs) // (in place)
	for i, l := range st.Layers {
		if l.BlobDigest != want[i].Digest || st.Chain[i] != chain[i] {
			t.Errorf("layer %d: %s for chain %s, want %s for %s", i, l.BlobDigest, st.Chain[i], want[i].Digest, chain[i])
		}
	}

	// A TurboOCI conversion: each layer's target is the layer it stands in for.
	m, layers, _ := f.plain("turbo", 2)
	f.referrer(m, 2, []digest.Digest{layers[0].Digest, layers[1].Digest})
	if st, err := FindStandin(ctx, rc, ref("turbo"), m.Digest); err != nil || st == nil || st.Layers[1].Target != layers[1].Digest {
		t.Fatalf("TurboOCI stand-in: %+v, %v", st, err)
	}

	// Attached to an index that lists the manifest (the reference names the index).
	m, _, _ = f.plain("", 2)
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{{MediaType: m.MediaType, Digest: m.Digest, Size: m.Size, Platform: &ocispec.Platform{OS: platform.OS, Architecture: platform.Architecture}}}}
	idesc := f.manifest("multi", idx, ocispec.MediaTypeImageIndex)
	f.referrer(idesc, 2, nil)
	if st, err := FindStandin(ctx, rc, ref("multi"), m.Digest); err != nil || st == nil || len(st.Layers) != 2 {
		t.Fatalf("stand-in attached to the index: %+v, %v", st, err)
	}

	// None: no referrer; a referrer of another number of layers; a TurboOCI one whose targets are other layers; an
	// index's referrer when the index does not list the manifest being pulled.
	m, _, _ = f.plain("none", 2)
	if st, err := FindStandin(ctx, rc, ref("none"), m.Digest); err != nil || st != nil {
		t.Errorf("image without a referrer: %+v, %v", st, err)
	}
	m, _, _ = f.plain("count", 2)
	f.referrer(m, 3, nil)
	if st, err := FindStandin(ctx, rc, ref("count"), m.Digest); err != nil || st != nil {
		t.Errorf("referrer with another number of layers: %+v, %v", st, err)
	}
	m, layers, _ = f.plain("wrongtarget", 2)
	f.referrer(m, 2, []digest.Digest{layers[0].Digest, digest.FromString("another layer")})
	if st, err := FindStandin(ctx, rc, ref("wrongtarget"), m.Digest); err != nil || st != nil {
		t.Errorf("TurboOCI referrer of other layers: %+v, %v", st, err)
	}
	other, _, _ := f.plain("other", 2)
	if st, err := FindStandin(ctx, rc, ref("multi"), other.Digest); err != nil || st != nil {
		t.Errorf("referrer of an index that does not list the manifest: %+v, %v", st, err)
	}
}
