package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/profile"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/sandbox"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/internal/testenv"
)

// Record a start with 'obd profile', push the accelerated image, and start it again on a cold node: the recorded
// blocks are fetched as soon as the container's root filesystem is prepared, before its app runs, and the app
// then reads nothing from the registry. The same with the trace installed on the node instead of pushed.
func TestProfileRecordAndReplay(t *testing.T) {
	sb := startSandbox(t)
	ctx := context.Background()
	lazy := convertedApp(t, sb)

	profFile := filepath.Join(t.TempDir(), "profile.json")
	out := obd(t, sb, "profile", lazy, "--address", sb.Containerd, "--namespace", sb.Namespace, "--config", sb.ConfigFile(),
		"--ready-line", "script from layer 3", "--out", profFile, "--", "/bin/sh", "/app/run.sh")
	t.Logf("obd profile:\n%s", out)
	var p profile.Profile
	b, err := os.ReadFile(profFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &p); err != nil {
		t.Fatal(err)
	}
	if p.End != profile.EndReady || len(p.Layers) != 3 || len(p.Reads) == 0 || p.Fetched == nil || p.Fetched.Bytes == 0 || p.ChainID == "" {
		t.Fatalf("profile: %s", b)
	}
	layersRead := map[uint32]bool{}
	for _, r := range p.Reads {
		layersRead[r.Layer] = true
	}
	if len(layersRead) != 3 {
		t.Errorf("the recorded start read layers %v, want all 3 (the app reads a file of each)", layersRead)
	}
	accel := sb.Registry + "/app:obd-accel"
	if !strings.Contains(out, "pushed "+accel) {
		t.Fatalf("obd profile did not push %s", accel)
	}

	t.Run("acceleration layer", func(t *testing.T) {
		coldNode(t, sb)
		obd(t, sb, "pull", accel)
		replay(t, sb, accel, "replay-accel")
	})
	// A node's cache warmed with only the recorded start, exported, and imported on a cold node: the app reads
	// nothing from the registry, and the snapshot holds only the start's blocks.
	t.Run("profile-warm cache snapshot", func(t *testing.T) {
		coldNode(t, sb)
		t.Log(mustCache(t, sb, "warm", lazy, "--profile", profFile))
		snap := filepath.Join(t.TempDir(), "start.tar")
		t.Log(mustCache(t, sb, "export", lazy, "--to", snap))
		var blobs []status.CacheBlob
		if err := json.Unmarshal([]byte(mustCache(t, sb, "ls", "--json")), &blobs); err != nil {
			t.Fatal(err)
		}
		var cached, size int64
		for _, b := range blobs {
			cached, size = cached+b.CachedBytes, size+b.Size
		}
		if cached == 0 || cached >= size {
			t.Errorf("a profile warm cached %d of %d bytes", cached, size)
		}
		coldNode(t, sb)
		t.Log(mustCache(t, sb, "import", snap))
		sb.ResetCounters()
		if out := run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", snapshotter.Name, lazy, "profile-warm", "/bin/sh", "/app/run.sh")); out != appOutput {
			t.Fatalf("container printed %q, want %q", out, appOutput)
		}
		if n := sumBytes(sb.BlobBytes()); n != 0 {
			t.Errorf("the app fetched %d bytes outside the imported start (%d of %d bytes): %v", n, cached, size, sb.BlobBytes())
		}
	})
	t.Run("installed profile", func(t *testing.T) {
		coldNode(t, sb)
		out := obd(t, sb, "profile", lazy, "--address", sb.Containerd, "--namespace", sb.Namespace, "--config", sb.ConfigFile(),
			"--ready-line", "script from layer 3", "--install", "--no-push", "--", "/bin/sh", "/app/run.sh")
		if !strings.Contains(out, "installed on this node") {
			t.Fatalf("obd profile --install printed %q", out)
		}
		coldNode(t, sb)
		replay(t, sb, lazy, "replay-installed")
	})
}

// profileAppAndReplay records the app's start on ref with obd profile, which pushes the acceleration layer as ref's
// repository's tag, then on a cold node pulls that tag and replays the start (replay).
func profileAppAndReplay(t *testing.T, sb *sandbox.Sandbox, ref, tag, id string) {
	t.Helper()
	coldNode(t, sb) // the image's device, attached for an earlier run, is detached
	out := obd(t, sb, "profile", ref, "--address", sb.Containerd, "--namespace", sb.Namespace, "--config", sb.ConfigFile(),
		"--ready-line", "script from layer 3", "--", "/bin/sh", "/app/run.sh")
	accel := sb.Registry + "/app:" + tag
	if !strings.Contains(out, "pushed "+accel) {
		t.Fatalf("obd profile: %s", out)
	}
	coldNode(t, sb)
	obd(t, sb, "pull", accel)
	replay(t, sb, accel, id)
}

// coldNode makes sb a cold node: the daemon restarted with an empty cache once no snapshot uses an image.
func coldNode(t *testing.T, sb *sandbox.Sandbox) {
	t.Helper()
	ctx := context.Background()
	// containerd removes a deleted container's snapshot in its garbage collection, shortly after the delete:
	// wait for it, or the restarted daemon would attach the image again for that snapshot (and start its
	// prefetch before the test looks).
	waitStatus(t, sb, "no snapshot in use", func(st *status.Status) bool {
		for _, im := range st.Images {
			if len(im.Snapshots) > 0 {
				return false
			}
		}
		return true
	})
	if err := sb.KillSnapshotter(); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(sb.CacheDir()); err != nil {
		t.Fatal(err)
	}
	if err := sb.StartSnapshotter(ctx); err != nil {
		t.Fatal(err)
	}
	// containerd redials the proxy plugin with its gRPC backoff.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		out, err := sb.Ctr(ctx, "snapshots", "--snapshotter", snapshotter.Name, "ls").CombinedOutput()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd does not reach the restarted snapshotter: %v\n%s", err, out)
		}
	}
}

