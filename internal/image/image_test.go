package image

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

const helloLayout = "../../testdata/upstream/hello-world-oci"

func TestParseRef(t *testing.T) {
	dg := "sha256:" + strings.Repeat("ab", 32)
	good := map[string]Ref{
		"oci:/tmp/x":                       {Transport: TransportOCI, Path: "/tmp/x", Tag: "latest"},
		"oci:dir:v1":                       {Transport: TransportOCI, Path: "dir", Tag: "v1"},
		"oci:./a/b:amd64-converted":        {Transport: TransportOCI, Path: "./a/b", Tag: "amd64-converted"},
		"oci:dir:@" + dg:                   {Transport: TransportOCI, Path: "dir", Digest: digest.Digest(dg)},
		"docker-archive:img.tar":           {Transport: TransportDockerArchive, Path: "img.tar"},
		"localhost:5000/app:v2":            {Transport: TransportRegistry, Name: "localhost:5000/app", Tag: "v2"},
		"registry.local/ns/app":            {Transport: TransportRegistry, Name: "registry.local/ns/app", Tag: "latest"},
		"127.0.0.1:5000/a@" + dg:           {Transport: TransportRegistry, Name: "127.0.0.1:5000/a", Digest: digest.Digest(dg)},
		"localhost/app:1.0-rc_1":           {Transport: TransportRegistry, Name: "localhost/app", Tag: "1.0-rc_1"},
		"oci:/srv/layouts/with:colon/x:v3": {Transport: TransportOCI, Path: "/srv/layouts/with:colon/x", Tag: "v3"},
	}
	for s, want := range good {
		got, err := ParseRef(s)
		if err != nil {
			t.Errorf("ParseRef(%q): %v", s, err)
			continue
		}
		if got != want {
			t.Errorf("ParseRef(%q) = %+v, want %+v", s, got, want)
		}
		again, err := ParseRef(got.String())
		if err != nil || again != got {
			t.Errorf("ParseRef(%q.String() = %q) = %+v, %v", s, got.String(), again, err)
		}
	}
	bad := map[string]string{
		"":                         "empty",
		"oci:":                     "missing path",
		"ubuntu":                   "want HOST",
		"docker.io/Library/ubuntu": "lowercase",
		"localhost/app:bad!tag":    "invalid tag",
		"localhost/app@sha256:zz":  "invalid",
		"oci:dir:@sha256:1":        "invalid",
	}
	for s, want := range bad {
		if _, err := ParseRef(s); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseRef(%q) err = %v, want %q", s, err, want)
		}
	}
}

func TestLayoutResolve(t *testing.T) {
	lay, err := OpenLayout(helloLayout)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		tag      string
		platform Platform
		digest   string
		layers   int
		overlay  bool
	}{
		{"amd64-converted", DefaultPlatform(), "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88", 1, true},
		{"amd64", DefaultPlatform(), "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3", 1, false},
		{"docker-list", Platform{OS: "linux", Architecture: "arm64"}, "", 1, false},
		{"docker-list", Platform{OS: "linux", Architecture: "s390x"}, "sha256:574efe68740d3bee2ef780036aee2e2da5cf7097ac06513f9f01f41e03365399", 1, false},
	}
	for _, c := range cases {
		d, err := lay.Resolve(Ref{Transport: TransportOCI, Path: helloLayout, Tag: c.tag})
		if err != nil {
			t.Fatalf("%s: %v", c.tag, err)
		}
		m, md, err := lay.Manifest(d, c.platform)
		if err != nil {
			t.Fatalf("%s %s: %v", c.tag, c.platform, err)
		}
		if c.digest != "" && md.Digest.String() != c.digest {
			t.Errorf("%s %s: manifest %s, want %s", c.tag, c.platform, md.Digest, c.digest)
		}
		if len(m.Layers) != c.layers {
			t.Errorf("%s: %d layers", c.tag, len(m.Layers))
		}
		bl, err := BlockLayers(m)
		if c.overlay {
			if err != nil || len(bl) != 1 || bl[0].BlobSize != 642560 {
				t.Errorf("%s: BlockLayers = %+v, %v", c.tag, bl, err)
			}
		} else if !errors.Is(err, ErrNotOverlaybd) {
			t.Errorf("%s: BlockLayers err = %v, want ErrNotOverlaybd", c.tag, err)
		}
	}
	if _, err := lay.Resolve(Ref{Tag: "nope"}); err == nil || !strings.Contains(err.Error(), "amd64-converted") {
		t.Errorf("unknown tag: %v (should list the tags)", err)
	}
	d, _ := lay.Resolve(Ref{Tag: "docker-list"})
	if _, _, err := lay.Manifest(d, Platform{OS: "plan9", Architecture: "amd64"}); err == nil || !strings.Contains(err.Error(), "linux/arm64") {
		t.Errorf("unknown platform: %v (should list the platforms)", err)
	}
}

