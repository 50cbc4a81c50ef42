package e2e

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/sandbox"
	"github.com/obdproject/obd/internal/status"
)

// obdCache runs 'obd cache ...' against a sandbox's daemon and containerd.
func obdCache(t *testing.T, sb *sandbox.Sandbox, args ...string) (string, error) {
	t.Helper()
	args = append([]string{"cache"}, args...)
	args = append(args, "--socket", sb.StatusSocket)
	if args[1] != "ls" {
		args = append(args, "--address", sb.Containerd, "--namespace", sb.Namespace)
	}
	out, err := exec.Command(bins.obd, args...).CombinedOutput()
	return string(out), err
}

func mustCache(t *testing.T, sb *sandbox.Sandbox, args ...string) string {
	t.Helper()
	out, err := obdCache(t, sb, args...)
	if err != nil {
		t.Fatalf("obd cache %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// Node A warms an image's cache and exports it to the registry and to a file; node B, a fresh root, imports it and
// starts a container of the image without reading the registry; a damaged snapshot loses only its bad blocks.
func TestCacheLifecycle(t *testing.T) {
	a := startSandbox(t)
	ctx := context.Background()
	lazy := convertedApp(t, a)
	m := manifestOf(t, lazy)
	obd(t, a, "pull", lazy)

	a.ResetCounters()
	t.Log(mustCache(t, a, "warm", lazy, "--all"))
	var total int64
	for _, l := range m.Layers {
		total += l.Size
		if n := a.BlobBytes()[l.Digest.String()]; n != l.Size {
			t.Errorf("warm --all fetched %d of %d bytes of layer %s", n, l.Size, l.Digest)
		}
	}
	a.ResetCounters()
	if out := mustCache(t, a, "warm", lazy, "--all"); !strings.Contains(out, "3 of 3 blobs verified") {
		t.Errorf("second warm: %s", out)
	}
	if n := sumBytes(a.BlobBytes()); n != 0 {
		t.Errorf("a second warm fetched %d bytes", n)
	}
	var blobs []status.CacheBlob
	if err := json.Unmarshal([]byte(mustCache(t, a, "ls", "--json")), &blobs); err != nil {
		t.Fatal(err)
	}
	if len(blobs) != 3 {
		t.Fatalf("cache ls: %+v", blobs)
	}
	for _, b := range blobs {
		if b.CachedBytes != b.Size || b.Blocks != b.TotalBlocks {
			t.Errorf("blob %s after warm --all: %+v", b.Digest, b)
		}
	}

	snapRef := a.Registry + "/cache:app"
	t.Log(mustCache(t, a, "export", lazy, "--to", snapRef))
	file := filepath.Join(t.TempDir(), "app.tar")
	t.Log(mustCache(t, a, "export", "--to", file))

	b := startSandbox(t)
	obd(t, b, "pull", lazy) // from node A's registry: its blobs stay there
	out := mustCache(t, b, "import", snapRef)
	if !strings.Contains(out, "3 blobs complete and verified") {
		t.Fatalf("import: %s", out)
	}
	a.ResetCounters()
	if out := run(t, b.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", lazy, "imported1", "/bin/sh", "/app/run.sh")); out != appOutput {
		t.Fatalf("container printed %q, want %q", out, appOutput)
	}
	for _, l := range m.Layers {
		if n := a.BlobBytes()[l.Digest.String()]; n != 0 {
			t.Errorf("a container on the node that imported the cache read %d bytes of layer %s from the registry", n, l.Digest)
		}
	}

	// Evict on B, then import the file with one byte flipped in its last data blob: that block is dropped (and
	// its blob not verified), the others load.
	if out := mustCache(t, b, "evict", lazy); !strings.Contains(out, "evicted 3 blobs") {
		t.Fatalf("evict: %s", out)
	}
	snap, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	snap[len(snap)-1024-600] ^= 1 // inside the last member's data (a tar ends with two zero blocks and padding)
	bad := filepath.Join(t.TempDir(), "bad.tar")
	if err := os.WriteFile(bad, snap, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = obdCache(t, b, "import", bad)
	if err == nil || !strings.Contains(out, "dropped") {
		t.Fatalf("import of a damaged snapshot: %v\n%s", err, out)
	}
	t.Log(out)
	if out := mustCache(t, b, "prune"); !strings.Contains(out, "pruned 0 blobs") {
		t.Errorf("prune with the image present: %s", out)
	}
	run(t, b.Ctr(ctx, "images", "rm", lazy))
	// containerd's garbage collection removes the image's snapshots, and with them its device, shortly after.
	waitStatus(t, b, "without images", func(st *status.Status) bool { return len(st.Images) == 0 })
	if out := mustCache(t, b, "prune"); strings.Contains(out, "pruned 0 blobs") {
		t.Errorf("prune after the image was removed: %s", out)
	}
}
