package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
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

// wantHealth checks the 'cache snapshots' line of obd health on a sandbox.
func wantHealth(t *testing.T, sb *sandbox.Sandbox, level, message string) {
	t.Helper()
	// Other checks look at this machine's containerd and may fail: only the JSON matters.
	out, _ := exec.Command(bins.obd, "health", "--json", "--config", sb.ConfigFile(), "--socket", sb.StatusSocket,
		"--containerd-address", sb.Containerd, "--containerd-config", filepath.Join(sb.Dir, "containerd.toml")).Output()
	var results []struct{ Check, Level, Message string }
	if err := json.Unmarshal(out, &results); err != nil {
		t.Fatalf("obd health --json: %v\n%s", err, out)
	}
	for _, r := range results {
		if r.Check == "cache snapshots" {
			if r.Level != level || !strings.Contains(r.Message, message) {
				t.Errorf("obd health: cache snapshots %s %q, want %s %q", r.Level, r.Message, level, message)
			}
			return
		}
	}
	t.Errorf("obd health has no cache snapshots check: %s", out)
}

// Node A warms an image's cache and exports it to the registry and to a file; node B, a fresh root, imports it and
// starts a container of the image without reading the registry; a damaged snapshot loses only its bad blocks.
func TestCacheLifecycle(t *testing.T) {
	a := startSandbox(t)
	ctx := context.Background()
	lazy := convertedApp(t, a)
	m := manifestOf(t, lazy)
	a.ResetCounters()
	obd(t, a, "pull", lazy)
	t.Log(mustCache(t, a, "warm", lazy, "--all"))
	var total int64
	for _, l := range m.Layers {
		total += l.Size
		// The pull opened the layers (headers and indexes), the warm fetched the rest: no byte twice.
		if n := a.BlobBytes()[l.Digest.String()]; n != l.Size {
			t.Errorf("pull and warm --all fetched %d of %d bytes of layer %s", n, l.Size, l.Digest)
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

	// The app runs once on node A, which learns its start: the snapshot carries it, and node B decodes that start's
	// blocks ahead of its first container's reads.
	if out := run(t, a.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", lazy, "learn1", "/bin/sh", "/app/run.sh")); out != appOutput {
		t.Fatalf("app on node A printed %q, want %q", out, appOutput)
	}
	snapRef := a.Registry + "/cache:app"
	t.Log(mustCache(t, a, "export", lazy, "--to", snapRef))
	file := filepath.Join(t.TempDir(), "app.tar")
	t.Log(mustCache(t, a, "export", "--to", file))

	b := startSandbox(t)
	obd(t, b, "pull", lazy) // from node A's registry: its blobs stay there
	// 'obd install --cache-from' on node B: its obd.toml and containerd config are in place already, so it changes
	// nothing but the cache.
	out := obd(t, b, "install", "--systemd", "no", "--obd-config", b.ConfigFile(), "--containerd-config",
		filepath.Join(b.Dir, "containerd.toml"), "--cache-from", snapRef)
	if !strings.Contains(out, "3 blobs complete and verified") {
		t.Fatalf("install --cache-from: %s", out)
	}
	wantHealth(t, b, "OK", "1 imported, every blob cached and a layer of an image on this node")

	// The registry goes down: the container starts from the imported cache and asks the registry nothing.
	a.SetRegistryDown(true)
	ran, err := b.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", lazy, "imported1", "/bin/sh", "/app/run.sh").CombinedOutput()
	refused := a.SetRegistryDown(false)
	if err != nil || string(ran) != appOutput {
		t.Fatalf("container with the registry down printed %q (%v), want %q", ran, err, appOutput)
	}
	if refused != 0 {
		t.Errorf("a container on the node that imported the cache sent %d requests to the registry, which was down", refused)
	}
	// The import decoded the start learned on node A (the pull came before it: nothing to decode on the attach),
	// and the container's start took those blocks.
	if !strings.Contains(b.Log("snapshotter"), "decoded the blocks of an imported start") {
		t.Error("node B did not decode the start learned on node A when it imported the snapshot")
	}
	if !regexp.MustCompile(`decoded the blocks of the image's start ahead of its reads" image=\S+ blocks=\d+ loaded=[1-9]`).MatchString(b.Log("snapshotter")) {
		t.Error("node B's container did not find the start learned on node A decoded")
	}
	// ... and read that start's files into the page cache while the container was being created.
	if !regexp.MustCompile(`primed the page cache with the image's start" image=\S+ files=[1-9]`).MatchString(b.Log("snapshotter")) {
		t.Error("node B did not prime the page cache with the start learned on node A")
	}
	if resp, err := http.Get("http://" + b.Metrics + "/metrics"); err != nil {
		t.Error(err)
	} else {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		metrics := parseMetrics(string(body))
		if n := metrics["obd_predecoded_blocks_total"]; n <= 0 {
			t.Errorf("node B's obd_predecoded_blocks_total = %v, want > 0", n)
		}
		if n := metrics[`obd_primed_bytes_total{kind="file"}`]; n <= 0 {
			t.Errorf(`node B's obd_primed_bytes_total{kind="file"} = %v, want > 0`, n)
		}
	}

	// Evict on B, then import the file with one byte flipped in its last data blob: that block is dropped (and
	// its blob not verified), the others load.
	if out := mustCache(t, b, "evict", lazy); !strings.Contains(out, "evicted 3 blobs") {
		t.Fatalf("evict: %s", out)
	}
	wantHealth(t, b, "WARN", "evicted since: "+snapRef+" (3 of 3 blobs)")
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
	wantHealth(t, b, "WARN", snapRef+" (3 of 3 blobs)")
	if out := mustCache(t, b, "prune"); strings.Contains(out, "pruned 0 blobs") {
		t.Errorf("prune after the image was removed: %s", out)
	}
}
