package testimage

import (
	"archive/tar"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/klauspost/compress/gzip"

	"github.com/obdproject/obd/internal/image"
)

func TestBuildSmallDeterministic(t *testing.T) {
	a := BuildForTest(t, Small)
	b, err := Build(context.Background(), Small, filepath.Join(t.TempDir(), "again"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(a.Layers) != 3 || len(b.Layers) != 3 {
		t.Fatalf("%d and %d layers, want 3", len(a.Layers), len(b.Layers))
	}
	for i := range a.Layers {
		if a.Layers[i].Desc.Digest != b.Layers[i].Desc.Digest || a.Layers[i].DiffID != b.Layers[i].DiffID {
			t.Errorf("layer %d differs between builds: %s vs %s", i, a.Layers[i].Desc.Digest, b.Layers[i].Desc.Digest)
		}
	}
	if n := a.TarBytes(); n < 30<<20 || n > 80<<20 {
		t.Errorf("small image has %d MB of tar, want 30..80 MB", n>>20)
	}
	top := a.Layers[2]
	if len(top.Whiteouts) != 1 || top.Whiteouts[0] != WhiteoutPath || len(top.Opaque) != 1 || top.Opaque[0] != OpaqueDir {
		t.Errorf("config layer whiteouts %v, opaque %v", top.Whiteouts, top.Opaque)
	}
	// The layout opens as an image source, and the capability survives as a PAX record.
	src, err := image.OpenLocalSource(a.Ref, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	rc, err := src.OpenLayer(context.Background(), 2)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	zr, err := gzip.NewReader(rc)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	found := false
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Name == CapPath {
			found = h.PAXRecords[capXattr] == CapValue
		}
	}
	if !found {
		t.Errorf("%s has no security.capability PAX record", CapPath)
	}
	if _, err := os.Stat(filepath.Join(DefaultCacheDir(), "busybox-static.deb")); err != nil {
		t.Errorf("deb cache: %v", err)
	}
}
