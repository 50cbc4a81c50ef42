package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/testenv"
	"github.com/obdproject/obd/internal/verify"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/zfile"
)

// tarEntry describes one entry of a synthetic layer.
type tarEntry struct {
	name, link string
	typ        byte
	body       string
	mode       int64
	uid, gid   int
	major      int64
	xattrs     map[string]string
}

func layerTar(t testing.TB, ents []tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(1700000000, 123456789)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid,
			ModTime: mtime, Devmajor: e.major, Devminor: 3, Format: tar.FormatPAX}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		for k, v := range e.xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// writeSourceLayout writes an OCI layout holding an image of the given uncompressed layers (stored gzip'd).
func writeSourceLayout(t testing.TB, dir string, layers [][]byte) image.Ref {
	t.Helper()
	lay, err := image.CreateLayout(dir)
	if err != nil {
		t.Fatal(err)
	}
	var cfg ocispec.Image
	cfg.Config.Cmd = []string{"/bin/true"}
	if _, err := lay.WriteImage("src", layers, "", cfg); err != nil {
		t.Fatal(err)
	}
	return image.Ref{Transport: image.TransportOCI, Path: dir, Tag: "src"}
}

// storeResult writes a conversion result into an OCI layout under tag and returns its reference.
func storeResult(t testing.TB, res *Result, dir, tag string) image.Ref {
	t.Helper()
	lay, err := image.CreateLayout(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range append(res.Targets, res.Blobs...) {
		if err := lay.PutBlobFile(b.Path, b.Desc.Digest, b.Desc.Size); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := lay.PutBlobBytes(res.ConfigDesc.MediaType, res.Config); err != nil {
		t.Fatal(err)
	}
	if _, err := lay.PutBlobBytes(res.ManifestDesc.MediaType, res.Manifest); err != nil {
		t.Fatal(err)
	}
	if err := lay.Tag(tag, res.ManifestDesc); err != nil {
		t.Fatal(err)
	}
	return image.Ref{Transport: image.TransportOCI, Path: dir, Tag: tag}
}

// everyCase is a three-layer image exercising the tar semantics a converter must keep.
func everyCase(t testing.TB) [][]byte {
	big := strings.Repeat("0123456789abcdef", 1<<16) // 1 MiB, several extents of data
	l1 := layerTar(t, []tarEntry{
		{name: "bin/", typ: tar.TypeDir, mode: 0o755},
		{name: "bin/ping", typ: tar.TypeReg, body: "\x7fELF ping", mode: 0o4755, xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}},
		{name: "etc/", typ: tar.TypeDir, mode: 0o755},
		{name: "etc/passwd", typ: tar.TypeReg, body: "root:x:0:0::/root:/bin/sh\n"},
		{name: "etc/old/", typ: tar.TypeDir, mode: 0o700},
		{name: "etc/old/a", typ: tar.TypeReg, body: "a"},
		{name: "tmp/", typ: tar.TypeDir, mode: 0o1777},
		{name: "data/big", typ: tar.TypeReg, body: big, uid: 1000, gid: 1000},
		{name: "data/hl", typ: tar.TypeLink, link: "data/big"},
		{name: "dev/null", typ: tar.TypeChar, major: 1, mode: 0o666},
		{name: "dev/sda", typ: tar.TypeBlock, major: 8, mode: 0o660},
		{name: "run/fifo", typ: tar.TypeFifo, mode: 0o600},
		{name: "usr/lib/" + strings.Repeat("long-name-", 20), typ: tar.TypeReg, body: "long"},
		{name: "lib", typ: tar.TypeSymlink, link: "usr/lib/" + strings.Repeat("target-", 30)},
		{name: "replace-me-dir", typ: tar.TypeReg, body: "file first"},
		{name: "replace-me-file/", typ: tar.TypeDir, mode: 0o755},
		{name: "replace-me-file/child", typ: tar.TypeReg, body: "c"},
		{name: "acl", typ: tar.TypeReg, body: "x", xattrs: map[string]string{"user.note": "hello", "system.posix_acl_access": "\x02\x00\x00\x00\x01\x00\x06\x00\xff\xff\xff\xff\x02\x00\x06\x00\xe8\x03\x00\x00\x04\x00\x04\x00\xff\xff\xff\xff\x10\x00\x06\x00\xff\xff\xff\xff\x20\x00\x04\x00\xff\xff\xff\xff"}},
	})
	l2 := layerTar(t, []tarEntry{
		{name: "etc/.wh.passwd", typ: tar.TypeReg},
		{name: "etc/old/.wh..wh..opq", typ: tar.TypeReg},
		{name: "etc/old/b", typ: tar.TypeReg, body: "b"},
		{name: "data/hl2", typ: tar.TypeLink, link: "data/big"},
		{name: "replace-me-dir/", typ: tar.TypeDir, mode: 0o750},
		{name: "replace-me-dir/x", typ: tar.TypeReg, body: "x"},
		{name: "replace-me-file", typ: tar.TypeReg, body: "now a file"},
	})
	l3 := layerTar(t, []tarEntry{
		{name: "bin/ping", typ: tar.TypeReg, body: "\x7fELF ping v2", mode: 0o755},
		{name: "etc/passwd", typ: tar.TypeReg, body: "root:x:0:0::/root:/bin/bash\n", mode: 0o600},
	})
	return [][]byte{l1, l2, l3}
}

func convertLayout(t testing.TB, src image.Ref, opts ImageOptions) *Result {
	t.Helper()
	source, err := image.OpenLocalSource(src, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer source.Close()
	if opts.WorkDir == "" {
		opts.WorkDir = t.TempDir()
	}
	res, err := ConvertImage(context.Background(), source, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { res.Cleanup() })
	return res
}

func TestConvertImageLossless(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	testenv.Tools(t, "e2fsck")
	dir := t.TempDir()
	src := writeSourceLayout(t, filepath.Join(dir, "src"), everyCase(t))
	for _, c := range []struct {
		name string
		opts ImageOptions
	}{
		{"mkfs", ImageOptions{VirtualSize: 1 << 30}},
		{"base-layer", ImageOptions{BaseLayer: extractBaseLayer(t)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			res := convertLayout(t, src, c.opts)
			wantLayers := 3
			if c.opts.BaseLayer != "" {
				wantLayers = 4
			}
			if len(res.Blobs) != wantLayers {
				t.Fatalf("%d layer blobs, want %d", len(res.Blobs), wantLayers)
			}
			out := storeResult(t, res, filepath.Join(dir, "out-"+c.name), "obd")
			img, err := image.OpenLocal(out, image.DefaultPlatform())
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			// UUID chaining: each layer's parent is the layer below.
			for i := 1; i < len(img.Layers); i++ {
				lower, upper := layerHeader(t, out, img, i-1), layerHeader(t, out, img, i)
				if upper.ParentUUID != lower.UUID {
					t.Errorf("layer %d parent %s, layer %d uuid %s", i, upper.ParentUUID, i-1, lower.UUID)
				}
			}
			compareWithSource(t, src, img.Stack)
			fsckStack(t, img.Stack)
		})
	}
}

func TestConvertDeterministic(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	src := writeSourceLayout(t, filepath.Join(t.TempDir(), "src"), everyCase(t))
	a := convertLayout(t, src, ImageOptions{VirtualSize: 1 << 30})
	b := convertLayout(t, src, ImageOptions{VirtualSize: 1 << 30, ZFile: zfile.Options{Workers: 4}})
	if a.ManifestDesc.Digest != b.ManifestDesc.Digest {
		for i := range a.Blobs {
			t.Logf("layer %d: %s vs %s", i, a.Blobs[i].Desc.Digest, b.Blobs[i].Desc.Digest)
		}
		t.Fatalf("two conversions of the same image differ: %s vs %s", a.ManifestDesc.Digest, b.ManifestDesc.Digest)
	}
}

func TestConvertBadInput(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	good := everyCase(t)
	cases := map[string]struct {
		mutate func(t *testing.T, dir string, ref image.Ref)
		layers [][]byte
		want   string
	}{
		"path traversal": {layers: [][]byte{layerTar(t, []tarEntry{{name: "../../etc/shadow", typ: tar.TypeReg, body: "x"}})}, want: "escapes the root"},
		"corrupt blob": {layers: good, want: "layer 1", mutate: func(t *testing.T, dir string, ref image.Ref) {
			corruptLayer(t, dir, ref, 1)
		}},
		"diff_id mismatch": {layers: good, want: "diff_id", mutate: func(t *testing.T, dir string, ref image.Ref) {
			rewriteConfig(t, dir, ref, func(cfg *ocispec.Image) { cfg.RootFS.DiffIDs[2] = digest.FromString("other") })
		}},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "src")
			ref := writeSourceLayout(t, dir, c.layers)
			if c.mutate != nil {
				c.mutate(t, dir, ref)
			}
			work := t.TempDir()
			source, err := image.OpenLocalSource(ref, image.DefaultPlatform())
			if err != nil {
				t.Fatal(err)
			}
			defer source.Close()
			_, err = ConvertImage(context.Background(), source, ImageOptions{VirtualSize: 1 << 30, WorkDir: work})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want it to mention %q", err, c.want)
			}
			if left, _ := os.ReadDir(work); len(left) != 0 {
				t.Errorf("work files left behind: %v", left)
			}
		})
	}
}

