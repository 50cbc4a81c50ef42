package e2e

import (
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
	for i, l := range m.Layers {
		if l.Annotations[image.AnnotationFsType] != "erofs" {
			t.Errorf("layer %d annotations %v", i, l.Annotations)
		}
	}
	if out := obd(t, sb, "pull", dst); !strings.Contains(out, "3 layers, 3 lazy") {
		t.Fatalf("pull: %s", out)
	}
	runAppLazily(t, sb, dst, "erofs1", m.Layers)

	// A start recorded on the erofs image is replayed on a cold node: traces are of the disk's blocks, whatever its
	// filesystem.
	t.Run("profile and replay", func(t *testing.T) { profileAppAndReplay(t, sb, dst, "erofs-accel", "erofs-replay") })
}
