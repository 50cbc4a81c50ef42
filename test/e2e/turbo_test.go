package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/status"
)

// TestTurboOCI converts an image to TurboOCI ('obd convert --turbo') into its own repository and into another, pulls
// it lazily and runs a container: the files' data come from the original gzip layers by range, through the gzip
// index, and most of the original bytes are never fetched. As a referrer of the original tag, 'obd pull' finds it.
func TestTurboOCI(t *testing.T) {
	sb := startSandbox(t)
	ctx := context.Background()
	src := filepath.Join(t.TempDir(), "src")
	appImage(t, src)
	plain := sb.Registry + "/app:v1"
	pushLayout(t, src, "v1", plain)
	c, err := registry.New(registry.Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	orig := registryManifest(t, c, plain)
	var origBytes int64
	for _, l := range orig.Layers {
		origBytes += l.Size
	}

	turbo := sb.Registry + "/app:turbo"
	out := obd(t, sb, "convert", "--turbo", "--vsize", "8", plain, turbo)
	t.Logf("convert: %s", out)
	m := registryManifest(t, c, turbo)
	var added int64
	for i, l := range m.Layers {
		added += l.Size
		if l.Annotations[image.AnnotationTurboTarget] != orig.Layers[i].Digest.String() || l.Annotations[image.AnnotationVersion] != image.TurboVersion {
			t.Errorf("layer %d annotations %v", i, l.Annotations)
		}
	}
	t.Logf("TurboOCI layers: %d bytes beside %d bytes of original layers", added, origBytes)
	if out := obd(t, sb, "pull", turbo); !strings.Contains(out, "3 layers, 3 lazy") {
		t.Fatalf("pull: %s", out)
	}
	// The original layers are read: layer 2's 32 MiB of random data never.
	runAppLazily(t, sb, turbo, "turbo1", orig.Layers)

	// A recorded start of the TurboOCI image is replayed on a cold node: its trace's ranges of the original tars map
	// to ranges of the gzip blobs, prefetched before the app runs, which then fetches nothing.
	t.Run("profile and replay", func(t *testing.T) { profileAppAndReplay(t, sb, turbo, "turbo-accel", "turbo-replay") })

	// With the background download, the original blobs come whole into the cache and are verified against their
	// digests; the registry can then go away and every file still reads.
	t.Run("background download", func(t *testing.T) {
		sb.SetSnapshotterConfig("[download]\nenable = true\ndelay = 0\nmax_mbps = 0\n")
		defer sb.SetSnapshotterConfig("")
		coldNode(t, sb)
		// A container that keeps the image attached while its blobs download.
		if out, err := sb.Ctr(ctx, "run", "-d", "--snapshotter", "overlaybd", turbo, "turbo-hold", "/bin/busybox", "sleep", "600").CombinedOutput(); err != nil {
			t.Fatalf("ctr run -d: %v\n%s", err, out)
		}
		defer func() {
			sb.Ctr(ctx, "task", "kill", "-s", "KILL", "turbo-hold").Run()
			for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
				if sb.Ctr(ctx, "task", "delete", "turbo-hold").Run() == nil {
					break
				}
			}
			sb.Ctr(ctx, "container", "delete", "turbo-hold").Run()
		}()
		waitStatus(t, sb, "the originals downloaded and verified", func(st *status.Status) bool {
			n := 0
			for _, im := range st.Images {
				for _, l := range im.Layers {
					if l.Download != "verified" {
						return false
					}
					n++
				}
			}
			return n == len(orig.Layers)
		})
		sb.SetRegistryDown(true)
		got := run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", turbo, "turbo-offline", "/bin/sh", "-c",
			"cat /app/big.bin /bin/busybox >/dev/null && /bin/sh /app/run.sh"))
		if refused := sb.SetRegistryDown(false); refused != 0 {
			t.Errorf("%d requests went to the registry after the download", refused)
		}
		if got != appOutput {
			t.Fatalf("container with the registry down printed %q, want %q", got, appOutput)
		}
	})

	t.Run("other repository", func(t *testing.T) {
		// The originals are pushed (mounted) with the image: the repository serves them.
		dst := sb.Registry + "/elsewhere:turbo"
		obd(t, sb, "convert", "--turbo", "--vsize", "8", plain, dst)
		for _, l := range orig.Layers {
			if _, err := c.Blob(ctx, sb.Registry, "elsewhere", l.Digest, -1); err != nil {
				t.Errorf("original layer %s: %v", l.Digest, err)
			}
		}
	})

	t.Run("referrer", func(t *testing.T) {
		withRef := sb.Registry + "/reffed:v1"
		pushLayout(t, src, "v1", withRef)
		obd(t, sb, "convert", "--turbo", "--vsize", "8", "--referrer", withRef, sb.Registry+"/reffed")
		out := obd(t, sb, "pull", withRef)
		if !strings.Contains(out, "its overlaybd referrer sha256:") || !strings.Contains(out, "3 layers, 3 lazy") {
			t.Fatalf("pull of a tag with a TurboOCI referrer: %s", out)
		}
		if got := run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", withRef, "turbo-ref", "/bin/sh", "/app/run.sh")); got != appOutput {
			t.Errorf("container printed %q, want %q", got, appOutput)
		}
	})
}