func TestOpenLocalHelloWorld(t *testing.T) {
	ref, _ := ParseRef("oci:" + helloLayout + ":amd64-converted")
	img, err := OpenLocal(ref, DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if img.Stack.VirtualSize() != 64<<30 {
		t.Fatalf("virtual size %d", img.Stack.VirtualSize())
	}
	// ext4 superblock magic 0xEF53 at byte 1024+56.
	sb := make([]byte, 2)
	if _, err := img.Stack.ReadAt(sb, 1024+56); err != nil || sb[0] != 0x53 || sb[1] != 0xef {
		t.Fatalf("ext4 magic %x, %v", sb, err)
	}
	ref.Tag = "amd64"
	if _, err := OpenLocal(ref, DefaultPlatform()); !errors.Is(err, ErrNotOverlaybd) {
		t.Fatalf("original image: %v, want ErrNotOverlaybd", err)
	}
}

func TestReadBlobChecksDigest(t *testing.T) {
	dir := t.TempDir()
	lay, err := CreateLayout(dir)
	if err != nil {
		t.Fatal(err)
	}
	d, err := lay.PutBlobBytes(ocispec.MediaTypeImageConfig, []byte(`{"a":1}`))
	if err != nil {
		t.Fatal(err)
	}
	if b, err := lay.ReadBlob(d); err != nil || string(b) != `{"a":1}` {
		t.Fatalf("ReadBlob: %q %v", b, err)
	}
	os.Chmod(lay.BlobPath(d.Digest), 0o644)
	os.WriteFile(lay.BlobPath(d.Digest), []byte(`{"a":2}`), 0o644)
	if _, err := lay.ReadBlob(d); err == nil || !strings.Contains(err.Error(), "content digest") {
		t.Fatalf("tampered blob: %v", err)
	}
	if err := lay.Tag("v1", d); err != nil {
		t.Fatal(err)
	}
	if err := lay.Tag("v1", d); err != nil {
		t.Fatal(err)
	}
	idx, err := lay.Index()
	if err != nil || len(idx.Manifests) != 1 {
		t.Fatalf("index after re-tag: %+v %v", idx, err)
	}
	if _, err := OpenLayout(filepath.Join(dir, "missing")); err == nil {
		t.Fatal("OpenLayout of a missing dir succeeded")
	}
}

func FuzzParseManifest(f *testing.F) {
	for _, name := range []string{"42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88", "726023f73a8fc5103fa6776d48090539042cb822531c6b751b1f6dd18cb5705d"} {
		b, err := os.ReadFile(filepath.Join(helloLayout, "blobs/sha256", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if m, err := ParseManifest(b); err == nil {
			BlockLayers(m)
		}
		if idx, err := ParseIndex(b); err == nil {
			SelectPlatform(idx, DefaultPlatform())
		}
	})
}

func FuzzParseRef(f *testing.F) {
	for _, s := range []string{"oci:dir:tag", "localhost:5000/a/b:c", "docker-archive:x.tar", "h.io/r@sha256:" + strings.Repeat("0", 64)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRef(s)
		if err != nil {
			return
		}
		again, err := ParseRef(r.String())
		if err != nil || again != r {
			t.Fatalf("%q → %+v → %q → %+v, %v", s, r, r.String(), again, err)
		}
	})
}

func TestPlatformOrDefault(t *testing.T) {
	if p, err := PlatformOrDefault(""); err != nil || p != DefaultPlatform() {
		t.Errorf("PlatformOrDefault(\"\") = %v, %v", p, err)
	}
	if p, err := PlatformOrDefault("linux/arm64/v8"); err != nil || p != (Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}) {
		t.Errorf("PlatformOrDefault(linux/arm64/v8) = %v, %v", p, err)
	}
	if _, err := PlatformOrDefault("linux"); err == nil {
		t.Error("PlatformOrDefault(linux) succeeded")
	}
}
