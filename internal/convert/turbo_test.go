package convert

import (
	"archive/tar"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	digest "github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/testenv"
)

// TestConvertTurbo converts the edge-case image to TurboOCI and reads it back through the originals: the same
// tree as the source, a clean filesystem, upstream's annotations, and layer blobs that hold no file data.
func TestConvertTurbo(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	testenv.Tools(t, "e2fsck")
	dir := t.TempDir()
	layers := everyCase(t)
	// A layer of many files larger than a block and one of more than a span of the gzip index.
	layers = append(layers, layerTar(t, []tarEntry{
		{name: "big/a", typ: tar.TypeReg, body: strings.Repeat("abcdefgh", 3<<17)},
		{name: "big/b", typ: tar.TypeReg, body: strings.Repeat("z", 4097)},
		{name: "big/c", typ: tar.TypeReg, body: string(pattern(5000))},
		{name: "big/empty", typ: tar.TypeReg},
		{name: "data/big", typ: tar.TypeReg, body: "replaced"},
	}))
	src := writeSourceLayout(t, filepath.Join(dir, "src"), layers)
	res := convertLayout(t, src, ImageOptions{VirtualSize: 1 << 30, Turbo: true})
	if len(res.Blobs) != len(layers) || len(res.Targets) != len(layers) {
		t.Fatalf("%d layer blobs and %d targets for %d layers", len(res.Blobs), len(res.Targets), len(layers))
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(res.Manifest, &m); err != nil {
		t.Fatal(err)
	}
	srcImg, err := image.OpenLocalSource(src, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	sm, _ := srcImg.Manifest()
	srcImg.Close()
	var cfg ocispec.Image
	if err := json.Unmarshal(res.Config, &cfg); err != nil {
		t.Fatal(err)
	}
	for i, l := range m.Layers {
		a := l.Annotations
		if l.MediaType != image.MediaTypeDockerLayerGzip || a[image.AnnotationVersion] != image.TurboVersion ||
			a[image.AnnotationBlobDigest] != l.Digest.String() || a[image.AnnotationTurboTarget] != sm.Layers[i].Digest.String() ||
			a[image.AnnotationTurboTargetMedia] != ocispec.MediaTypeImageLayerGzip {
			t.Errorf("layer %d: %s %v", i, l.MediaType, a)
		}
		if cfg.RootFS.DiffIDs[i] == l.Digest || cfg.RootFS.DiffIDs[i] != res.Blobs[i].DiffID {
			t.Errorf("layer %d: diff_id %s is not the digest of the uncompressed blob", i, cfg.RootFS.DiffIDs[i])
		}
	}
	// The 1.5 MiB file is not in the layer blob: the blobs of the last layer stay far below its data.
	if last := res.Blobs[len(res.Blobs)-1]; last.Desc.Size > 64<<10 {
		t.Errorf("the last layer's blob is %d bytes: file data was copied", last.Desc.Size)
	}
	out := storeResult(t, res, filepath.Join(dir, "out"), "turbo")
	img, err := image.OpenLocal(out, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for i, l := range img.Layers {
		if l.Target != sm.Layers[i].Digest {
			t.Errorf("layer %d: target %s", i, l.Target)
		}
	}
	compareWithSource(t, src, img.Stack)
	fsckStack(t, img.Stack)
	// The same conversion gives the same image.
	again := convertLayout(t, src, ImageOptions{VirtualSize: 1 << 30, Turbo: true})
	if again.ManifestDesc.Digest != res.ManifestDesc.Digest {
		t.Error("two TurboOCI conversions of one image differ")
	}
}

// pattern returns n bytes of a simple deterministic sequence that gzip compresses poorly.
func pattern(n int) []byte {
	b := make([]byte, n)
	x := uint32(12345)
	for i := range b {
		x = x*1103515245 + 12345
		b[i] = byte(x >> 16)
	}
	return b
}

// TestConvertTurboUncompressed converts layers stored as plain tars: the target is read directly, without an index.
func TestConvertTurboUncompressed(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	dir := t.TempDir()
	lay, err := image.CreateLayout(filepath.Join(dir, "src"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers"}}
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest}
	for _, l := range everyCase(t) {
		d, err := lay.PutBlobBytes(image.MediaTypeDockerLayer, l)
		if err != nil {
			t.Fatal(err)
		}
		m.Layers = append(m.Layers, d)
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, digest.FromBytes(l))
	}
	cb, _ := json.Marshal(cfg)
	if m.Config, err = lay.PutBlobBytes(ocispec.MediaTypeImageConfig, cb); err != nil {
		t.Fatal(err)
	}
	mb, _ := json.Marshal(m)
	md, err := lay.PutBlobBytes(ocispec.MediaTypeImageManifest, mb)
	if err != nil {
		t.Fatal(err)
	}
	if err := lay.Tag("src", md); err != nil {
		t.Fatal(err)
	}
	src := image.Ref{Transport: image.TransportOCI, Path: filepath.Join(dir, "src"), Tag: "src"}
	res := convertLayout(t, src, ImageOptions{VirtualSize: 1 << 30, Turbo: true})
	var out ocispec.Manifest
	if err := json.Unmarshal(res.Manifest, &out); err != nil {
		t.Fatal(err)
	}
	for i, l := range out.Layers {
		if l.Annotations[image.AnnotationTurboTargetMedia] != image.MediaTypeDockerLayer {
			t.Errorf("layer %d: target media type %q", i, l.Annotations[image.AnnotationTurboTargetMedia])
		}
	}
	img, err := image.OpenLocal(storeResult(t, res, filepath.Join(dir, "out"), "turbo"), image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	compareWithSource(t, src, img.Stack)
}

// TestExtractTurboMeta extracts a TurboOCI layer blob into files, opens the layer through them, and removes them on
// Close.
func TestExtractTurboMeta(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	dir := t.TempDir()
	src := writeSourceLayout(t, filepath.Join(dir, "src"), everyCase(t)[:1])
	res := convertLayout(t, src, ImageOptions{VirtualSize: 1 << 30, Turbo: true})
	blob, err := os.Open(res.Blobs[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	defer blob.Close()
	ex := filepath.Join(dir, "meta")
	tm, err := image.ExtractTurboMeta(blob, ex)
	if err != nil {
		t.Fatal(err)
	}
	if tm.FSType != "ext4" || tm.GzipIndex == nil {
		t.Fatalf("extracted %+v", tm)
	}
	target, err := os.Open(res.Targets[0].Path)
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	if _, err := image.OpenTurbo(tm, target, res.Targets[0].Desc.Size); err != nil {
		t.Fatal(err)
	}
	if err := tm.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(ex); !os.IsNotExist(err) {
		t.Fatalf("the extraction is left after Close: %v", err)
	}
	// A blob that is no TurboOCI layer is refused and leaves nothing.
	if _, err := image.ExtractTurboMeta(strings.NewReader("not a layer"), ex); err == nil {
		t.Fatal("a bad blob extracted")
	}
	if _, err := os.Stat(ex); !os.IsNotExist(err) {
		t.Fatalf("a failed extraction is left: %v", err)
	}
}
