package pull

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/images"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/snapshotter"
)

// LabelLayers labels each layer with the image reference and, as the CRI plugin does, the layer's digest and those
// of the layers from it up: the top layer lists only itself, which is how the snapshotter knows the pull is over.
func TestLabelLayers(t *testing.T) {
	layer := func(s string) ocispec.Descriptor {
		return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromString(s)}
	}
	children := []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromString("config")}, layer("a"), layer("b"), layer("c")}
	h := LabelLayers("registry.test/app:v1", nil)(images.HandlerFunc(func(context.Context, ocispec.Descriptor) ([]ocispec.Descriptor, error) {
		return slices.Clone(children), nil
	}))
	got, err := h.Handle(context.Background(), ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest})
	if err != nil {
		t.Fatal(err)
	}
	if len(got[0].Annotations) != 0 {
		t.Errorf("the config got labels %v", got[0].Annotations)
	}
	for i, d := range got[1:] {
		var above []string
		for _, l := range children[1+i:] {
			above = append(above, l.Digest.String())
		}
		a := d.Annotations
		if a[snapshotter.LabelImageRef] != "registry.test/app:v1" || a[snapshotter.LabelCRILayerDigest] != d.Digest.String() ||
			a[snapshotter.LabelCRIImageLayers] != strings.Join(above, ",") {
			t.Errorf("layer %d: labels %v", i, a)
		}
	}
}

// A long list of layers is cut to what a label holds, from the layer up.
func TestLayersFromFitsALabel(t *testing.T) {
	var descs []ocispec.Descriptor
	for i := range 100 {
		descs = append(descs, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString(strings.Repeat("x", i))})
	}
	s := layersFrom(descs)
	if n := len(snapshotter.LabelCRIImageLayers) + len(s); n > maxLabel {
		t.Fatalf("label of %d bytes, over %d", n, maxLabel)
	}
	if !strings.HasPrefix(s, descs[0].Digest.String()+","+descs[1].Digest.String()) || strings.Count(s, ",") < 50 {
		t.Fatalf("layersFrom = %.200s…", s)
	}
}
