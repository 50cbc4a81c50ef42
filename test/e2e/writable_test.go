package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/sandbox"
	"github.com/obdproject/obd/internal/snapshotter"
)

// TestWritableContainer runs containers with a writable block layer (rw_mode dir, by label) through containerd and
// runc: the container writes, renames, hard-links, deletes and syncs; a new task of the same container sees it all;
// 'obd commit' pushes them as an overlaybd layer (and squashed, as a single-layer image) while the container keeps
// them; a fresh node pulls the committed images lazily and sees exactly the committed filesystem (tree compare); a
// dev-mode snapshot is a block device that a process outside any container mounts and reads.
func TestWritableContainer(t *testing.T) {
	sb := startSandbox(t)
	ctx := context.Background()
	src := filepath.Join(t.TempDir(), "src")
	appImage(t, src)
	plain := sb.Registry + "/app:v1"
	lazy := sb.Registry + "/app:obd"
	pushLayout(t, src, "v1", plain)
	obd(t, sb, "convert", "--vsize", "8", plain, lazy)
	obd(t, sb, "pull", lazy)
	const dirLabel = "containerd.io/snapshot/overlaybd.writable=dir"

	// First task: write; later tasks of the same container (same snapshot): show what is there.
	script := "B=/bin/busybox; if [ -e /moved.txt ]; then cat /moved.txt /linked.txt /d/e/f /app/data.txt; $B stat -c %h /moved.txt; " +
		"$B ls /app/big.bin 2>/dev/null || echo big gone; else echo written > /new.txt && $B mv /new.txt /moved.txt && " +
		"$B ln /moved.txt /linked.txt && $B rm /app/big.bin && $B mkdir -p /d/e && echo deep > /d/e/f && $B sync && echo wrote; fi"
	out := run(t, sb.Ctr(ctx, "run", "--snapshotter", "overlaybd", "--snapshotter-label", dirLabel, lazy, "w1", "/bin/sh", "-c", script))
	if out != "wrote\n" {
		t.Fatalf("writing container printed %q", out)
	}
	// The container's root is the image's own filesystem, mounted read-write.
	mounts := run(t, sb.Ctr(ctx, "snapshots", "--snapshotter", "overlaybd", "mounts", "/mnt", "w1"))
	if !strings.Contains(mounts, "bind") || !strings.Contains(mounts, "/block/mountpoint") {
		t.Fatalf("mounts of the container's snapshot: %s", mounts)
	}
	const kept = "written\nwritten\ndeep\ndata from layer 2\n2\nbig gone\n"
	if out := run(t, sb.Ctr(ctx, "task", "start", "w1")); out != kept {
		t.Errorf("second task of the container printed %q, want %q", out, kept)
	}
	// obd status shows the container's writable layer.
	if st := obd(t, sb, "status", "--socket", sb.StatusSocket); !strings.Contains(st, "/w1 (dir), attached: ") {
		t.Errorf("obd status does not show w1's writable layer:\n%s", st)
	}
	// After a restart of the snapshotter, the layer is attached again with everything in it.
	if err := sb.KillSnapshotter(); err != nil {
		t.Fatal(err)
	}
	if err := sb.StartSnapshotter(ctx); err != nil {
		t.Fatal(err)
	}
	restarted, err := ctrAfterRestart(ctx, sb, "task", "start", "w1")
	if err != nil || string(restarted) != kept {
		t.Errorf("task after a snapshotter restart printed %q (%v), want %q", restarted, err, kept)
	}
	// Another container starts from the image, not from w1's writes.
	if out := run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", "--snapshotter-label", dirLabel, lazy, "w2", "/bin/sh", "-c", "cat /moved.txt 2>/dev/null || echo fresh")); out != "fresh\n" {
		t.Errorf("a new container sees another's writes: %q", out)
	}

	// obd commit: the stopped container's writable layer becomes an overlaybd layer on top of the image's, pushed;
	// the container keeps its files (a new writable layer over the committed one).
	info := run(t, sb.Ctr(ctx, "snapshots", "--snapshotter", "overlaybd", "info", "w1"))
	var si struct{ Parent string }
	if err := json.Unmarshal([]byte(info), &si); err != nil || si.Parent == "" {
		t.Fatalf("snapshot info %s: %v", info, err)
	}
	committed, squashed := sb.Registry+"/app:committed", sb.Registry+"/app:squashed"
	t.Log(obd(t, sb, "commit", "w1", committed, "--push"))
	if out := run(t, sb.Ctr(ctx, "task", "start", "w1")); out != kept {
		t.Errorf("task of the committed container printed %q, want %q", out, kept)
	}
	info = run(t, sb.Ctr(ctx, "snapshots", "--snapshotter", "overlaybd", "info", "w1"))
	var after struct{ Parent string }
	if err := json.Unmarshal([]byte(info), &after); err != nil || after.Parent == "" || after.Parent == si.Parent {
		t.Fatalf("snapshot info after commit %s: %v", info, err)
	}
	c, nctx := leasedClient(t, sb)
	sns := c.SnapshotService(snapshotter.Name)
	ms, err := sns.View(nctx, "w1-view", after.Parent)
	if err != nil {
		t.Fatal(err)
	}
	viewDir := t.TempDir()
	if err := mount.All(ms, viewDir); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(viewDir, unix.MNT_DETACH)
	for name, want := range map[string]string{"moved.txt": "written\n", "linked.txt": "written\n", "d/e/f": "deep\n", "app/data.txt": "data from layer 2\n"} {
		if b, err := os.ReadFile(filepath.Join(viewDir, name)); err != nil || string(b) != want {
			t.Errorf("committed layer: %s: %q, %v", name, b, err)
		}
	}
	if _, err := os.Stat(filepath.Join(viewDir, "app", "big.bin")); !os.IsNotExist(err) {
		t.Errorf("committed layer: deleted app/big.bin: %v", err)
	}
	want := treeOf(t, viewDir)
	if err := unix.Unmount(viewDir, 0); err != nil {
		t.Fatal(err)
	}
	// Committed again, squashed: one layer holding the base image and both commits (the second adds nothing).
	t.Log(obd(t, sb, "commit", "w1", squashed, "--push", "--squash"))

	// A fresh node pulls the committed images lazily: its containers see exactly the committed filesystem.
	sb2 := startSandbox(t)
	c2, ctx2 := leasedClient(t, sb2)
	for i, ref := range []string{committed, squashed} {
		obd(t, sb2, "pull", ref)
		if out := run(t, sb2.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", ref, "fresh"+strconv.Itoa(i), "/bin/sh", "-c", script)); out != kept {
			t.Errorf("%s on a fresh node printed %q, want %q", ref, out, kept)
		}
		img, err := c2.GetImage(ctx2, ref)
		if err != nil {
			t.Fatal(err)
		}
		diffIDs, err := img.RootFS(ctx2)
		if err != nil {
			t.Fatal(err)
		}
		if n := map[string]int{committed: 4, squashed: 1}[ref]; len(diffIDs) != n {
			t.Errorf("%s has %d layers, want %d", ref, len(diffIDs), n)
		}
		got := viewTree(t, ctx2, c2.SnapshotService(snapshotter.Name), "tree"+strconv.Itoa(i), identity.ChainID(diffIDs).String())
		if d := diffTrees(want, got); d != "" {
			t.Errorf("%s on a fresh node differs from the committed container's filesystem:\n%s", ref, d)
		}
	}

	// Dev mode: the snapshot's mount is the block device itself, which a process outside any container (a VM
	// monitor) mounts.
	ms, err = sns.Prepare(nctx, "dev1", si.Parent, snapshots.WithLabels(map[string]string{snapshotter.LabelWritable: snapshotter.RWDev}))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].Type != "ext4" || !strings.HasPrefix(ms[0].Source, "/dev/loop") {
		t.Fatalf("mounts of a dev-mode snapshot: %+v", ms)
	}
	devDir := t.TempDir()
	if err := mount.All(ms, devDir); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(devDir, "etc", "motd"))
	if uerr := unix.Unmount(devDir, 0); uerr != nil {
		t.Error(uerr)
	}
	if err != nil || string(b) != "motd from layer 1\n" {
		t.Errorf("reading the dev-mode device's filesystem: %q, %v", b, err)
	}
	if err := sns.Remove(nctx, "dev1"); err != nil {
		t.Error(err)
	}
}

