package e2e

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/images/archive"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	digest "github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/node"
	"github.com/obdproject/obd/internal/pull"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/testenv"
)

const (
	helloLayout = "../../testdata/upstream/hello-world-oci"
	// helloLayer is the gzip tar layer of the original hello-world image: the static /hello.
	helloLayer = "sha256:719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6"
	// obdLayer is the overlaybd blob of the converted image (tag amd64-converted).
	obdLayer     = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
	obdLayerSize = 642560
	helloOutput  = "Hello from Docker!"
)

// TestContainerd runs Debian's containerd with obd-snapshotter's node service, in this process, as its proxy
// snapshotter "overlaybd" and runs hello-world from a normal image, a lazily pulled overlaybd image and a fully
// pulled overlaybd image. The device stack is faked: the image mounter serves a tmpfs holding the files of the
// original hello-world layer.
func TestContainerd(t *testing.T) {
	testenv.Root(t)
	tools := testenv.Tools(t, "containerd", "containerd-shim-runc-v2", "runc")
	if runtime.GOARCH != "amd64" {
		testenv.Skip(t, "the hello-world test image is amd64")
	}
	dir, err := os.MkdirTemp("", "obd-e2e-") // short: unix socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		testenv.UnmountUnder(t, dir)
		if err := os.RemoveAll(dir); err != nil {
			t.Error(err)
		}
	})

	mounter := &helloMounter{layer: filepath.Join(helloLayout, "blobs", "sha256", strings.TrimPrefix(helloLayer, "sha256:"))}
	startDaemon(t, config.Snapshotter{Root: filepath.Join(dir, "sn"), Address: filepath.Join(dir, "sn.sock"), LogLevel: "info"}, mounter)
	address := startContainerd(t, tools[0], dir, filepath.Join(dir, "sn.sock"))

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := client.New(address, client.WithDefaultNamespace("obd-e2e"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	v, err := c.Version(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("containerd %s, client github.com/containerd/containerd/v2/client", v.Version)
	sns := c.SnapshotService(snapshotter.Name)

	t.Run("normal image", func(t *testing.T) {
		imgs, err := c.Import(ctx, bytes.NewReader(layoutTar(t, helloLayout, "amd64")),
			client.WithImageRefTranslator(archive.AddRefPrefix("obd.test/hello")))
		if err != nil {
			t.Fatal(err)
		}
		img := client.NewImage(c, imgs[0])
		if err := img.Unpack(ctx, snapshotter.Name); err != nil {
			t.Fatal(err)
		}
		chainID := chainID(t, ctx, img)
		// A lease keeps containerd's garbage collector off the snapshot.
		lctx, done, err := c.WithLease(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := done(ctx); err != nil {
				t.Error(err)
			}
		}()
		ms, err := sns.Prepare(lctx, "e2e-rootfs", chainID)
		if err != nil {
			t.Fatal(err)
		}
		target := t.TempDir()
		if err := mount.All(ms, target); err != nil {
			t.Fatalf("mount %+v: %v", ms, err)
		}
		fi, err := os.Stat(filepath.Join(target, "hello"))
		if uerr := mount.UnmountAll(target, 0); uerr != nil {
			t.Error(uerr)
		}
		if err != nil || fi.Mode()&0o111 == 0 {
			t.Errorf("/hello in the rootfs: %v %v", fi, err)
		}
		if err := sns.Remove(lctx, "e2e-rootfs"); err != nil {
			t.Error(err)
		}
		out := runContainer(t, ctx, c, img, "hello-normal", dir)
		if !strings.Contains(out, helloOutput) {
			t.Errorf("container output does not say %q", helloOutput)
		}
		if calls := mounter.mountCalls(); len(calls) != 0 {
			t.Errorf("image mounter called for a normal image: %+v", calls)
		}
		deleteImage(t, ctx, c, img.Name())
	})

	t.Run("lazy overlaybd image", func(t *testing.T) {
		ref := "obd.test/hello:amd64-converted"
		res := &layoutResolver{dir: helloLayout}
		img, err := c.Pull(ctx, ref, client.WithResolver(res), client.WithPullUnpack,
			client.WithPullSnapshotter(snapshotter.Name), client.WithImageHandlerWrapper(pull.LabelLayers(ref, nil)))
		if err != nil {
			t.Fatal(err)
		}
		if fetched := res.fetchedDigests(); slices.Contains(fetched, digest.Digest(obdLayer)) {
			t.Errorf("the lazily pulled layer was downloaded: fetched %v", fetched)
		}
		info, err := sns.Stat(ctx, chainID(t, ctx, img))
		if err != nil || info.Labels[snapshotter.LabelRemote] != snapshotter.LabelRemoteValue {
			t.Errorf("layer snapshot %+v, %v: want a remote snapshot", info, err)
		}
		out := runContainer(t, ctx, c, img, "hello-lazy", dir)
		if !strings.Contains(out, helloOutput) {
			t.Errorf("container output does not say %q", helloOutput)
		}
		want := []snapshotter.Layer{{Digest: obdLayer, Size: obdLayerSize, ImageRef: ref}}
		calls := mounter.mountCalls()
		if len(calls) == 0 || !slices.Equal(calls[0].layers, want) {
			t.Errorf("image mounter calls %+v, want layers %+v", calls, want)
		}
		deleteImage(t, ctx, c, ref)
		// containerd's garbage collector removes the snapshots, which unmounts the image.
		deadline := time.Now().Add(10 * time.Second)
		for len(mounter.unmountCalls()) == 0 && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if u := mounter.unmountCalls(); len(u) != 1 || u[0] != calls[0].target {
			t.Errorf("unmounts after the image was deleted: %v, want %s", u, calls[0].target)
		}
	})

	t.Run("fully pulled overlaybd image", func(t *testing.T) {
		ref := "obd.test/hello:amd64-converted"
		res := &layoutResolver{dir: helloLayout}
		img, err := c.Pull(ctx, ref, client.WithResolver(res), client.WithPullUnpack, client.WithPullSnapshotter(snapshotter.Name))
		if err != nil {
			t.Fatal(err)
		}
		before := len(mounter.mountCalls())
		out := runContainer(t, ctx, c, img, "hello-full", dir)
		if !strings.Contains(out, helloOutput) {
			t.Errorf("container output does not say %q", helloOutput)
		}
		calls := mounter.mountCalls()[before:]
		if len(calls) == 0 || len(calls[0].layers) != 1 {
			t.Fatalf("image mounter calls %+v, want one layer", calls)
		}
		l := calls[0].layers[0]
		if l.Digest != obdLayer || l.Size != obdLayerSize || l.ImageRef != "" || !strings.HasSuffix(l.LocalPath, "/fs/overlaybd.commit") {
			t.Errorf("layer %+v: want the locally unpacked blob", l)
		}
		deleteImage(t, ctx, c, ref)
	})
}

// startDaemon runs the node service with mounter as its image mounter in this process until the test ends. It
// serves no metrics port.
func startDaemon(t *testing.T, sc config.Snapshotter, mounter snapshotter.ImageMounter) {
	cfg := config.Default()
	cfg.Snapshotter, cfg.Metrics.Address = sc, ""
	svc, err := node.New(cfg, node.WithImageMounter(mounter))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := errors.Join(<-done, svc.Close()); err != nil {
			t.Errorf("obd-snapshotter: %v", err)
		}
	})
	testenv.WaitSocket(t, sc.Address, done)
}

