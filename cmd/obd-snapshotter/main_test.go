package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/obdproject/obd/internal/device"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/node"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/internal/testenv"
)

// TestMain lets the daemon run in this test binary start its device holder process (this binary again).
func TestMain(m *testing.M) {
	device.RunHolderIfAsked()
	os.Exit(m.Run())
}

// TestDaemon runs the command as main does, with a config file and flag overrides, talks to it through
// containerd's snapshots proxy and shuts it down.
func TestDaemon(t *testing.T) {
	testenv.Root(t) // overlayfs mounts
	// A short directory: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "obd-d-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		testenv.UnmountUnder(t, dir)
		os.RemoveAll(dir)
	})
	cfgPath := filepath.Join(dir, "obd.toml")
	address := filepath.Join(dir, "run", "sn.sock")
	cfg := fmt.Sprintf("[snapshotter]\nroot = %q\naddress = %q\n[cache]\ndir = %q\n[registry]\nretry_budget = \"1s\"\n[metrics]\naddress = \"127.0.0.1:0\"\n",
		filepath.Join(dir, "not-this-root"), address, filepath.Join(dir, "cache"))
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	// A stale socket from a crashed daemon.
	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := newRootCmd()
	root := filepath.Join(dir, "root")
	cmd.SetArgs([]string{"--config", cfgPath, "--root", root, "--log-level", "warn"})
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	testenv.WaitSocket(t, address, done)

	fi, err := os.Stat(address)
	if err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket %v, %v: want mode 0660", fi, err)
	}
	if _, err := os.Stat(filepath.Join(root, "metadata.db")); err != nil {
		t.Errorf("--root did not override the config: %v", err)
	}

	conn, err := grpc.NewClient("unix://"+address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), snapshotter.Name)
	if _, err := sn.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "A", "a"); err != nil {
		t.Fatal(err)
	}
	if ms, err := sn.Prepare(ctx, "b", "A"); err != nil || len(ms) != 1 || ms[0].Type != "overlay" {
		t.Errorf("Prepare over a normal layer: %+v, %v", ms, err)
	}

	// An overlaybd image pulls; a container of it fails within the retry budget when its registry is unreachable.
	_, err = sn.Prepare(ctx, "extract-L", "", snapshots.WithLabels(map[string]string{
		snapshotter.LabelTargetRef:   "L",
		image.AnnotationBlobDigest:   digest.FromString("L").String(),
		image.AnnotationBlobSize:     "1",
		snapshotter.LabelCRIImageRef: "registry.test/app:v1",
	}))
	if !errdefs.IsAlreadyExists(err) {
		t.Errorf("Prepare of a remote layer through gRPC: %v, want AlreadyExists", err)
	}
	if _, err := sn.Prepare(ctx, "c", "L"); err == nil || !strings.Contains(err.Error(), "registry.test") {
		t.Errorf("Prepare over an overlaybd image: %v", err)
	}
	if err := sn.Remove(ctx, "L"); err != nil {
		t.Errorf("Remove of an overlaybd layer whose mount failed: %v", err)
	}

	// The status endpoint next to the socket: health, status and metrics of the calls above.
	sc := status.NewClient(filepath.Join(dir, "run", "sn.status.sock"), 5*time.Second)
	if err := sc.Healthz(ctx); err != nil {
		t.Errorf("healthz: %v", err)
	}
	st, err := sc.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Config.Root != root || st.Config.Address != address || st.Cache.CapacityBytes != 4<<30 || st.PID != os.Getpid() {
		t.Errorf("status %+v: want the daemon's configuration", st)
	}
	var normal *status.Image
	for i, img := range st.Images {
		if img.Mode == status.ModeOverlayfs {
			normal = &st.Images[i]
		}
	}
	if normal == nil || !slices.Contains(normal.Snapshots, "b") || normal.Reason == "" {
		t.Errorf("status images %+v: want snapshot b over a normal image, with a reason", st.Images)
	}
	metrics, err := sc.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`obd_grpc_requests_total{method="Prepare"} 4`, `obd_grpc_errors_total{code="AlreadyExists",method="Prepare"} 1`,
		"obd_cache_capacity_bytes 4.294967296e+09", "obd_build_info{"} {
		if !strings.Contains(string(metrics), want) {
			t.Errorf("metrics lack %q", want)
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("daemon: %v", err)
		}
	case <-time.After(node.StopGrace + 5*time.Second):
		t.Fatal("daemon did not stop")
	}
	if _, err := os.Stat(address); !os.IsNotExist(err) {
		t.Errorf("socket left after shutdown: %v", err)
	}
	if err := sc.Healthz(context.Background()); !errors.Is(err, status.ErrNotRunning) {
		t.Errorf("healthz after shutdown: %v, want ErrNotRunning", err)
	}
}
