// Package e2e runs obd end to end against real components: Debian's docker-registry, containerd and runc, with
// the obd and obd-snapshotter binaries built from this tree (TestContainerd runs the daemon in process with a fake
// device stack). Containers start from lazily pulled overlaybd images.
package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/sandbox"
	"github.com/obdproject/obd/internal/testenv"
)

// bins are the binaries built for the tests.
var bins struct{ obd, snapshotter string }

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "obd-e2e-bin-")
	if err != nil {
		panic(err)
	}
	bins.obd, bins.snapshotter = filepath.Join(dir, "obd"), filepath.Join(dir, "obd-snapshotter")
	for _, b := range []struct{ out, pkg string }{{bins.obd, "../../cmd/obd"}, {bins.snapshotter, "../../cmd/obd-snapshotter"}} {
		if out, err := exec.Command("go", "build", "-o", b.out, b.pkg).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", b.pkg, err, out)
			os.Exit(1)
		}
	}
	// The binaries keep their conversion database under the user's cache dir: give the tests their own.
	os.Setenv("XDG_CACHE_HOME", filepath.Join(dir, "cache"))
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func startSandbox(t *testing.T) *sandbox.Sandbox {
	t.Helper()
	testenv.Root(t)
	testenv.Tools(t, append([]string{"mke2fs", "busybox"}, sandbox.Required...)...)
	sb, err := sandbox.Start(context.Background(), sandbox.Options{Snapshotter: bins.snapshotter, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("obd-snapshotter log:\n%s", sb.Log("snapshotter"))
		}
		if err := sb.Close(); err != nil {
			t.Errorf("sandbox cleanup: %v", err)
		}
	})
	return sb
}

// run runs a command and returns its combined output, failing the test on error.
func run(t *testing.T, cmd *exec.Cmd) string {
	t.Helper()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
	return string(out)
}

// runAppLazily runs the app of ref (pulled lazily) in container id and checks that it printed its output having
// fetched some, and at most half, of the bytes of layers (the blobs its reads come from).
func runAppLazily(t *testing.T, sb *sandbox.Sandbox, ref, id string, layers []ocispec.Descriptor) {
	t.Helper()
	sb.ResetCounters()
	if got := run(t, sb.Ctr(context.Background(), "run", "--rm", "--snapshotter", "overlaybd", ref, id, "/bin/sh", "/app/run.sh")); got != appOutput {
		t.Fatalf("container printed %q, want %q", got, appOutput)
	}
	var fetched, total int64
	for _, l := range layers {
		fetched += sb.BlobBytes()[l.Digest.String()]
		total += l.Size
	}
	t.Logf("container fetched %d of %d layer bytes", fetched, total)
	if fetched == 0 || fetched > total/2 {
		t.Errorf("fetched %d of %d bytes: want a fraction", fetched, total)
	}
}

func obd(t *testing.T, sb *sandbox.Sandbox, args ...string) string {
	t.Helper()
	if args[0] == "pull" || args[0] == "commit" {
		args = append(args, "--address", sb.Containerd, "--namespace", sb.Namespace)
	}
	return run(t, exec.Command(bins.obd, args...))
}

// ctrAfterRestart runs ctr with args after a restart of the snapshotter. containerd redials the proxy plugin with
// its gRPC backoff: the first calls after a restart may fail with Unavailable ("connection refused" or "connection
// closed"), so they are tried again for up to 30 seconds.
func ctrAfterRestart(ctx context.Context, sb *sandbox.Sandbox, args ...string) (out []byte, err error) {
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		out, err = sb.Ctr(ctx, args...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "unavailable") {
			break
		}
	}
	return out, err
}

const appOutput = "motd from layer 1\ndata from layer 2\nscript from layer 3\n"