// leasedClient returns a client of sb's containerd and a context in sb's namespace that holds a lease, both
// released when the test ends: snapshots a test makes directly are otherwise garbage that containerd's collector may
// remove at any moment.
func leasedClient(t *testing.T, sb *sandbox.Sandbox) (*client.Client, context.Context) {
	t.Helper()
	c, err := client.New(sb.Containerd)
	if err != nil {
		t.Fatal(err)
	}
	ctx, release, err := c.WithLease(namespaces.WithNamespace(context.Background(), sb.Namespace))
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = release(context.WithoutCancel(ctx))
		c.Close()
	})
	return c, ctx
}

// treeOf describes every file under root: type and mode, owner, size, link count, mtime, content digest or link
// target.
func treeOf(t *testing.T, root string) map[string]string {
	t.Helper()
	tree := map[string]string{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return err
		}
		desc := fmt.Sprintf("mode %o uid %d gid %d nlink %d mtime %d.%09d", st.Mode, st.Uid, st.Gid, st.Nlink, st.Mtim.Sec, st.Mtim.Nsec)
		switch {
		case d.Type().IsRegular():
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" size %d %s", len(b), digest.FromBytes(b))
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(path)
			if err != nil {
				return err
			}
			desc += " -> " + target
		}
		rel, _ := filepath.Rel(root, path)
		tree[rel] = desc
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return tree
}

// viewTree mounts a view of the committed snapshot parent and describes its files (treeOf).
func viewTree(t *testing.T, ctx context.Context, sns snapshots.Snapshotter, key, parent string) map[string]string {
	t.Helper()
	ms, err := sns.View(ctx, key, parent)
	if err != nil {
		t.Fatal(err)
	}
	defer sns.Remove(ctx, key)
	dir := t.TempDir()
	if err := mount.All(ms, dir); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(dir, unix.MNT_DETACH)
	return treeOf(t, dir)
}

// diffTrees lists the differences of two trees, "" when there are none.
func diffTrees(want, got map[string]string) string {
	var out []string
	for p, w := range want {
		if g, ok := got[p]; !ok {
			out = append(out, "missing "+p)
		} else if g != w {
			out = append(out, fmt.Sprintf("%s: %s, want %s", p, g, w))
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			out = append(out, "extra "+p)
		}
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}
