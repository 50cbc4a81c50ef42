package snapshotter

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	digest "github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/testenv"
)

func TestStatusModes(t *testing.T) {
	testenv.Root(t) // the fake mounter mounts tmpfs; Prepare over normal layers is fine without root
	ctx, sn, _, _ := newTestSnapshotter(t)

	if st, err := sn.Status(ctx); err != nil || len(st) != 0 {
		t.Fatalf("empty snapshotter: %+v, %v", st, err)
	}

	// A lazily pulled two-layer image with two containers.
	pullRemote(t, ctx, sn, "R0", "", "registry.test/app:v1")
	pullRemote(t, ctx, sn, "R1", "R0", "registry.test/app:v1")
	for _, key := range []string{"c1", "c2"} {
		if _, err := sn.Prepare(ctx, key, "R1"); err != nil {
			t.Fatal(err)
		}
	}

	// A fully downloaded overlaybd layer: no image reference at pull.
	labels := remoteLabels("D0", digest.FromString("D0"), 108, "")
	delete(labels, LabelImageRef)
	ms, err := sn.Prepare(ctx, "extract-D0", "", snapshots.WithLabels(labels))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ms[0].Source, commitFile), []byte("ZFile\x00\x01\x00"+strings.Repeat("z", 100)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "D0", "extract-D0", snapshots.WithLabels(labels)); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.View(ctx, "v1", "D0"); err != nil {
		t.Fatal(err)
	}

	// A normal image.
	if _, err := sn.Prepare(ctx, "n-extract", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "N0", "n-extract"); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.Prepare(ctx, "c3", "N0"); err != nil {
		t.Fatal(err)
	}

	st, err := sn.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	byMode := map[string]ImageStatus{}
	for _, s := range st {
		byMode[s.Mode] = s
	}
	if len(st) != 3 {
		t.Fatalf("status %+v: want three images", st)
	}
	lazy := byMode[ModeLazy]
	if lazy.ImageRef != "registry.test/app:v1" || len(lazy.Layers) != 2 || lazy.MountID == "" ||
		strings.Join(lazy.Snapshots, ",") != "c1,c2" || !strings.Contains(lazy.Reason, "on demand") {
		t.Errorf("lazy image: %+v", lazy)
	}
	local := byMode[ModeLocal]
	if local.MountID == "" || strings.Join(local.Snapshots, ",") != "v1" ||
		!strings.Contains(local.Reason, "no image reference") || !strings.Contains(local.Reason, "obd pull") {
		t.Errorf("downloaded image: %+v; want a reason naming the missing image reference and the fix", local)
	}
	normal := byMode[ModeOverlayfs]
	if normal.Parent != "N0" || normal.MountID != "" || strings.Join(normal.Snapshots, ",") != "c3" ||
		!strings.Contains(normal.Reason, "obd convert") {
		t.Errorf("normal image: %+v", normal)
	}
}

func TestDownloadReason(t *testing.T) {
	for _, tc := range []struct {
		labels map[string]string
		want   string
	}{
		{map[string]string{LabelDownloadBlob: "download", LabelImageRef: "r"}, "full download"},
		{map[string]string{}, "no image reference"},
		{map[string]string{LabelCRIImageRef: "r"}, "containerd downloaded"},
	} {
		if got := downloadReason(tc.labels); !strings.Contains(got, tc.want) {
			t.Errorf("downloadReason(%v) = %q, want it to say %q", tc.labels, got, tc.want)
		}
	}
}
