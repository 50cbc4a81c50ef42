package convert

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/testenv"
)

const helloLayout = "../../testdata/upstream/hello-world-oci"

func TestJobAllPlatforms(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "out")
	src := image.Ref{Transport: image.TransportOCI, Path: helloLayout, Tag: "docker-list"}
	dst := image.Ref{Transport: image.TransportOCI, Path: dir, Tag: "all"}
	var log bytes.Buffer
	all := &Job{Src: src, Dst: dst, Tag: "all", AllPlatforms: true, Options: ImageOptions{VirtualSize: 1 << 30, WorkDir: t.TempDir()}, Log: &log}
	res, err := all.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	lay, err := image.OpenLayout(helloLayout)
	if err != nil {
		t.Fatal(err)
	}
	srcTop, sb, err := lay.Top(src)
	if err != nil {
		t.Fatal(err)
	}
	srcIdx, err := image.ParseIndex(sb)
	if err != nil {
		t.Fatal(err)
	}
	// A Docker manifest list like its source, one converted image per platform, in the source's order.
	out, err := image.OpenLayout(dir)
	if err != nil {
		t.Fatal(err)
	}
	top, ib, err := out.Top(dst)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := image.ParseIndex(ib)
	if err != nil {
		t.Fatal(err)
	}
	if top.Digest != res.Top.Digest || top.MediaType != image.MediaTypeDockerManifestList || srcTop.MediaType != image.MediaTypeDockerManifestList {
		t.Fatalf("tag all: %+v, the job says %+v; want a Docker manifest list", top, res.Top)
	}
	if len(idx.Manifests) != len(srcIdx.Manifests) || len(res.Images) != len(idx.Manifests) {
		t.Fatalf("%d entries, %d images converted, source %d:\n%s", len(idx.Manifests), len(res.Images), len(srcIdx.Manifests), log.String())
	}
	for i, d := range idx.Manifests {
		want := srcIdx.Manifests[i].Platform
		if d.Platform == nil || d.Platform.OS != want.OS || d.Platform.Variant != want.Variant || d.Platform.Architecture != want.Architecture ||
			d.Digest.String() != res.Images[i].Manifest || res.Images[i].Platform == nil {
			t.Errorf("entry %d: %+v (%s), want platform %+v and the job's manifest %s", i, d.Platform, d.Digest, want, res.Images[i].Manifest)
		}
	}
	if !strings.Contains(log.String(), "platform linux/amd64 (1/") || !strings.Contains(log.String(), "linux/amd64: layer 1/1: applied") {
		t.Errorf("log does not say which platform is converted:\n%s", log.String())
	}
	// The amd64 entry is what a conversion of the amd64 image alone makes.
	single := &Job{Src: src, Dst: image.Ref{Transport: image.TransportOCI, Path: dir, Tag: "amd64"}, Tag: "amd64",
		Platform: image.Platform{OS: "linux", Architecture: "amd64"}, Options: ImageOptions{VirtualSize: 1 << 30, WorkDir: t.TempDir()}}
	one, err := single.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(one.Images) != 1 || one.Images[0].Platform != nil || one.Top.Digest != idx.Manifests[0].Digest {
		t.Errorf("single conversion %+v, want the index's amd64 entry %s", one, idx.Manifests[0].Digest)
	}
}

func TestSkipReason(t *testing.T) {
	linux := &ocispec.Platform{OS: "linux", Architecture: "amd64"}
	for _, c := range []struct {
		d    ocispec.Descriptor
		want string
	}{
		{ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Platform: linux}, ""},
		{ocispec.Descriptor{MediaType: image.MediaTypeDockerManifest, Platform: linux}, ""},
		{ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Platform: linux, Annotations: map[string]string{"vnd.docker.reference.type": "attestation-manifest"}}, "attestation-manifest (not an image)"},
		{ocispec.Descriptor{MediaType: ocispec.MediaTypeImageIndex, Platform: linux}, "not an image manifest"},
		{ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest}, "no platform"},
		{ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Platform: &ocispec.Platform{OS: "unknown", Architecture: "unknown"}}, "no platform"},
	} {
		if got := skipReason(c.d); c.want == "" && got != "" || !strings.Contains(got, c.want) {
			t.Errorf("skipReason(%+v) = %q, want %q", c.d, got, c.want)
		}
	}
}
