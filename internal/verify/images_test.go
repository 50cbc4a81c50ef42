package verify

import (
	"context"
	"testing"

	"github.com/obdproject/obd/internal/image"
)

func TestImages(t *testing.T) {
	const layout = "oci:../../testdata/upstream/hello-world-oci:"
	src, _ := image.ParseRef(layout + "amd64")
	dst, _ := image.ParseRef(layout + "amd64-converted")
	plat := image.Platform{OS: "linux", Architecture: "amd64"}
	diffs, paths, err := Images(context.Background(), src, dst, plat)
	if err != nil {
		t.Fatal(err)
	}
	if paths < 2 {
		t.Errorf("the source holds %d paths", paths)
	}
	for _, d := range diffs {
		t.Errorf("upstream's conversion differs from its source: %s", d)
	}
	if _, _, err := Images(context.Background(), dst, src, plat); err == nil {
		t.Error("an image that is not overlaybd compared as a conversion")
	}
}
