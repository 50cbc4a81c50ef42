package e2e

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/snapshotter"
)

// TestWritableContainer runs containers with a writable block layer (rw_mode dir, by label) through containerd and
// runc: the container writes, renames, hard-links, deletes and syncs; a new task of the same container sees it all;
// the committed snapshot is an overlaybd layer whose view shows exactly those changes; a dev-mode snapshot is a block
// device that a process outside any container mounts and reads.
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

	// Commit the stopped container's snapshot: an overlaybd layer on top of the image's.
	info := run(t, sb.Ctr(ctx, "snapshots", "--snapshotter", "overlaybd", "info", "w1"))
	var si struct{ Parent string }
	if err := json.Unmarshal([]byte(info), &si); err != nil || si.Parent == "" {
		t.Fatalf("snapshot info %s: %v", info, err)
	}
	run(t, sb.Ctr(ctx, "snapshots", "--snapshotter", "overlaybd", "commit", "w1-committed", "w1"))
	run(t, sb.Ctr(ctx, "snapshots", "--snapshotter", "overlaybd", "view", "w1-view", "w1-committed"))
	viewDir := t.TempDir()
	mountSnapshot(t, sb.Ctr(ctx, "snapshots", "--snapshotter", "overlaybd", "mounts", viewDir, "w1-view"))
	defer unix.Unmount(viewDir, unix.MNT_DETACH)
	for name, want := range map[string]string{"moved.txt": "written\n", "linked.txt": "written\n", "d/e/f": "deep\n", "app/data.txt": "data from layer 2\n"} {
		if b, err := os.ReadFile(filepath.Join(viewDir, name)); err != nil || string(b) != want {
			t.Errorf("committed layer: %s: %q, %v", name, b, err)
		}
	}
	if _, err := os.Stat(filepath.Join(viewDir, "app", "big.bin")); !os.IsNotExist(err) {
		t.Errorf("committed layer: deleted app/big.bin: %v", err)
	}
	if err := unix.Unmount(viewDir, 0); err != nil {
		t.Fatal(err)
	}

	// Dev mode: the snapshot's mount is the block device itself, which a process outside any container (a VM
	// monitor) mounts.
	c, err := client.New(sb.Containerd)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	nctx := namespaces.WithNamespace(ctx, sb.Namespace)
	sns := c.SnapshotService(snapshotter.Name)
	ms, err := sns.Prepare(nctx, "dev1", si.Parent, snapshots.WithLabels(map[string]string{snapshotter.LabelWritable: snapshotter.RWDev}))
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

// mountSnapshot runs the mount command 'ctr snapshots mounts' prints.
func mountSnapshot(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	line := strings.TrimSpace(run(t, cmd))
	args := strings.Fields(line)
	if len(args) < 2 || args[0] != "mount" {
		t.Fatalf("mount command %q", line)
	}
	run(t, exec.Command(args[0], args[1:]...))
}
