package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	digest "github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/testenv"
)

// fakeMounter "mounts" an image as a read-only tmpfs holding image.txt (the layers' digests, one a line) and
// records its calls.
type fakeMounter struct {
	mu       sync.Mutex
	mounts   []mountCall
	unmounts []mountCall
	starts   []string // ids given to Starting
	fail     error
}

func (f *fakeMounter) Starting(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.starts = append(f.starts, id)
}

type mountCall struct {
	id     string
	layers []Layer
	target string
}

func (f *fakeMounter) Mount(_ context.Context, id string, layers []Layer, target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.mounts = append(f.mounts, mountCall{id, slices.Clone(layers), target})
	if f.fail != nil {
		return f.fail
	}
	if mounted, err := mountinfo.Mounted(target); err != nil || mounted {
		return err
	}
	if err := unix.Mount("tmpfs", target, "tmpfs", 0, "size=1m,mode=0755"); err != nil {
		return fmt.Errorf("mount tmpfs at %s: %w", target, err)
	}
	var b strings.Builder
	for _, l := range layers {
		fmt.Fprintln(&b, l.Digest)
	}
	if err := os.WriteFile(filepath.Join(target, "image.txt"), []byte(b.String()), 0o644); err != nil {
		return err
	}
	return unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
}

func (f *fakeMounter) Unmount(_ context.Context, id string, target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.unmounts = append(f.unmounts, mountCall{id: id, target: target})
	if mounted, err := mountinfo.Mounted(target); err != nil || !mounted {
		return err
	}
	return unix.Unmount(target, 0)
}

func (f *fakeMounter) calls() (mounts, unmounts []mountCall) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.mounts), slices.Clone(f.unmounts)
}

func newTestSnapshotter(t *testing.T) (context.Context, *Snapshotter, *fakeMounter, string) {
	t.Helper()
	f := &fakeMounter{}
	sn, root := openSnapshotter(t, f)
	return context.Background(), sn, f, root
}

// openSnapshotter opens a Snapshotter on a new root with mounter m, closed (and its mounts undone) when the test
// ends.
func openSnapshotter(t *testing.T, m ImageMounter, opts ...Option) (*Snapshotter, string) {
	t.Helper()
	root := t.TempDir()
	sn, err := New(root, m, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := sn.Close(); err != nil {
			t.Error(err)
		}
		if os.Geteuid() == 0 {
			testenv.UnmountUnder(t, root)
		}
	})
	return sn, root
}

func remoteLabels(target string, dg digest.Digest, size int64, ref string) map[string]string {
	return map[string]string{
		LabelTargetRef:                  target,
		image.AnnotationBlobDigest:      dg.String(),
		image.AnnotationBlobSize:        fmt.Sprint(size),
		image.AnnotationVersion:         image.FormatVersion,
		LabelImageRef:                   ref,
		"containerd.io/snapshot/custom": "kept",
	}
}

// pullRemote commits target over parent as a lazily pulled overlaybd layer, as containerd's unpacker would.
func pullRemote(t *testing.T, ctx context.Context, sn *Snapshotter, target, parent, ref string) digest.Digest {
	t.Helper()
	dg := digest.FromString(target)
	_, err := sn.Prepare(ctx, "extract-"+target, parent, snapshots.WithLabels(remoteLabels(target, dg, 4096, ref)))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of remote layer %s: got %v, want AlreadyExists", target, err)
	}
	return dg
}

// withMounted mounts ms on a temporary directory for fn.
func withMounted(t *testing.T, ms []mount.Mount, fn func(dir string)) {
	t.Helper()
	dir := t.TempDir()
	if err := mount.All(ms, dir); err != nil {
		t.Fatalf("mount %+v: %v", ms, err)
	}
	defer func() {
		if err := mount.UnmountAll(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	}()
	fn(dir)
}

func option(m mount.Mount, key string) string {
	for _, o := range m.Options {
		if v, ok := strings.CutPrefix(o, key+"="); ok {
			return v
		}
	}
	return ""
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestSuite(t *testing.T) {
	testenv.Root(t)
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		sn, err := New(root, &fakeMounter{})
		if err != nil {
			return nil, nil, err
		}
		return sn, sn.Close, nil
	})
}