// corruptLayer flips a byte in the middle of layer i's blob.
func corruptLayer(t *testing.T, dir string, ref image.Ref, i int) {
	lay, _ := image.OpenLayout(dir)
	d, _ := lay.Resolve(ref)
	m, _, err := lay.Manifest(d, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	p := lay.BlobPath(m.Layers[i].Digest)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	os.Chmod(p, 0o644)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// rewriteConfig edits the image config and re-tags a manifest pointing at it.
func rewriteConfig(t *testing.T, dir string, ref image.Ref, edit func(*ocispec.Image)) {
	lay, _ := image.OpenLayout(dir)
	d, _ := lay.Resolve(ref)
	m, _, err := lay.Manifest(d, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	cb, err := lay.ReadBlob(m.Config)
	if err != nil {
		t.Fatal(err)
	}
	var cfg ocispec.Image
	json.Unmarshal(cb, &cfg)
	edit(&cfg)
	cb, _ = json.Marshal(cfg)
	if m.Config, err = lay.PutBlobBytes(ocispec.MediaTypeImageConfig, cb); err != nil {
		t.Fatal(err)
	}
	mb, _ := json.Marshal(m)
	md, err := lay.PutBlobBytes(ocispec.MediaTypeImageManifest, mb)
	if err != nil {
		t.Fatal(err)
	}
	if err := lay.Tag(ref.Tag, md); err != nil {
		t.Fatal(err)
	}
}

func layerHeader(t *testing.T, ref image.Ref, img *image.Local, i int) lsmt.Header {
	t.Helper()
	lay, _ := image.OpenLayout(ref.Path)
	f, err := lay.OpenBlob(img.Layers[i].Descriptor)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	l, err := image.OpenLayerBlob(f, img.Layers[i].BlobSize, true)
	if err != nil {
		t.Fatal(err)
	}
	return l.Header()
}

// extractBaseLayer unpacks upstream's ext4_64 base layer from the repository's test data.
func extractBaseLayer(t testing.TB) string {
	t.Helper()
	b := testenv.TarGzFile(t, "../../testdata/upstream/ext4_64.tar.gz", "ext4_64")
	if got := digest.FromBytes(b).Encoded(); got != "c3a417552a6cf9ffa959b541850bab7d7f08f4255425bf8b48c85f7b36b378d9" {
		t.Fatalf("ext4_64 sha256 %s", got)
	}
	p := filepath.Join(t.TempDir(), "ext4_64")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// compareWithSource checks that the converted stack holds exactly the files of the source image (mkfs's
// /lost+found aside), reporting every difference, and returns the source's tree.
func compareWithSource(t *testing.T, src image.Ref, stack *lsmt.Stack) verify.Tree {
	t.Helper()
	source, err := image.OpenLocalSource(src, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer source.Close()
	want, err := verify.FromSource(context.Background(), source)
	if err != nil {
		t.Fatal(err)
	}
	got, err := verify.FromStack(stack)
	if err != nil {
		t.Fatal(err)
	}
	diffs := verify.Compare(want, got, verify.Options{IgnoreExtra: []string{"/lost+found"}})
	for _, d := range diffs {
		t.Error(d)
	}
	if len(diffs) > 0 {
		t.Fatalf("%d differences between the source and the converted image", len(diffs))
	}
	return want
}

// fsckStack exports the stack's disk to a raw file, checks it with e2fsck -fn and returns its path.
func fsckStack(t *testing.T, stack *lsmt.Stack) string {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "disk.img")
	exportRaw(t, stack, raw)
	testenv.Fsck(t, raw)
	return raw
}

func exportRaw(t testing.TB, s *lsmt.Stack, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(s.VirtualSize()); err != nil {
		t.Fatal(err)
	}
	if _, err := image.ExportRaw(context.Background(), s, f, nil); err != nil {
		t.Fatal(err)
	}
}
