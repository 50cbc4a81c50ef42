package node

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"testing"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/profile"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/testenv"
	"github.com/obdproject/obd/trace"
)

// A normal image with an overlaybd referrer that has an acceleration layer: the Redirector answers every layer of
// the pull from one lookup, and registers the referrer's recorded start for the normal image's chain, so that its
// containers prefetch it.
func TestStandins(t *testing.T) {
	host := testenv.Registry(t, "")
	rc, err := registry.New(registry.Options{PlainHTTP: true, Credentials: registry.StaticCredentials("", "")})
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	ctx := context.Background()
	push := func(mediaType string, b []byte) ocispec.Descriptor {
		d := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
		if err := rc.PushBlob(ctx, host, "app", d, bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
		return d
	}
	manifest := func(tag string, m ocispec.Manifest) ocispec.Descriptor {
		m.Versioned, m.MediaType = specs.Versioned{SchemaVersion: 2}, ocispec.MediaTypeImageManifest
		b, _ := json.Marshal(m)
		d, err := rc.PushManifest(ctx, host, "app", tag, m.MediaType, b)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	diffIDs := []digest.Digest{digest.FromString("tar 0"), digest.FromString("tar 1")}
	cfg, _ := json.Marshal(ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: image.DefaultPlatform().Architecture},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: diffIDs}})
	plain := manifest("v1", ocispec.Manifest{Config: push(ocispec.MediaTypeImageConfig, cfg),
		Layers: []ocispec.Descriptor{push(ocispec.MediaTypeImageLayerGzip, []byte("gzip 0")), push(ocispec.MediaTypeImageLayerGzip, []byte("gzip 1"))}})
	var blocks []ocispec.Descriptor
	for i := range 2 {
		l := push(ocispec.MediaTypeImageLayer, fmt.Appendf(nil, "overlaybd %d", i))
		l.Annotations = map[string]string{image.AnnotationBlobDigest: l.Digest.String(), image.AnnotationBlobSize: fmt.Sprint(l.Size)}
		blocks = append(blocks, l)
	}
	var tf bytes.Buffer
	if err := trace.Encode(&tf, []trace.Record{{Op: trace.Read, Layer: 1, Offset: 4096, Count: 8192}}); err != nil {
		t.Fatal(err)
	}
	accel, adesc, err := profile.AccelerationLayer(tf.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	push(adesc.MediaType, accel)
	ref := manifest("", ocispec.Manifest{ArtifactType: image.ArtifactTypeOverlaybd, Config: push(ocispec.MediaTypeImageConfig, []byte(`{}`)),
		Layers: append(blocks, adesc), Subject: &plain})

	profiles := t.TempDir()
	s := newStandins(func(string) (*registry.Client, error) { return rc, nil }, profiles, slog.New(slog.NewTextHandler(io.Discard, nil)))
	chain := identity.ChainIDs(diffIDs)
	for i, c := range chain {
		l, err := s.Redirect(ctx, host+"/app:v1", plain.Digest, c.String())
		if err != nil || l == nil {
			t.Fatalf("layer %d: %+v, %v", i, l, err)
		}
		if l.Labels[image.AnnotationBlobDigest] != blocks[i].Digest.String() || l.Labels[snapshotter.LabelImageRef] != host+"/app@"+ref.Digest.String() ||
			len(l.Lowers) != i {
			t.Errorf("layer %d: %+v", i, l)
		}
	}
	if len(s.found) != 1 {
		t.Errorf("%d lookups remembered, want 1", len(s.found))
	}
	got, err := os.ReadFile(snapshotter.ProfilePath(profiles, chain[1].String()))
	if err != nil || !bytes.Equal(got, tf.Bytes()) {
		t.Errorf("the stand-in's trace is not registered for the image's chain: %v", err)
	}
	// Another manifest: no stand-in.
	if l, err := s.Redirect(ctx, host+"/app:v1", digest.FromString("other"), chain[0].String()); err != nil || l != nil {
		t.Errorf("a manifest without referrers: %+v, %v", l, err)
	}
}