func TestRemotePull(t *testing.T) {
	ctx, sn, _, root := newTestSnapshotter(t)
	const ref = "registry.test/app:v1"
	dg := pullRemote(t, ctx, sn, "L0", "", ref)

	info, err := sn.Stat(ctx, "L0")
	if err != nil {
		t.Fatal(err)
	}
	if info.Kind != snapshots.KindCommitted || info.Labels[LabelRemote] != LabelRemoteValue ||
		info.Labels[image.AnnotationBlobDigest] != dg.String() || info.Labels[LabelTargetRef] != "L0" ||
		info.Labels["containerd.io/snapshot/custom"] != "kept" {
		t.Errorf("remote snapshot info = %+v", info)
	}
	if _, err := sn.Stat(ctx, "extract-L0"); !errdefs.IsNotFound(err) {
		t.Errorf("Stat of the pull's active key: got %v, want NotFound", err)
	}

	// Pulls of the same layer race: every one sees AlreadyExists and exactly one snapshot is made.
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = sn.Prepare(ctx, fmt.Sprintf("extract-%d-L1", i), "L0",
				snapshots.WithLabels(remoteLabels("L1", digest.FromString("L1"), 1, ref)))
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if !errdefs.IsAlreadyExists(err) {
			t.Errorf("racing pull %d: got %v, want AlreadyExists", i, err)
		}
	}
	var names []string
	if err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		names = append(names, i.Name+"<-"+i.Parent)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	slices.Sort(names)
	if want := []string{"L0<-", "L1<-L0"}; !slices.Equal(names, want) {
		t.Errorf("snapshots = %v, want %v", names, want)
	}
	dirs, err := os.ReadDir(filepath.Join(root, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	if len(dirs) != 2 {
		t.Errorf("snapshot directories = %v, want 2", dirs)
	}
	if u, err := sn.Usage(ctx, "L1"); err != nil || u.Size < 0 {
		t.Errorf("Usage(L1) = %+v, %v", u, err)
	}

	// Without an image reference the layer is unpacked by containerd as usual.
	l := remoteLabels("L9", digest.FromString("L9"), 1, "")
	delete(l, LabelImageRef)
	if _, err := sn.Prepare(ctx, "extract-L9", "", snapshots.WithLabels(l)); err != nil {
		t.Errorf("Prepare of an overlaybd layer without image ref: %v", err)
	}
}

func TestRootfsOverRemoteImage(t *testing.T) {
	testenv.Root(t)
	ctx, sn, f, _ := newTestSnapshotter(t)
	const ref = "registry.test/app:v1"
	d0 := pullRemote(t, ctx, sn, "L0", "", ref)
	d1 := pullRemote(t, ctx, sn, "L1", "L0", ref)

	ms, err := sn.Prepare(ctx, "c1", "L1")
	if err != nil {
		t.Fatal(err)
	}
	mounts, _ := f.calls()
	if len(mounts) != 1 {
		t.Fatalf("mounter calls = %+v, want 1", mounts)
	}
	mc := mounts[0]
	want := []Layer{{Digest: d0, Size: 4096, ImageRef: ref}, {Digest: d1, Size: 4096, ImageRef: ref}}
	if !slices.Equal(mc.layers, want) || !strings.HasSuffix(mc.target, "/block/mountpoint") {
		t.Fatalf("Mount(%q, %+v, %q), want layers %+v", mc.id, mc.layers, mc.target, want)
	}
	if len(ms) != 1 || ms[0].Type != "overlay" || option(ms[0], "lowerdir") != mc.target || option(ms[0], "upperdir") == "" ||
		!slices.Contains(ms[0].Options, "index=off") && supportsIndex() {
		t.Fatalf("rootfs mounts = %+v", ms)
	}
	withMounted(t, ms, func(dir string) {
		if got := readFile(t, filepath.Join(dir, "image.txt")); got != d0.String()+"\n"+d1.String()+"\n" {
			t.Errorf("image.txt through the overlay = %q", got)
		}
		if err := os.WriteFile(filepath.Join(dir, "new.txt"), []byte("rw"), 0o644); err != nil {
			t.Errorf("write through the overlay: %v", err)
		}
	})
	if got := readFile(t, filepath.Join(option(ms[0], "upperdir"), "new.txt")); got != "rw" {
		t.Errorf("upperdir new.txt = %q", got)
	}

	// A second container and a view share the image mount.
	if _, err := sn.Prepare(ctx, "c2", "L1"); err != nil {
		t.Fatal(err)
	}
	vms, err := sn.View(ctx, "v1", "L1")
	if err != nil {
		t.Fatal(err)
	}
	if len(vms) != 1 || vms[0].Type != "bind" || vms[0].Source != mc.target || !slices.Contains(vms[0].Options, "ro") {
		t.Fatalf("view mounts = %+v", vms)
	}
	withMounted(t, vms, func(dir string) {
		if _, err := os.Stat(filepath.Join(dir, "image.txt")); err != nil {
			t.Error(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "x"), nil, 0o644); !errors.Is(err, unix.EROFS) {
			t.Errorf("write into a view: got %v, want EROFS", err)
		}
	})
	mounts, _ = f.calls()
	for _, m := range mounts {
		if m.id != mc.id || m.target != mc.target {
			t.Errorf("mounter call %+v differs from the first %+v", m, mc)
		}
	}
	f.mu.Lock()
	starts := slices.Clone(f.starts)
	f.mu.Unlock()
	if !slices.Equal(starts, []string{mc.id, mc.id}) { // the two containers, not the view
		t.Errorf("Starting calls %q, want %q twice", starts, mc.id)
	}

	// The device went away (reboot, crash): Mounts attaches it again.
	if err := unix.Unmount(mc.target, 0); err != nil {
		t.Fatal(err)
	}
	ms2, err := sn.Mounts(ctx, "c1")
	if err != nil {
		t.Fatal(err)
	}
	if mounted, _ := mountinfo.Mounted(mc.target); !mounted || !slices.Equal(ms2[0].Options, ms[0].Options) {
		t.Errorf("after Mounts: mounted=%v, mounts %+v, want %+v", mounted, ms2, ms)
	}

	// The image stays mounted while snapshots use it and until its top layer is removed.
	if err := sn.Remove(ctx, "L1"); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Remove of the image's top layer while containers use it: got %v, want FailedPrecondition", err)
	}
	for _, k := range []string{"c1", "c2", "v1"} {
		if err := sn.Remove(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	if _, unmounts := f.calls(); len(unmounts) != 0 {
		t.Errorf("unmounts before the image was removed: %+v", unmounts)
	}
	if mounted, _ := mountinfo.Mounted(mc.target); !mounted {
		t.Error("image unmounted before its top layer was removed")
	}
	if err := sn.Remove(ctx, "L1"); err != nil {
		t.Fatal(err)
	}
	if _, unmounts := f.calls(); len(unmounts) != 1 || unmounts[0].id != mc.id || unmounts[0].target != mc.target {
		t.Errorf("unmounts = %+v, want one of %s", unmounts, mc.target)
	}
	if _, err := os.Stat(filepath.Dir(mc.target)); !os.IsNotExist(err) {
		t.Errorf("block directory of the removed layer: %v", err)
	}
	if err := sn.Remove(ctx, "L0"); err != nil {
		t.Fatal(err)
	}
}

func TestLocalOverlaybdLayer(t *testing.T) {
	testenv.Root(t)
	for _, tc := range []struct {
		name    string
		content string
		block   bool
	}{
		{"zfile", "ZFile\x00\x01\x00" + strings.Repeat("z", 100), true},
		{"lsmt", "LSMT\x00\x01\x02\x00" + strings.Repeat("l", 100), true},
		{"other", "just a file called overlaybd.commit", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, sn, f, _ := newTestSnapshotter(t)
			dg := digest.FromString(tc.content)
			// A full pull: no image ref, so containerd downloads and unpacks the blob.
			labels := remoteLabels("L0", dg, int64(len(tc.content)), "")
			delete(labels, LabelImageRef)
			ms, err := sn.Prepare(ctx, "extract-L0", "", snapshots.WithLabels(labels))
			if err != nil {
				t.Fatal(err)
			}
			commit := filepath.Join(ms[0].Source, commitFile)
			if err := os.WriteFile(commit, []byte(tc.content), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := sn.Commit(ctx, "L0", "extract-L0", snapshots.WithLabels(labels)); err != nil {
				t.Fatal(err)
			}
			// containerd unpacks the next layer into plain overlayfs, without the device.
			labels1 := remoteLabels("L1", digest.FromString("L1"), 1, "")
			delete(labels1, LabelImageRef)
			ums, err := sn.Prepare(ctx, "extract-L1", "L0", snapshots.WithLabels(labels1))
			if err != nil {
				t.Fatal(err)
			}
			if got := option(ums[0], "lowerdir"); got != filepath.Dir(commit) {
				t.Errorf("unpack of a second overlaybd layer: lowerdir %q, want %q", got, filepath.Dir(commit))
			}

			ms, err = sn.Prepare(ctx, "c", "L0")
			if err != nil {
				t.Fatal(err)
			}
			mounts, _ := f.calls()
			if !tc.block {
				if len(mounts) != 0 || option(ms[0], "lowerdir") != filepath.Dir(commit) {
					t.Errorf("normal layer: mounter calls %+v, mounts %+v", mounts, ms)
				}
				return
			}
			want := []Layer{{Digest: dg, Size: int64(len(tc.content)), LocalPath: commit}}
			if len(mounts) != 1 || !slices.Equal(mounts[0].layers, want) {
				t.Fatalf("mounter calls %+v, want layers %+v", mounts, want)
			}
			if option(ms[0], "lowerdir") != mounts[0].target {
				t.Errorf("rootfs mounts %+v", ms)
			}
		})
	}
}

func TestNormalLayersAboveImage(t *testing.T) {
	testenv.Root(t)
	ctx, sn, f, _ := newTestSnapshotter(t)
	d0 := pullRemote(t, ctx, sn, "L0", "", "registry.test/base:v1")

	// containerd unpacks a normal layer over the overlaybd base (hard links may point into the base).
	ms, err := sn.Prepare(ctx, "extract-N1", "L0", snapshots.WithLabels(map[string]string{LabelTargetRef: "N1"}))
	if err != nil {
		t.Fatal(err)
	}
	withMounted(t, ms, func(dir string) {
		if err := os.WriteFile(filepath.Join(dir, "app.txt"), []byte("app"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	if err := sn.Commit(ctx, "N1", "extract-N1"); err != nil {
		t.Fatal(err)
	}

	ms, err = sn.Prepare(ctx, "c", "N1")
	if err != nil {
		t.Fatal(err)
	}
	mounts, _ := f.calls()
	lowers := strings.Split(option(ms[0], "lowerdir"), ":")
	if len(lowers) != 2 || lowers[1] != mounts[0].target {
		t.Fatalf("lowerdirs %v, want [N1 fs, %s]", lowers, mounts[0].target)
	}
	withMounted(t, ms, func(dir string) {
		if got := readFile(t, filepath.Join(dir, "image.txt")) + readFile(t, filepath.Join(dir, "app.txt")); got != d0.String()+"\napp" {
			t.Errorf("rootfs content %q", got)
		}
	})
	vms, err := sn.View(ctx, "v", "N1")
	if err != nil {
		t.Fatal(err)
	}
	if vms[0].Type != "overlay" || option(vms[0], "lowerdir") != option(ms[0], "lowerdir") || option(vms[0], "upperdir") != "" {
		t.Errorf("view mounts %+v", vms)
	}
	withMounted(t, vms, func(dir string) {
		if got := readFile(t, filepath.Join(dir, "app.txt")); got != "app" {
			t.Errorf("view app.txt = %q", got)
		}
	})

	// An overlaybd layer above a normal layer cannot be mounted.
	if _, err := sn.Prepare(ctx, "b", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "B", "b"); err != nil {
		t.Fatal(err)
	}
	pullRemote(t, ctx, sn, "R", "B", "registry.test/odd:v1")
	_, err = sn.Prepare(ctx, "c2", "R")
	if err == nil || !strings.Contains(err.Error(), `overlaybd layer "R" of image registry.test/odd:v1 lies above normal layer "B"`) ||
		!strings.Contains(err.Error(), `"c2"`) {
		t.Errorf("Prepare over overlaybd-above-normal: %v", err)
	}
}

func TestMountFailure(t *testing.T) {
	ctx, sn, f, _ := newTestSnapshotter(t)
	pullRemote(t, ctx, sn, "L0", "", "registry.test/app:v1")
	f.fail = errors.New("registry.test: connection refused")
	_, err := sn.Prepare(ctx, "c", "L0")
	for _, s := range []string{`"c"`, "registry.test/app:v1", "connection refused"} {
		if err == nil || !strings.Contains(err.Error(), s) {
			t.Errorf("Prepare error %v does not mention %s", err, s)
		}
	}
	if _, err := sn.Stat(ctx, "c"); !errdefs.IsNotFound(err) {
		t.Errorf("snapshot of a failed Prepare: Stat got %v, want NotFound", err)
	}
	// The mountpoint was never mounted: removing the image works.
	f.fail = nil
	if err := sn.Remove(ctx, "L0"); err != nil {
		t.Error(err)
	}
}

func TestReconcile(t *testing.T) {
	testenv.Root(t)
	root := t.TempDir()
	t.Cleanup(func() { testenv.UnmountUnder(t, root) })
	ctx := context.Background()
	sn, err := New(root, &fakeMounter{})
	if err != nil {
		t.Fatal(err)
	}
	if err := sn.Reconcile(ctx); err != nil {
		t.Errorf("Reconcile of a new snapshotter: %v", err)
	}
	pullRemote(t, ctx, sn, "L0", "", "registry.test/app:v1")
	pullRemote(t, ctx, sn, "M0", "", "registry.test/other:v1")
	for _, k := range []string{"c1", "c2"} {
		if _, err := sn.Prepare(ctx, k, "L0"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := sn.View(ctx, "v", "M0"); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.Prepare(ctx, "plain", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	testenv.UnmountUnder(t, root) // reboot

	f := &fakeMounter{}
	sn, err = New(root, f)
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Close()
	if err := sn.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	mounts, _ := f.calls()
	if len(mounts) != 2 {
		t.Fatalf("mounter calls after reconcile = %+v, want one per image", mounts)
	}
	for _, m := range mounts {
		if mounted, _ := mountinfo.Mounted(m.target); !mounted {
			t.Errorf("%s not mounted after reconcile", m.target)
		}
	}

	f.fail = errors.New("device service down")
	if err := sn.Reconcile(ctx); err == nil || !strings.Contains(err.Error(), "device service down") {
		t.Errorf("Reconcile with a failing mounter: %v", err)
	}
}

func TestBuildPlan(t *testing.T) {
	block := func(name string) chainLayer {
		return chainLayer{id: name + "-id", name: name, dir: name + "/fs", kind: kindBlock, layer: Layer{Digest: digest.FromString(name), ImageRef: "r"}}
	}
	normal := func(name string) chainLayer {
		return chainLayer{id: name + "-id", name: name, dir: name + "/fs", kind: kindNormal}
	}
	accel := chainLayer{id: "a-id", name: "a", dir: "a/fs", kind: kindAccel}
	for _, tc := range []struct {
		name   string
		chain  []chainLayer // top first
		id     string
		layers int
		uppers []string
		err    string
	}{
		{name: "normal", chain: []chainLayer{normal("n1"), normal("n0")}},
		{name: "accel over normal", chain: []chainLayer{accel, normal("n0")}},
		{name: "blocks", chain: []chainLayer{block("b1"), block("b0")}, id: "b1-id", layers: 2},
		{name: "accel on top", chain: []chainLayer{accel, block("b1"), block("b0")}, id: "b1-id", layers: 2},
		{name: "normal above", chain: []chainLayer{normal("n1"), accel, block("b0")}, id: "b0-id", layers: 1, uppers: []string{"n1/fs"}},
		{name: "block above normal", chain: []chainLayer{block("b1"), normal("n0")}, err: `overlaybd layer "b1" of image r lies above normal layer "n0"`},
		{name: "block between", chain: []chainLayer{normal("n2"), block("b1"), normal("n1"), block("b0")}, err: `"b1"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := buildPlan(tc.chain)
			switch {
			case tc.err != "":
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Errorf("error %v, want %q", err, tc.err)
				}
			case err != nil:
				t.Error(err)
			case tc.id == "":
				if p != nil {
					t.Errorf("plan %+v, want none", p)
				}
			case p == nil || p.id != tc.id || len(p.layers) != tc.layers || !slices.Equal(p.uppers, tc.uppers):
				t.Errorf("plan %+v, want id %s, %d layers, uppers %v", p, tc.id, tc.layers, tc.uppers)
			case p.layers[0].Digest != digest.FromString("b0"):
				t.Errorf("layers not bottom first: %+v", p.layers)
			}
		})
	}
}

func supportsIndex() bool {
	_, err := os.Stat("/sys/module/overlay/parameters/index")
	return err == nil
}

func TestConcurrentContainers(t *testing.T) {
	testenv.Root(t)
	ctx, sn, f, _ := newTestSnapshotter(t)
	pullRemote(t, ctx, sn, "L0", "", "registry.test/app:v1")
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			key := fmt.Sprintf("c%d", i)
			if _, errs[i] = sn.Prepare(ctx, key, "L0"); errs[i] == nil {
				_, errs[i] = sn.Mounts(ctx, key)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	mounts, _ := f.calls()
	infos, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(mounts[0].target))
	if err != nil || len(infos) != 1 {
		t.Errorf("mounts at %s: %d (%v), want exactly one", mounts[0].target, len(infos), err)
	}
	for i := range errs {
		if err := sn.Remove(ctx, fmt.Sprintf("c%d", i)); err != nil {
			t.Error(err)
		}
	}
	if err := sn.Remove(ctx, "L0"); err != nil {
		t.Error(err)
	}
}

// A second snapshotter on a root in use fails at once and names the owner, instead of waiting for the metadata
// store's file lock forever; once the first closes, the root can be opened again.
func TestRootInUse(t *testing.T) {
	root := t.TempDir()
	sn, err := New(root, &fakeMounter{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = New(root, &fakeMounter{})
	if !errors.Is(err, ErrRootInUse) || !strings.Contains(err.Error(), "pid "+strconv.Itoa(os.Getpid())) {
		t.Fatalf("second New on the same root: %v, want ErrRootInUse naming pid %d", err, os.Getpid())
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	sn, err = New(root, &fakeMounter{})
	if err != nil {
		t.Fatalf("New after the owner closed: %v", err)
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
}

// traceMounter is a fakeMounter that also takes trace files, recording the one of each mount.
type traceMounter struct {
	fakeMounter
	traces []string
}

func (f *traceMounter) Mount(ctx context.Context, id string, layers []Layer, target string) error {
	return f.MountTrace(ctx, id, layers, target, "")
}

func (f *traceMounter) MountTrace(ctx context.Context, id string, layers []Layer, target, traceFile string) error {
	f.mu.Lock()
	f.traces = append(f.traces, traceFile)
	f.mu.Unlock()
	return f.fakeMounter.Mount(ctx, id, layers, target)
}

// An image's trace file: none; a profile registered for its chain; the record-trace labels over both.
func TestTraceFiles(t *testing.T) {
	testenv.Root(t)
	profiles := t.TempDir()
	f := &traceMounter{}
	sn, _ := openSnapshotter(t, f, WithProfiles(profiles))
	ctx := context.Background()
	const ref = "registry.test/app:v1"
	pullRemote(t, ctx, sn, "sha256:0000000000000000000000000000000000000000000000000000000000000001", "", ref)

	top := "sha256:0000000000000000000000000000000000000000000000000000000000000001"
	if _, err := sn.Prepare(ctx, "c1", top); err != nil {
		t.Fatal(err)
	}
	registered := ProfilePath(profiles, top)
	if err := os.WriteFile(registered, []byte("a trace"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.Prepare(ctx, "c2", top); err != nil {
		t.Fatal(err)
	}
	rec := filepath.Join(t.TempDir(), "rec")
	if _, err := sn.Prepare(ctx, "c3", top, snapshots.WithLabels(map[string]string{LabelRecordTrace: "yes", LabelRecordTracePath: rec})); err != nil {
		t.Fatal(err)
	}
	// An empty registered file is no profile (an empty trace file would ask for a recording).
	if err := os.WriteFile(registered, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.Prepare(ctx, "c4", top); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if want := []string{"", registered, rec, ""}; !slices.Equal(f.traces, want) {
		t.Fatalf("trace files of the mounts = %q, want %q", f.traces, want)
	}
	if filepath.Base(registered) != "sha256-0000000000000000000000000000000000000000000000000000000000000001.trace" {
		t.Errorf("profile file name %s", registered)
	}
}

// pullAccel unpacks acceleration layer accel, holding a trace, over parent and commits it, with labels besides the
// acceleration layer's own on both calls as containerd's unpacker does; beforeCommit, if set, runs before the commit.
func pullAccel(t *testing.T, ctx context.Context, sn *Snapshotter, accel, parent string, labels map[string]string, beforeCommit func()) {
	t.Helper()
	l := maps.Clone(labels)
	if l == nil {
		l = map[string]string{}
	}
	l[LabelTargetRef], l[image.AnnotationAccelerationLayer] = accel, "yes"
	ms, err := sn.Prepare(ctx, "extract-accel", parent, snapshots.WithLabels(l))
	if err != nil {
		t.Fatal(err)
	}
	withMounted(t, ms, func(dir string) {
		if err := os.WriteFile(filepath.Join(dir, traceFile), []byte("a trace"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	if beforeCommit != nil {
		beforeCommit()
	}
	if err := sn.Commit(ctx, accel, "extract-accel", snapshots.WithLabels(l)); err != nil {
		t.Fatal(err)
	}
}

// preloadMounter is a traceMounter that records the Preload calls.
type preloadMounter struct {
	traceMounter
	preloads      []string // "id layers base-name-of-trace"
	preloadTraces []string
}

func (f *preloadMounter) Preload(id string, layers []Layer, traceFile string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.preloads = append(f.preloads, fmt.Sprintf("%s %d %s", id, len(layers), filepath.Base(traceFile)))
	f.preloadTraces = append(f.preloadTraces, traceFile)
}

// A pull preloads each chain as its layers are committed, the last one with the trace of the image's acceleration
// layer, under the mount id that the container's attach uses.
func TestPullPreloads(t *testing.T) {
	testenv.Root(t)
	f := &preloadMounter{}
	sn, _ := openSnapshotter(t, f)
	ctx := context.Background()
	const ref = "registry.test/app:v1"
	l1, l2 := "sha256:00000000000000000000000000000000000000000000000000000000000000a1", "sha256:00000000000000000000000000000000000000000000000000000000000000a2"
	pullRemote(t, ctx, sn, l1, "", ref)
	pullRemote(t, ctx, sn, l2, l1, ref)
	accel := "sha256:00000000000000000000000000000000000000000000000000000000000000a3"
	pullAccel(t, ctx, sn, accel, l2, nil, nil)
	if _, err := sn.Prepare(ctx, "c1", accel); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.mounts) != 1 || len(f.preloads) != 3 {
		t.Fatalf("mounts %+v, preloads %q: want one mount, three preloads", f.mounts, f.preloads)
	}
	id := f.mounts[0].id
	var id1 string
	if _, err := fmt.Sscan(f.preloads[0], &id1); err != nil {
		t.Fatal(err)
	}
	if want := []string{id1 + " 1 .", id + " 2 .", id + " 2 " + traceFile}; !slices.Equal(f.preloads, want) {
		t.Fatalf("preloads %q, want %q", f.preloads, want)
	}
	if f.traces[0] != f.preloadTraces[2] {
		t.Fatalf("the attach took trace %q, the preload another", f.traces[0])
	}
}

// A pull whose layers carry the CRI labels attaches the image, with its acceleration layer's trace, once it has
// committed the top layer, and not before; WithAttachOnPull(false) leaves the attach to the first container.
func TestPullAttaches(t *testing.T) {
	testenv.Root(t)
	const ref = "registry.test/app:v1"
	l1, l2 := "sha256:00000000000000000000000000000000000000000000000000000000000000b1", "sha256:00000000000000000000000000000000000000000000000000000000000000b2"
	accel := "sha256:00000000000000000000000000000000000000000000000000000000000000b3"
	cri := func(labels map[string]string, layer string, above ...string) map[string]string {
		labels[LabelCRILayerDigest] = layer
		labels[LabelCRIImageLayers] = strings.Join(append([]string{layer}, above...), ",")
		return labels
	}
	pull := func(t *testing.T, sn *Snapshotter, afterLayer func(i int)) {
		ctx := context.Background()
		for i, l := range []string{l1, l2} {
			parent := ""
			if i > 0 {
				parent = l1
			}
			above := []string{l2, accel}[i:]
			labels := cri(remoteLabels(l, digest.FromString(l), 4096, ref), l, above...)
			if _, err := sn.Prepare(ctx, "extract-"+l, parent, snapshots.WithLabels(labels)); !errdefs.IsAlreadyExists(err) {
				t.Fatalf("Prepare of remote layer %s: got %v, want AlreadyExists", l, err)
			}
			sn.pulled.Wait()
			afterLayer(i)
		}
		pullAccel(t, ctx, sn, accel, l2, cri(map[string]string{}, accel), func() { afterLayer(2) })
		sn.pulled.Wait()
	}
	t.Run("on", func(t *testing.T) {
		f := &traceMounter{}
		sn, _ := openSnapshotter(t, f, WithAttachOnPull(true))
		pull(t, sn, func(i int) {
			if mounts, _ := f.calls(); len(mounts) != 0 {
				t.Fatalf("after layer %d of 3: mounts %+v, want none", i+1, mounts)
			}
		})
		mounts, _ := f.calls()
		if len(mounts) != 1 || len(mounts[0].layers) != 2 {
			t.Fatalf("after the pull: mounts %+v, want one of the two layers", mounts)
		}
		if got := filepath.Base(f.traces[0]); got != traceFile {
			t.Fatalf("the pull's attach took trace %q, want the acceleration layer's", f.traces[0])
		}
		if mounted, err := mountinfo.Mounted(mounts[0].target); err != nil || !mounted {
			t.Fatalf("image not mounted at %s after the pull (%v)", mounts[0].target, err)
		}
		// The container's prepare finds the image there, at the same mountpoint.
		if _, err := sn.Prepare(context.Background(), "c1", accel); err != nil {
			t.Fatal(err)
		}
		if mounts, _ := f.calls(); len(mounts) != 2 || mounts[1].target != mounts[0].target || mounts[1].id != mounts[0].id {
			t.Fatalf("the container's attach %+v is not the pull's", mounts)
		}
		// A container that records the start: while c1 uses the image, the labels are not taken (as upstream); once
		// it is gone, the image is attached again for the recording.
		rec := func(key string) string {
			t.Helper()
			path := filepath.Join(t.TempDir(), key+".trace")
			labels := map[string]string{LabelRecordTrace: "yes", LabelRecordTracePath: path}
			if _, err := sn.Prepare(context.Background(), key, accel, snapshots.WithLabels(labels)); err != nil {
				t.Fatal(err)
			}
			return path
		}
		rec("rec1")
		if _, unmounts := f.calls(); len(unmounts) != 0 {
			t.Fatalf("the image was unmounted while c1 used it: %+v", unmounts)
		}
		for _, key := range []string{"rec1", "c1"} {
			if err := sn.Remove(context.Background(), key); err != nil {
				t.Fatal(err)
			}
		}
		path := rec("rec2")
		mounts, unmounts := f.calls()
		if len(unmounts) != 1 || unmounts[0].target != mounts[0].target {
			t.Fatalf("unmounts %+v: want the unused image's", unmounts)
		}
		if last := f.traces[len(f.traces)-1]; last != path {
			t.Fatalf("the attach for recording took trace %q, want %q", last, path)
		}
	})
	t.Run("off", func(t *testing.T) {
		f := &traceMounter{}
		sn, _ := openSnapshotter(t, f, WithAttachOnPull(false))
		pull(t, sn, func(int) {})
		if mounts, _ := f.calls(); len(mounts) != 0 {
			t.Fatalf("after the pull: mounts %+v, want none", mounts)
		}
	})
}

// hangingMounter's Mount waits for its context: an attach from a registry that does not answer.
type hangingMounter struct {
	fakeMounter
	entered chan struct{}
}

func (f *hangingMounter) Mount(ctx context.Context, id string, layers []Layer, target string) error {
	close(f.entered)
	<-ctx.Done()
	return ctx.Err()
}

// Removing an image stops the attach its pull started, instead of waiting for it.
func TestRemoveStopsPullAttach(t *testing.T) {
	testenv.Root(t)
	f := &hangingMounter{entered: make(chan struct{})}
	sn, _ := openSnapshotter(t, f, WithAttachOnPull(true))
	ctx := context.Background()
	const top = "sha256:00000000000000000000000000000000000000000000000000000000000000c1"
	labels := remoteLabels(top, digest.FromString(top), 4096, "registry.test/app:v1")
	labels[LabelCRILayerDigest], labels[LabelCRIImageLayers] = top, top
	if _, err := sn.Prepare(ctx, "extract", "", snapshots.WithLabels(labels)); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of the remote layer: %v", err)
	}
	<-f.entered
	done := make(chan error, 1)
	go func() { done <- sn.Remove(ctx, top) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Remove waited for the attach the pull started")
	}
	sn.pulled.Wait()
}
