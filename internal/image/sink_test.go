package image

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	digest "github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/testenv"
)

// testImage returns an image of one layer, whose blob is a new file in dir, and whose manifest has artifactType at.
func testImage(t *testing.T, dir, layer, at string) *Image {
	t.Helper()
	path := filepath.Join(dir, "layer-"+layer)
	if err := os.WriteFile(path, []byte(layer), 0o600); err != nil {
		t.Fatal(err)
	}
	ld := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromString(layer), Size: int64(len(layer))}
	cfg := []byte(`{"rootfs":{"type":"layers","diff_ids":["` + ld.Digest.String() + `"]}}`)
	img := &Image{Config: cfg, ConfigDesc: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))},
		Layers: []Blob{{Desc: ld, Path: path}}}
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest, ArtifactType: at,
		Config: img.ConfigDesc, Layers: []ocispec.Descriptor{ld}}
	var err error
	if img.Manifest, err = json.Marshal(m); err != nil {
		t.Fatal(err)
	}
	img.ManifestDesc = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(img.Manifest), Size: int64(len(img.Manifest))}
	return img
}

func TestLayoutSink(t *testing.T) {
	ctx := context.Background()
	work, dir := t.TempDir(), filepath.Join(t.TempDir(), "out")
	s := NewLayoutSink(dir)
	index := func() []ocispec.Descriptor {
		t.Helper()
		lay, err := OpenLayout(dir)
		if err != nil {
			t.Fatal(err)
		}
		idx, err := lay.Index()
		if err != nil {
			t.Fatal(err)
		}
		return idx.Manifests
	}

	// An index's entry: its blobs are stored (the layer file moved in), it is not listed.
	entry := testImage(t, work, "entry", "")
	if err := s.PutImage(ctx, entry, "", true); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(entry.Layers[0].Path); !os.IsNotExist(err) {
		t.Errorf("the layer file was not moved into the layout: %v", err)
	}
	for _, d := range []digest.Digest{entry.Layers[0].Desc.Digest, entry.ConfigDesc.Digest, entry.ManifestDesc.Digest} {
		if _, err := os.Stat(filepath.Join(dir, "blobs", "sha256", d.Encoded())); err != nil {
			t.Errorf("blob %s: %v", d, err)
		}
	}
	if m := index(); len(m) != 0 {
		t.Errorf("index.json lists an index's entry: %+v", m)
	}

	// Untagged (a referrer): listed with its artifactType; tagged later, the untagged entry goes.
	ref := testImage(t, work, "referrer", "application/x-test")
	if err := s.PutImage(ctx, ref, "", false); err != nil {
		t.Fatal(err)
	}
	if m := index(); len(m) != 1 || m[0].Digest != ref.ManifestDesc.Digest || m[0].ArtifactType != "application/x-test" || len(m[0].Annotations) != 0 {
		t.Fatalf("index.json after an untagged image: %+v", m)
	}
	if err := s.PutImage(ctx, testImage(t, work, "referrer", "application/x-test"), "v1", false); err != nil {
		t.Fatal(err)
	}
	if m := index(); len(m) != 1 || m[0].Annotations[ocispec.AnnotationRefName] != "v1" {
		t.Fatalf("index.json after tagging: %+v", m)
	}

	// An index under a tag.
	ib := []byte(`{"schemaVersion":2,"manifests":[]}`)
	id := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageIndex, Digest: digest.FromBytes(ib), Size: int64(len(ib))}
	if err := s.PutIndex(ctx, id, ib, "all"); err != nil {
		t.Fatal(err)
	}
	lay, _ := OpenLayout(dir)
	if top, b, err := lay.Top(Ref{Tag: "all"}); err != nil || top.Digest != id.Digest || string(b) != string(ib) {
		t.Errorf("tag all: %+v %q %v", top, b, err)
	}

	// A blob with no local copy cannot go into a layout.
	remote := testImage(t, work, "remote", "")
	remote.Layers[0].Path = ""
	if err := s.PutImage(ctx, remote, "x", false); err == nil || !strings.Contains(err.Error(), "no local copy") {
		t.Errorf("a layer without a file: %v", err)
	}
}

func TestRegistrySink(t *testing.T) {
	ctx := context.Background()
	host := testenv.Registry(t, "")
	c, err := registry.New(registry.Options{PlainHTTP: true, RetryBudget: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	lay, err := OpenLayout(helloLayout)
	if err != nil {
		t.Fatal(err)
	}
	// A layout's image, unchanged.
	dst := Ref{Transport: TransportRegistry, Name: host + "/hello", Tag: "v1"}
	if err := PushLayout(ctx, c, lay, "amd64", dst); err != nil {
		t.Fatal(err)
	}
	want, _ := lay.Resolve(Ref{Tag: "amd64"})
	if got, _, err := c.Resolve(ctx, host, "hello", "v1"); err != nil || got.Digest != want.Digest {
		t.Fatalf("hello:v1 is %s (%v), want the layout's manifest %s", got.Digest, err, want.Digest)
	}

	// A layer with no local copy comes from a repository of the registry that holds it: mounted, or read.
	img := testImage(t, t.TempDir(), "shared", "")
	if err := NewRegistrySink(c, Ref{Transport: TransportRegistry, Name: host + "/a"}).PutImage(ctx, img, "v1", false); err != nil {
		t.Fatal(err)
	}
	img.Layers[0].Path, img.Layers[0].Repos = "", []string{"a"}
	if err := NewRegistrySink(c, Ref{Transport: TransportRegistry, Name: host + "/b"}).PutImage(ctx, img, "", true); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Resolve(ctx, host, "b", img.ManifestDesc.Digest.String()); err != nil {
		t.Errorf("b by digest: %v", err)
	}
	if _, _, err := c.Resolve(ctx, host, "b", "v1"); err == nil {
		t.Errorf("an index's entry was tagged")
	}
	// Nowhere to read it from.
	img.Layers[0].Repos = []string{"nothing-here"}
	err = NewRegistrySink(c, Ref{Transport: TransportRegistry, Name: host + "/c"}).PutImage(ctx, img, "v1", false)
	if err == nil || !strings.Contains(err.Error(), "no local copy and no registry copy") {
		t.Errorf("a layer no repository holds: %v", err)
	}
}