func TestLazyPullAndRun(t *testing.T) {
	sb := startSandbox(t)
	ctx := context.Background()
	src := filepath.Join(t.TempDir(), "src")
	appImage(t, src)
	plain := sb.Registry + "/app:v1"
	lazy := sb.Registry + "/app:obd"
	pushLayout(t, src, "v1", plain)

	start := time.Now()
	out := obd(t, sb, "convert", "--vsize", "8", plain, lazy)
	t.Logf("convert: %s(%s)", out, time.Since(start).Round(time.Millisecond))

	c, err := registry.New(registry.Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	m := registryManifest(t, c, lazy)
	var total int64
	for _, l := range m.Layers {
		total += l.Size
	}

	// The pull itself fetches no layer; the snapshotter opens each layer as the pull commits it ([prefetch]
	// on_pull), which reads its header and its index: at most the first 256 KiB and the last 512 KiB.
	t.Run("pull fetches layer headers and indexes only", func(t *testing.T) {
		sb.ResetCounters()
		start := time.Now()
		out := obd(t, sb, "pull", lazy)
		t.Logf("%s(pull took %s)", out, time.Since(start).Round(time.Millisecond))
		time.Sleep(time.Second) // the layer opens run in the background
		fetched := sb.BlobBytes()
		for _, l := range m.Layers {
			n := fetched[l.Digest.String()]
			t.Logf("layer %s: %d of %d bytes fetched", l.Digest, n, l.Size)
			if n > 768<<10 && n > l.Size/2 {
				t.Errorf("pull fetched %d bytes of layer %s (%d bytes)", n, l.Digest, l.Size)
			}
		}
		if fetched[m.Config.Digest.String()] != m.Config.Size {
			t.Errorf("pull fetched %v; want the config %s", fetched, m.Config.Digest)
		}
	})

	t.Run("container reads files of every layer lazily", func(t *testing.T) {
		sb.ResetCounters()
		start := time.Now()
		out := run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", lazy, "lazy1", "/bin/sh", "/app/run.sh"))
		if out != appOutput {
			t.Fatalf("container printed %q, want %q", out, appOutput)
		}
		var fetched int64
		for _, l := range m.Layers {
			fetched += sb.BlobBytes()[l.Digest.String()]
		}
		t.Logf("container ran in %s; fetched %d of %d layer bytes (%.1f%%)", time.Since(start).Round(time.Millisecond),
			fetched, total, 100*float64(fetched)/float64(total))
		// Layer 2 holds 32 MiB of random data the container never reads: most of the image must stay remote.
		if fetched == 0 || fetched > total/2 {
			t.Errorf("fetched %d of %d layer bytes: want a fraction", fetched, total)
		}
	})

	t.Run("normal image falls back to overlayfs", func(t *testing.T) {
		obd(t, sb, "pull", plain)
		out := run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", plain, "plain1", "/bin/sh", "/app/run.sh"))
		if out != appOutput {
			t.Fatalf("container printed %q, want %q", out, appOutput)
		}
	})

	t.Run("snapshotter crash and restart", func(t *testing.T) {
		if err := sb.KillSnapshotter(); err != nil {
			t.Fatal(err)
		}
		if err := sb.StartSnapshotter(ctx); err != nil {
			t.Fatal(err)
		}
		out, err := ctrAfterRestart(ctx, sb, "run", "--rm", "--snapshotter", "overlaybd", lazy, "lazy2", "/bin/sh", "/app/run.sh")
		if err != nil || string(out) != appOutput {
			t.Fatalf("after restart the container printed %q (%v), want %q", out, err, appOutput)
		}
	})
}

// registryManifest fetches the manifest of the registry reference r.
func registryManifest(t *testing.T, c *registry.Client, r string) ocispec.Manifest {
	t.Helper()
	ref, err := image.ParseRef(r)
	if err != nil {
		t.Fatal(err)
	}
	_, mb, err := c.Resolve(context.Background(), ref.Host(), ref.Repository(), ref.Tag)
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(mb, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestUpstreamConvertedImage(t *testing.T) {
	sb := startSandbox(t)
	ctx := context.Background()
	ref := sb.Registry + "/hello:obd"
	pushLayout(t, helloLayout, "amd64-converted", ref)
	obd(t, sb, "pull", ref)
	out := run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", ref, "hello1"))
	if !strings.Contains(out, helloOutput) {
		t.Fatalf("hello-world printed %q", out)
	}
}

// appImage writes a three-layer image to an OCI layout (tag v1).
func appImage(t *testing.T, dir string) {
	t.Helper()
	bb, err := os.ReadFile(testenv.Tools(t, "busybox")[0])
	if err != nil {
		t.Fatal(err)
	}
	big := make([]byte, 32<<20)
	rand.Read(big)
	layers := [][]byte{
		tarOf(t, []tarEntry{{name: "bin/", mode: 0o755}, {name: "bin/busybox", body: bb, mode: 0o755},
			{name: "bin/sh", link: "busybox"}, {name: "bin/cat", link: "busybox"}, {name: "etc/motd", body: []byte("motd from layer 1\n")}}),
		tarOf(t, []tarEntry{{name: "app/", mode: 0o755}, {name: "app/data.txt", body: []byte("data from layer 2\n")}, {name: "app/big.bin", body: big}}),
		tarOf(t, []tarEntry{{name: "app/run.sh", body: []byte("cat /etc/motd /app/data.txt\necho script from layer 3\n"), mode: 0o755}}),
	}
	writeLayout(t, dir, "v1", layers)
}

// tarEntry is a file of a test layer: directories end in "/", symbolic links have a link.
type tarEntry struct {
	name, link string
	body       []byte
	mode       int64 // 0: 0644
}

// tarOf returns a layer tar of the entries.
func tarOf(t *testing.T, ents []tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Mode: e.mode, ModTime: time.Unix(1700000000, 0), Typeflag: tar.TypeReg, Size: int64(len(e.body))}
		switch {
		case e.link != "":
			h.Typeflag, h.Linkname, h.Size = tar.TypeSymlink, e.link, 0
		case strings.HasSuffix(e.name, "/"):
			h.Typeflag, h.Size = tar.TypeDir, 0
		}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func writeLayout(t *testing.T, dir, tag string, layers [][]byte) {
	t.Helper()
	lay, err := image.CreateLayout(dir)
	if err != nil {
		t.Fatal(err)
	}
	var cfg ocispec.Image
	cfg.Config.Env = []string{"PATH=/bin"}
	if _, err := lay.WriteImage(tag, layers, "", cfg); err != nil {
		t.Fatal(err)
	}
}

// pushLayout pushes the image tagged tag in an OCI layout to a registry reference, as it is.
func pushLayout(t *testing.T, dir, tag, ref string) {
	t.Helper()
	r, err := image.ParseRef(ref)
	if err != nil {
		t.Fatal(err)
	}
	lay, err := image.OpenLayout(dir)
	if err != nil {
		t.Fatal(err)
	}
	c, err := registry.New(registry.Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := image.PushLayout(context.Background(), c, lay, tag, r); err != nil {
		t.Fatal(err)
	}
}