// startContainerd runs containerd with a private root, state and sockets under dir and returns its address.
func startContainerd(t *testing.T, bin, dir, snapshotterAddress string) string {
	address := filepath.Join(dir, "c.sock")
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = %q

[ttrpc]
  address = %q

[proxy_plugins.overlaybd]
  type = "snapshot"
  address = %q
`, filepath.Join(dir, "c", "root"), filepath.Join(dir, "c", "state"), address, address+".ttrpc", snapshotterAddress)
	cfgPath := filepath.Join(dir, "containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "containerd.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		if err := cmd.Process.Signal(syscall.SIGTERM); err == nil {
			select {
			case <-exited:
			case <-time.After(15 * time.Second):
				t.Error("containerd ignored SIGTERM: killing it")
				if err := cmd.Process.Kill(); err != nil {
					t.Error(err)
				}
				<-exited
			}
		}
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("containerd log:\n%s", b)
		}
	})
	testenv.WaitSocket(t, address, exited)
	return address
}

// helloMounter fakes the device stack: it mounts a read-only tmpfs holding the files of a gzip tar layer.
type helloMounter struct {
	layer string

	mu       sync.Mutex
	mounts   []mountCall
	unmounts []string
}

type mountCall struct {
	id     string
	layers []snapshotter.Layer
	target string
}

func (h *helloMounter) Mount(_ context.Context, id string, layers []snapshotter.Layer, target string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.mounts = append(h.mounts, mountCall{id, slices.Clone(layers), target})
	for _, l := range layers {
		if l.LocalPath == "" {
			continue
		}
		b := make([]byte, 8)
		f, err := os.Open(l.LocalPath)
		if err != nil {
			return err
		}
		_, err = io.ReadFull(f, b)
		f.Close()
		if err != nil || string(b) != "ZFile\x00\x01\x00" {
			return fmt.Errorf("%s: not a ZFile (%q, %v)", l.LocalPath, b, err)
		}
	}
	if mounted, err := mountinfo.Mounted(target); err != nil || mounted {
		return err
	}
	if err := unix.Mount("tmpfs", target, "tmpfs", 0, "size=1m,mode=0755"); err != nil {
		return fmt.Errorf("mount tmpfs at %s: %w", target, err)
	}
	if err := untarGzip(h.layer, target); err != nil {
		return errors.Join(err, unix.Unmount(target, 0))
	}
	return unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
}

func (h *helloMounter) Unmount(_ context.Context, _ string, target string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.unmounts = append(h.unmounts, target)
	if mounted, err := mountinfo.Mounted(target); err != nil || !mounted {
		return err
	}
	return unix.Unmount(target, 0)
}

func (h *helloMounter) mountCalls() []mountCall {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.mounts)
}

func (h *helloMounter) unmountCalls() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.unmounts)
}

// untarGzip extracts the regular files and directories of a gzip tar into dir.
func untarGzip(path, dir string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return err
	}
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(dir, filepath.Clean("/"+h.Name))
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(p, h.FileInfo().Mode().Perm())
		case tar.TypeReg:
			var w *os.File
			if w, err = os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_EXCL, h.FileInfo().Mode().Perm()); err == nil {
				_, err = io.Copy(w, tr)
				err = errors.Join(err, w.Close())
			}
		}
		if err != nil {
			return err
		}
	}
}

// layoutTar returns an OCI layout tar holding the image tagged tag in the layout dir (and nothing else).
func layoutTar(t *testing.T, dir, tag string) []byte {
	t.Helper()
	desc, err := (&layoutResolver{dir: dir}).find(tag)
	if err != nil {
		t.Fatal(err)
	}
	var manifest ocispec.Manifest
	if err := json.Unmarshal(readBlob(t, dir, desc.Digest), &manifest); err != nil {
		t.Fatal(err)
	}
	index, err := json.Marshal(ocispec.Index{Versioned: manifest.Versioned, MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{desc}})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(name string, b []byte) {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	add(ocispec.ImageLayoutFile, []byte(`{"imageLayoutVersion":"1.0.0"}`))
	add(ocispec.ImageIndexFile, index)
	for _, d := range append([]ocispec.Descriptor{desc, manifest.Config}, manifest.Layers...) {
		add("blobs/sha256/"+d.Digest.Encoded(), readBlob(t, dir, d.Digest))
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func readBlob(t *testing.T, dir string, d digest.Digest) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "blobs", d.Algorithm().String(), d.Encoded()))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// layoutResolver is a remotes.Resolver that "pulls" from an OCI layout directory (by tag) and records what is
// fetched.
type layoutResolver struct {
	dir string

	mu      sync.Mutex
	fetched []digest.Digest
}

func (r *layoutResolver) find(tag string) (ocispec.Descriptor, error) {
	b, err := os.ReadFile(filepath.Join(r.dir, ocispec.ImageIndexFile))
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	var idx ocispec.Index
	if err := json.Unmarshal(b, &idx); err != nil {
		return ocispec.Descriptor{}, err
	}
	for _, m := range idx.Manifests {
		if m.Annotations[ocispec.AnnotationRefName] == tag {
			return m, nil
		}
	}
	return ocispec.Descriptor{}, fmt.Errorf("tag %s in %s: %w", tag, r.dir, errdefs.ErrNotFound)
}

func (r *layoutResolver) Resolve(_ context.Context, ref string) (string, ocispec.Descriptor, error) {
	tag := ref[strings.LastIndex(ref, ":")+1:]
	desc, err := r.find(tag)
	return ref, desc, err
}

func (r *layoutResolver) Fetcher(context.Context, string) (remotes.Fetcher, error) { return r, nil }

func (r *layoutResolver) Pusher(context.Context, string) (remotes.Pusher, error) {
	return nil, errdefs.ErrNotImplemented
}

func (r *layoutResolver) Fetch(_ context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
	r.mu.Lock()
	r.fetched = append(r.fetched, desc.Digest)
	r.mu.Unlock()
	return os.Open(filepath.Join(r.dir, "blobs", desc.Digest.Algorithm().String(), desc.Digest.Encoded()))
}

func (r *layoutResolver) fetchedDigests() []digest.Digest {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.fetched)
}

func chainID(t *testing.T, ctx context.Context, img client.Image) string {
	t.Helper()
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return identity.ChainID(diffIDs).String()
}

// runContainer runs the image's command with runc and returns its output.
func runContainer(t *testing.T, ctx context.Context, c *client.Client, img client.Image, id, dir string) string {
	t.Helper()
	ctr, err := c.NewContainer(ctx, id, client.WithImage(img), client.WithSnapshotter(snapshotter.Name),
		client.WithNewSnapshot(id+"-rootfs", img), client.WithNewSpec(oci.WithImageConfig(img)))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := ctr.Delete(ctx, client.WithSnapshotCleanup); err != nil {
			t.Errorf("delete container %s: %v", id, err)
		}
	}()
	var out testenv.Buffer
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, &out, &out), cio.WithFIFODir(filepath.Join(dir, "fifo"))))
	if err != nil {
		t.Fatal(err)
	}
	exited, err := task.Wait(ctx)
	if err == nil {
		err = task.Start(ctx)
	}
	if err != nil {
		if _, derr := task.Delete(ctx, client.WithProcessKill); derr != nil {
			t.Errorf("delete task %s: %v", id, derr)
		}
		t.Fatal(err)
	}
	var st client.ExitStatus
	select {
	case st = <-exited:
	case <-ctx.Done():
	}
	if _, err := task.Delete(ctx, client.WithProcessKill); err != nil {
		t.Errorf("delete task %s: %v", id, err)
	}
	t.Logf("container %s (exit %d, %v):\n%s", id, st.ExitCode(), st.Error(), out.String())
	return out.String()
}

func deleteImage(t *testing.T, ctx context.Context, c *client.Client, name string) {
	t.Helper()
	if err := c.ImageService().Delete(ctx, name, images.SynchronousDelete()); err != nil {
		t.Errorf("delete image %s: %v", name, err)
	}
}

// TestPullReferrer pulls an original tag that has an overlaybd image attached as an OCI referrer ('obd convert
// --referrer'; docker-registry 2.8 has no referrers API, so through the referrers tag schema): obd pull gets the
// overlaybd image lazily under the original name, and containers run from it. An image without a referrer, or
// --no-referrers, is pulled as it is.
func TestPullReferrer(t *testing.T) {
	sb := startSandbox(t)
	ctx := context.Background()
	src := filepath.Join(t.TempDir(), "src")
	appImage(t, src)
	withRef, without := sb.Registry+"/app:v1", sb.Registry+"/other:v1"
	pushLayout(t, src, "v1", withRef)
	pushLayout(t, src, "v1", without)
	obd(t, sb, "convert", "--vsize", "8", "--referrer", withRef, sb.Registry+"/app")

	out := obd(t, sb, "pull", withRef)
	if !strings.Contains(out, "pulled "+withRef+" (its overlaybd referrer sha256:") || !strings.Contains(out, "3 layers, 3 lazy") {
		t.Fatalf("pull of a tag with an overlaybd referrer: %s", out)
	}
	if got := run(t, sb.Ctr(ctx, "images", "ls", "-q")); strings.Contains(got, "@sha256:") || !strings.Contains(got, withRef) {
		t.Errorf("images after the pull: %s", got)
	}
	if got := run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", withRef, "ref1", "/bin/sh", "/app/run.sh")); got != appOutput {
		t.Errorf("container from the referrer printed %q, want %q", got, appOutput)
	}
	for _, args := range [][]string{{"pull", without}, {"pull", "--no-referrers", withRef}} {
		out := obd(t, sb, args...)
		if strings.Contains(out, "referrer") || !strings.Contains(out, "3 layers, 0 lazy") {
			t.Errorf("obd %s: %s", strings.Join(args, " "), out)
		}
	}
	if got := run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", withRef, "plain1", "/bin/sh", "/app/run.sh")); got != appOutput {
		t.Errorf("container from the original image printed %q, want %q", got, appOutput)
	}
}
