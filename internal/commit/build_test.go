package commit

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/lsmt"
)

// helloConverted is upstream's converted hello-world image: one overlaybd layer of a 64 GiB ext4.
var helloConverted = image.Ref{Transport: image.TransportOCI, Path: "../../testdata/upstream/hello-world-oci", Tag: "amd64-converted"}

// layoutBase returns the base image from an OCI layout, counting the layers fetched.
func layoutBase(t *testing.T, ref image.Ref) (Base, *int) {
	t.Helper()
	lay, err := image.OpenLayout(ref.Path)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := lay.Resolve(ref)
	if err != nil {
		t.Fatal(err)
	}
	m, mdesc, err := lay.Manifest(desc, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := lay.ReadBlob(m.Config)
	if err != nil {
		t.Fatal(err)
	}
	fetched := new(int)
	return Base{Manifest: m, MediaType: mdesc.MediaType, Config: cfg, Fetch: func(_ context.Context, d ocispec.Descriptor) (io.ReadCloser, error) {
		*fetched++
		return lay.OpenBlob(d)
	}}, fetched
}

// writes are the container's changes in the tests: blocks written over the base filesystem and one discarded.
var writes = []struct {
	off  int64
	data []byte
}{
	{0, bytes.Repeat([]byte("super"), 4096/5*2+2)[:8192]},
	{1 << 20, bytes.Repeat([]byte{0xab}, 64<<10)},
	{5 << 30, append([]byte("far away, in a 64 GiB disk"), make([]byte, 512-26)...)},
}

// sealedLayer writes a sealed layer of the test's changes over vsize bytes, as the snapshotter seals a container's.
func sealedLayer(t *testing.T, dir string, vsize int64) string {
	t.Helper()
	data, err := os.Create(filepath.Join(dir, "writable_data"))
	if err != nil {
		t.Fatal(err)
	}
	defer data.Close()
	index, err := os.Create(filepath.Join(dir, "writable_index"))
	if err != nil {
		t.Fatal(err)
	}
	defer index.Close()
	rw, err := lsmt.CreateRW(data, index, vsize, lsmt.CreateOptions{Sparse: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range writes {
		if _, err := rw.WriteAt(w.data, w.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := rw.Discard(2<<20, 8192); err != nil {
		t.Fatal(err)
	}
	if _, err := rw.Seal(); err != nil {
		t.Fatal(err)
	}
	return data.Name()
}

// stackOf opens the image written into an OCI layout.
func stackOf(t *testing.T, res *Result) *image.Local {
	t.Helper()
	dir := t.TempDir()
	if err := image.NewLayoutSink(dir).PutImage(context.Background(), res.Image, "out", false); err != nil {
		t.Fatal(err)
	}
	img, err := image.OpenLocal(image.Ref{Transport: image.TransportOCI, Path: dir, Tag: "out"}, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// expect reads want's bytes at the test's changes and a few base ranges from both stacks.
func sameData(t *testing.T, got, want io.ReaderAt) {
	t.Helper()
	ranges := [][2]int64{{0, 4096}, {1024, 1 << 20}, {1 << 20, 128 << 10}, {2 << 20, 16384}, {5 << 30, 4096}, {64<<30 - 4096, 4096}}
	for _, r := range ranges {
		a, b := make([]byte, r[1]), make([]byte, r[1])
		if _, err := got.ReadAt(a, r[0]); err != nil && err != io.EOF {
			t.Fatalf("read %d+%d: %v", r[0], r[1], err)
		}
		if _, err := want.ReadAt(b, r[0]); err != nil && err != io.EOF {
			t.Fatalf("read %d+%d: %v", r[0], r[1], err)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("bytes %d+%d differ", r[0], r[1])
		}
	}
}

func TestBuild(t *testing.T) {
	ctx := context.Background()
	base, fetched := layoutBase(t, helloConverted)
	baseImg, err := image.OpenLocal(helloConverted, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer baseImg.Close()
	sealed := sealedLayer(t, t.TempDir(), baseImg.Stack.VirtualSize())

	// The expected filesystem: the base image with the sealed layer on top.
	sf, err := os.Open(sealed)
	if err != nil {
		t.Fatal(err)
	}
	defer sf.Close()
	st, _ := sf.Stat()
	top, err := lsmt.Open(sf, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	baseFile, err := os.Open(filepath.Join(helloConverted.Path, "blobs", "sha256", baseImg.Layers[0].BlobDigest.Encoded()))
	if err != nil {
		t.Fatal(err)
	}
	defer baseFile.Close()
	lower, err := image.OpenLayerBlob(baseFile, baseImg.Layers[0].BlobSize, true)
	if err != nil {
		t.Fatal(err)
	}
	want, err := lsmt.NewStack([]*lsmt.File{lower, top}, nil)
	if err != nil {
		t.Fatal(err)
	}

	res, err := Build(ctx, base, []string{sealed}, Options{WorkDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer res.Cleanup()
	if res.New != 1 || len(res.Image.Layers) != 2 || res.Image.Layers[0].Desc.Digest != baseImg.Layers[0].BlobDigest {
		t.Fatalf("layers %+v, new %d", res.Image.Layers, res.New)
	}
	newLayer := res.Image.Layers[1].Desc
	if newLayer.Annotations[image.AnnotationBlobDigest] != newLayer.Digest.String() || newLayer.MediaType != baseImg.Layers[0].Descriptor.MediaType {
		t.Errorf("new layer %+v", newLayer)
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(res.Image.Config, &cfg); err != nil {
		t.Fatal(err)
	}
	if len(cfg.RootFS.DiffIDs) != 2 || cfg.RootFS.DiffIDs[1] != newLayer.Digest || cfg.History[len(cfg.History)-1].CreatedBy != "obd commit" {
		t.Errorf("config %+v", cfg)
	}
	nf, err := os.Open(res.Image.Layers[1].Path)
	if err != nil {
		t.Fatal(err)
	}
	defer nf.Close()
	nl, err := image.OpenLayerBlob(nf, newLayer.Size, true)
	if err != nil {
		t.Fatal(err)
	}
	if nl.VirtualSize() != baseImg.Stack.VirtualSize() || nl.Header().UUID == "" {
		t.Errorf("new layer: virtual size %d (image's %d), uuid %q", nl.VirtualSize(), baseImg.Stack.VirtualSize(), nl.Header().UUID)
	}
	got := stackOf(t, res)
	if len(got.Layers) != 2 {
		t.Fatalf("%d layers", len(got.Layers))
	}
	sameData(t, got.Stack, want)
	if *fetched != 1 {
		t.Errorf("fetched %d base layers, want 1", *fetched)
	}

	// Deterministic: the same sealed layer over the same base gives the same image.
	again, err := Build(ctx, base, []string{sealed}, Options{WorkDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer again.Cleanup()
	if again.Image.ManifestDesc.Digest != res.Image.ManifestDesc.Digest {
		t.Errorf("manifest %s, then %s", res.Image.ManifestDesc.Digest, again.Image.ManifestDesc.Digest)
	}

	// Base layers a destination repository holds are not fetched.
	*fetched = 0
	base.Repos = []string{"library/hello"}
	reused, err := Build(ctx, base, []string{sealed}, Options{WorkDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer reused.Cleanup()
	if l := reused.Image.Layers[0]; *fetched != 0 || l.Path != "" || len(l.Repos) != 1 || reused.Image.ManifestDesc.Digest != res.Image.ManifestDesc.Digest {
		t.Errorf("reused base layer %+v, fetched %d", l, *fetched)
	}

	// Squashed: one layer with the whole filesystem.
	squashed, err := Build(ctx, base, []string{sealed}, Options{WorkDir: t.TempDir(), Squash: true})
	if err != nil {
		t.Fatal(err)
	}
	defer squashed.Cleanup()
	if err := json.Unmarshal(squashed.Image.Config, &cfg); err != nil {
		t.Fatal(err)
	}
	if len(squashed.Image.Layers) != 1 || len(cfg.RootFS.DiffIDs) != 1 || len(cfg.History) != 1 {
		t.Fatalf("squashed: %d layers, config %+v", len(squashed.Image.Layers), cfg)
	}
	sameData(t, stackOf(t, squashed).Stack, want)
}

func TestBuildErrors(t *testing.T) {
	ctx := context.Background()
	base, _ := layoutBase(t, helloConverted)
	if _, err := Build(ctx, base, nil, Options{}); err == nil {
		t.Error("no sealed layer: no error")
	}
	notLayer := filepath.Join(t.TempDir(), "junk")
	if err := os.WriteFile(notLayer, []byte("not a layer"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Build(ctx, base, []string{notLayer}, Options{WorkDir: t.TempDir()}); err == nil {
		t.Error("a file that is no layer: no error")
	}
	plain, _ := layoutBase(t, image.Ref{Transport: image.TransportOCI, Path: helloConverted.Path, Tag: "amd64"})
	if _, err := Build(ctx, plain, []string{notLayer}, Options{}); err == nil {
		t.Error("a base image that is not overlaybd: no error")
	}
}
