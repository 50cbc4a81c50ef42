package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
)

// TestErofs converts an image to erofs layers ('obd convert --fstype erofs'), pulls it lazily and runs a
// container: the snapshotter mounts the image as erofs (its layers say blob-fs-type erofs; as ext4 it would not
// mount), and the 32 MiB of random data the app does not read are never fetched. A recorded start of it replays.
func TestErofs(t *testing.T) {
	sb := startSandbox(t)
	ctx := context.Background()
	src := filepath.Join(t.TempDir(), "src")
	appImage(t, src)
	plain := sb.Registry + "/app:v1"
	pushLayout(t, src, "v1", plain)
	dst := sb.Registry + "/app:erofs"
	t.Logf("convert: %s", obd(t, sb, "convert", "--fstype", "erofs", "--vsize", "8", plain, dst))
	c, err := registry.New(registry.Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	m := registryManifest(t, c, dst)
	var total int64
	for i, l := range m.Layers {
		total += l.Size
		if l.Annotations[image.AnnotationFsType] != "erofs" {
			t.Errorf("layer %d annotations %v", i, l.Annotations)
		}
	}
	if out := obd(t, sb, "pull", dst); !strings.Contains(out, "3 layers, 3 lazy") {
		t.Fatalf("pull: %s", out)
	}
	sb.ResetCounters()
	if got := run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", dst, "erofs1", "/bin/sh", "/app/run.sh")); got != appOutput {
		t.Fatalf("container printed %q, want %q", got, appOutput)
	}
	var fetched int64
	for _, l := range m.Layers {
		fetched += sb.BlobBytes()[l.Digest.String()]
	}
	t.Logf("container fetched %d of %d layer bytes", fetched, total)
	if fetched == 0 || fetched > total/2 {
		t.Errorf("fetched %d of %d bytes: want a fraction", fetched, total)
	}

	// A start recorded on the erofs image is replayed on a cold node: traces are of the disk's blocks, whatever its
	// filesystem.
	t.Run("profile and replay", func(t *testing.T) {
		coldNode(t, sb)
		out := obd(t, sb, "profile", dst, "--address", sb.Containerd, "--namespace", sb.Namespace, "--config", sb.ConfigFile(),
			"--ready-line", "script from layer 3", "--", "/bin/sh", "/app/run.sh")
		accel := sb.Registry + "/app:erofs-accel"
		if !strings.Contains(out, "pushed "+accel) {
			t.Fatalf("obd profile: %s", out)
		}
		coldNode(t, sb)
		obd(t, sb, "pull", accel)
		replay(t, sb, accel, "erofs-replay")
	})
}
