package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/testenv"
)

// fakeWritable is a fakeMounter whose writable layers are tmpfs mounts (dir mode) or a named device (dev mode); a
// sealed layer is an LSMT magic followed by the id.
type fakeWritable struct {
	fakeMounter
	mu       sync.Mutex
	writable []string // "id mode quota" of each MountWritable
	sealed   []string // dst of each SealWritable
}

func (f *fakeWritable) MountWritable(_ context.Context, id string, layers []Layer, traceFile string, w WritableLayer, target string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	mode := RWDev
	if target != "" {
		mode = RWDir
		if err := os.MkdirAll(target, 0o755); err != nil {
			return "", err
		}
		if mounted, err := mountinfo.Mounted(target); err != nil {
			return "", err
		} else if !mounted {
			if err := unix.Mount("tmpfs", target, "tmpfs", 0, "size=1m"); err != nil {
				return "", err
			}
		}
	}
	f.writable = append(f.writable, strings.Join([]string{id, mode, w.Dir, strconv.FormatInt(w.Quota, 10)}, " "))
	return "/dev/fake-" + id, nil
}

func (f *fakeWritable) SealWritable(ctx context.Context, id string, layers []Layer, w WritableLayer, dst string) error {
	f.mu.Lock()
	f.sealed = append(f.sealed, dst)
	f.mu.Unlock()
	if err := f.Unmount(ctx, id, filepath.Join(w.Dir, "mountpoint")); err != nil {
		return err
	}
	return os.WriteFile(dst, append(append([]byte(nil), lsmtMagic...), id...), 0o644)
}

func TestWritableModes(t *testing.T) {
	testenv.Root(t)
	f := &fakeWritable{}
	sn, _ := openSnapshotter(t, f, WithWritable(RWDir, 1<<30))
	ctx := context.Background()
	pullRemote(t, ctx, sn, "layer-1", "", "registry.test/app:1")

	// The node's mode and quota.
	ms, err := sn.Prepare(ctx, "c-dir", "layer-1")
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].Type != "bind" || !strings.HasSuffix(ms[0].Source, "/block/mountpoint") {
		t.Fatalf("dir mode mounts %+v", ms)
	}
	info, err := sn.Stat(ctx, "c-dir")
	if err != nil || info.Labels[LabelWritable] != RWDir || info.Labels[LabelDiskQuota] != "1073741824" {
		t.Fatalf("dir snapshot labels %v, %v", info.Labels, err)
	}
	// Labels choose per container.
	ms, err = sn.Prepare(ctx, "c-dev", "layer-1", snapshots.WithLabels(map[string]string{LabelWritable: RWDev, LabelDiskQuota: "10m"}))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].Type != "ext4" || !strings.HasPrefix(ms[0].Source, "/dev/fake-") {
		t.Fatalf("dev mode mounts %+v", ms)
	}
	ms, err = sn.Prepare(ctx, "c-ovl", "layer-1", snapshots.WithLabels(map[string]string{LabelWritable: RWOverlayfs}))
	if err != nil || len(ms) != 1 || ms[0].Type != "overlay" {
		t.Fatalf("overlayfs mode mounts %+v, %v", ms, err)
	}
	if _, err := sn.Prepare(ctx, "c-bad", "layer-1", snapshots.WithLabels(map[string]string{LabelWritable: "rw"})); err == nil || !strings.Contains(err.Error(), LabelWritable) {
		t.Errorf("unknown mode: %v", err)
	}
	if _, err := sn.Prepare(ctx, "c-bad", "layer-1", snapshots.WithLabels(map[string]string{LabelDiskQuota: "much"})); err == nil || !strings.Contains(err.Error(), LabelDiskQuota) {
		t.Errorf("bad quota: %v", err)
	}
	// Views stay read-only image mounts.
	if ms, err := sn.View(ctx, "v", "layer-1"); err != nil || ms[0].Type != "bind" || !strings.Contains(strings.Join(ms[0].Options, ","), "ro") {
		t.Errorf("view %+v, %v", ms, err)
	}
	f.mu.Lock()
	got := strings.Join(f.writable, "\n")
	f.mu.Unlock()
	if !strings.Contains(got, " dir ") || !strings.Contains(got, " 1073741824") || !strings.Contains(got, " dev ") || !strings.Contains(got, " 10485760") {
		t.Errorf("MountWritable calls:\n%s", got)
	}

	// Mounts attaches again; Usage counts the layer's files.
	if ms, err := sn.Mounts(ctx, "c-dir"); err != nil || ms[0].Type != "bind" {
		t.Errorf("Mounts %+v, %v", ms, err)
	}
	dirInfo := strings.Fields(f.writable[0])
	if err := os.WriteFile(filepath.Join(dirInfo[2], WritableDataFile), make([]byte, 8192), 0o600); err != nil {
		t.Fatal(err)
	}
	if u, err := sn.Usage(ctx, "c-dir"); err != nil || u.Size < 8192 {
		t.Errorf("usage %+v, %v", u, err)
	}
	// Status lists both writable layers under their image, with their modes and what they hold.
	sts, err := sn.Status(ctx)
	if err != nil || len(sts) != 1 || len(sts[0].Writable) != 2 {
		t.Fatalf("status %+v, %v", sts, err)
	}
	if w := sts[0].Writable; w[0].Key != "c-dev" || w[0].Mode != RWDev || w[1].Key != "c-dir" || w[1].Mode != RWDir ||
		w[1].Bytes < 8192 || w[1].Quota != 1<<30 || w[1].MountID == "" {
		t.Errorf("writable layers in status: %+v", w)
	}

	// Commit seals the layer into an overlaybd layer that containers stack on.
	if err := sn.Commit(ctx, "committed", "c-dir"); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	sealed := f.sealed
	f.mu.Unlock()
	if len(sealed) != 1 || filepath.Base(sealed[0]) != commitFile {
		t.Fatalf("sealed %v", sealed)
	}
	plan, err := sn.planChain(ctx, "committed")
	if err != nil || plan == nil || len(plan.layers) != 2 || plan.layers[1].LocalPath != sealed[0] {
		t.Fatalf("chain over the committed layer: %+v, %v", plan, err)
	}
	if info, err := sn.Stat(ctx, "committed"); err != nil || info.Labels[LabelLocalCommitPath] != sealed[0] {
		t.Errorf("committed snapshot's labels %v, %v: want %s=%s", info.Labels, err, LabelLocalCommitPath, sealed[0])
	}

	// Remove detaches the dev layer.
	if err := sn.Remove(ctx, "c-dev"); err != nil {
		t.Fatal(err)
	}
	_, unmounts := f.calls()
	if len(unmounts) == 0 || unmounts[len(unmounts)-1].target != "" {
		t.Errorf("unmounts %+v", unmounts)
	}
}