// replay prepares a container of ref, waits until the image's recorded start is prefetched, then runs the app and
// checks that it printed the right output and fetched nothing more from the registry.
func replay(t *testing.T, sb *sandbox.Sandbox, ref, id string) {
	t.Helper()
	c, err := client.New(sb.Containerd)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := namespaces.WithNamespace(context.Background(), sb.Namespace)
	img, err := c.GetImage(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	sb.ResetCounters()
	ctr, err := c.NewContainer(ctx, id, client.WithImage(img), client.WithSnapshotter(snapshotter.Name),
		client.WithNewSnapshot(id, img), client.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs("/bin/sh", "/app/run.sh")))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
			t.Errorf("delete container: %v", err)
		}
	}()
	// The prefetch starts when the root filesystem is prepared, before the task exists.
	sc := status.NewClient(sb.StatusSocket, 5*time.Second)
	var pf *status.Prefetch
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		st, err := sc.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, im := range st.Images {
			if im.Prefetch != nil {
				pf = im.Prefetch
			}
		}
		if pf != nil && !pf.Running || time.Now().After(deadline) {
			break
		}
	}
	if pf == nil || pf.Running || pf.Error != "" || pf.DoneRanges != pf.Ranges || pf.Ranges == 0 {
		t.Fatalf("prefetch of the recorded start: %+v", pf)
	}
	prefetched := sumBytes(sb.BlobBytes())
	sb.ResetCounters()

	var out testenv.Buffer
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, &out, &out), cio.WithFIFODir(filepath.Join(t.TempDir(), "fifo"))))
	if err != nil {
		t.Fatal(err)
	}
	exited, err := task.Wait(ctx)
	if err == nil {
		err = task.Start(ctx)
	}
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(time.Minute):
		t.Error("the app did not exit within a minute")
	}
	if _, err := task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Errorf("delete task: %v", err)
	}
	if out.String() != appOutput {
		t.Fatalf("container printed %q, want %q", out.String(), appOutput)
	}
	after := sb.BlobBytes()
	t.Logf("prefetched %d bytes in %d ranges before the app ran; the app then fetched %v", prefetched, pf.Ranges, after)
	if n := sumBytes(after); n != 0 {
		t.Errorf("the app fetched %d bytes the recorded start did not cover: %v", n, after)
	}
}

func sumBytes(m map[string]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}

// 'obd pull --download' fetches every overlaybd blob whole into the block cache, in range requests of at most
// 1 MiB, each byte once, before any container runs; containers then read nothing from the registry.
func TestPullDownload(t *testing.T) {
	sb := startSandbox(t)
	ctx := context.Background()
	lazy := convertedApp(t, sb)
	m := manifestOf(t, lazy)

	sb.ResetCounters()
	t.Log(obd(t, sb, "pull", "--download", "--socket", sb.StatusSocket, lazy))
	fetched, requests := sb.BlobBytes(), sb.BlobRequests()
	for _, l := range m.Layers {
		if fetched[l.Digest.String()] != l.Size {
			t.Errorf("layer %s: pulled %d of %d bytes", l.Digest, fetched[l.Digest.String()], l.Size)
		}
		if least := (l.Size + 1<<20 - 1) >> 20; requests[l.Digest.String()] < least {
			t.Errorf("layer %s (%d bytes): %d requests, want at least %d ranges", l.Digest, l.Size, requests[l.Digest.String()], least)
		}
	}
	sb.ResetCounters()
	out := run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", lazy, "dl1", "/bin/sh", "/app/run.sh"))
	if out != appOutput {
		t.Fatalf("container printed %q, want %q", out, appOutput)
	}
	if n := sumBytes(sb.BlobBytes()); n != 0 {
		t.Errorf("a container of a downloaded image fetched %d bytes: %v", n, sb.BlobBytes())
	}
}

// manifestOf fetches the manifest of a registry reference.
func manifestOf(t *testing.T, ref string) ocispec.Manifest {
	t.Helper()
	r, err := image.ParseRef(ref)
	if err != nil {
		t.Fatal(err)
	}
	c, err := registry.New(registry.Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, b, err := c.Resolve(context.Background(), r.Host(), r.Repository(), r.Tag)
	if err != nil {
		t.Fatal(err)
	}
	m, err := image.ParseManifest(b)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// convertedApp pushes appImage to the sandbox's registry as app:v1, converts it to app:obd and returns that.
func convertedApp(t *testing.T, sb *sandbox.Sandbox) string {
	t.Helper()
	src := filepath.Join(t.TempDir(), "src")
	appImage(t, src)
	plain, lazy := sb.Registry+"/app:v1", sb.Registry+"/app:obd"
	pushLayout(t, src, "v1", plain)
	obd(t, sb, "convert", "--vsize", "8", plain, lazy)
	return lazy
}

// waitStatus waits up to 30 seconds for the sandbox daemon's status to satisfy ok.
func waitStatus(t *testing.T, sb *sandbox.Sandbox, what string, ok func(*status.Status) bool) {
	t.Helper()
	sc := status.NewClient(sb.StatusSocket, 5*time.Second)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		st, err := sc.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if ok(st) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 30s still not %s: %+v", what, st.Images)
		}
	}
}
