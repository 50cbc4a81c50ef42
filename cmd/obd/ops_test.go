package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/internal/testenv"
)

// runOpsCmd runs the obd command line in-process and returns its stdout.
func runOpsCmd(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	root := newRootCmd()
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&errOut)
	err := root.ExecuteContext(t.Context())
	return out.String(), err
}

// fakeDaemon serves st as obd-snapshotter's status endpoint on a unix socket under dir.
func fakeDaemon(t *testing.T, dir string, st status.Status) string {
	t.Helper()
	socket := filepath.Join(dir, "sn.status.sock")
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) { json.NewEncoder(w).Encode(st) })
	testenv.ServeUnix(t, socket, mux)
	return socket
}

func TestStatusCommand(t *testing.T) {
	dir := testenv.SocketDir(t)
	ratio := 0.75
	st := status.Status{
		Version: "v1.2.3", PID: 7, UptimeSeconds: 3600,
		Config: status.Config{File: "/etc/obd/obd.toml", Address: "/run/obd/snapshotter.sock", StatusAddress: "/run/obd/snapshotter.status.sock",
			MetricsAddress: "127.0.0.1:9864", SlowReadMS: 500},
		Cache: status.Cache{Dir: "/var/lib/obd/cache", UsedBytes: 3 << 20, CapacityBytes: 4 << 30, Blobs: 2, Hits: 3, Misses: 1},
		Reads: status.Reads{Total: 100},
		Images: []status.Image{
			{ID: "12", ImageRef: "registry.test/app:obd", Mode: status.ModeLazy, State: status.StateAttached,
				Reason: "overlaybd layers are read from the registry on demand", BytesFetched: 5 << 20, CacheHitRatio: &ratio,
				Layers: []status.Layer{{Digest: "sha256:aa", Source: "remote"}, {Digest: "sha256:bb", Source: "remote"}}, Snapshots: []string{"c1"}, Reads: 40},
			{ID: "sha256:n0", ImageRef: "registry.test/plain:v1", Mode: status.ModeOverlayfs, State: status.StateNone,
				Reason: "a normal image: served by overlayfs", Snapshots: []string{"c2"}},
			{ID: "13", ImageRef: "registry.test/bad:obd", Mode: status.ModeLazy, State: status.StateFailed, Reason: "read on demand",
				Error: "layer sha256:cc: 401 unauthorized — run 'obd login registry.test'"},
		},
	}
	socket := fakeDaemon(t, dir, st)

	for _, cmd := range []string{"status", "images"} {
		out, err := runOpsCmd(t, cmd, "--socket", socket)
		if err != nil {
			t.Fatalf("obd %s: %v", cmd, err)
		}
		for _, want := range []string{"obd-snapshotter v1.2.3 (pid 7), up 1h0m0s", "3.0 MiB of 4.0 GiB", "hit ratio 75.0%",
			"registry.test/app:obd", "lazy", "attached", "2 remote", "5.0 MiB", "75.0%",
			"registry.test/plain:v1", "overlayfs", "sha256:n0: a normal image: served by overlayfs",
			"13: error: layer sha256:cc: 401 unauthorized"} {
			if !strings.Contains(out, want) {
				t.Errorf("obd %s printed\n%s\nwithout %q", cmd, out, want)
			}
		}
	}

	out, err := runOpsCmd(t, "status", "--json", "--socket", socket)
	if err != nil {
		t.Fatal(err)
	}
	var got status.Status
	if err := json.Unmarshal([]byte(out), &got); err != nil || len(got.Images) != 3 || got.Images[0].BytesFetched != 5<<20 {
		t.Errorf("obd status --json: %v\n%s", err, out)
	}
}

func TestStatusCommandDaemonDown(t *testing.T) {
	dir := testenv.SocketDir(t)
	missing := filepath.Join(dir, "missing.sock")
	_, err := runOpsCmd(t, "status", "--socket", missing)
	if !errors.Is(err, status.ErrNotRunning) || !strings.Contains(err.Error(), missing) || !strings.Contains(err.Error(), "systemctl start obd-snapshotter") {
		t.Errorf("obd status without a daemon: %v; want it to name the socket and how to start the daemon", err)
	}

	// A socket left by a daemon that was killed.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := runOpsCmd(t, "status", "--socket", stale); !errors.Is(err, status.ErrNotRunning) || !strings.Contains(err.Error(), "stopped") {
		t.Errorf("obd status with a stale socket: %v", err)
	}

	// The socket comes from obd.toml.
	cfg := filepath.Join(dir, "obd.toml")
	if err := os.WriteFile(cfg, []byte("[snapshotter]\naddress = \""+filepath.Join(dir, "x.sock")+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := runOpsCmd(t, "status", "--config", cfg); err == nil || !strings.Contains(err.Error(), filepath.Join(dir, "x.status.sock")) {
		t.Errorf("obd status --config: %v; want the status socket named after snapshotter.address", err)
	}
	if err := os.WriteFile(cfg, []byte("[cache]\nsize_gb = -1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := runOpsCmd(t, "status", "--config", cfg); err == nil || !strings.Contains(err.Error(), "cache.size_gb") || !strings.Contains(err.Error(), "--socket") {
		t.Errorf("obd status with an invalid config: %v", err)
	}
}

func TestHealthCommand(t *testing.T) {
	dir := testenv.SocketDir(t)
	fss := filepath.Join(dir, "filesystems")
	if err := os.WriteFile(fss, []byte("\text4\nnodev\tfuse\nnodev\toverlay\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "obd.toml")
	if err := os.WriteFile(cfg, []byte("[snapshotter]\naddress = \""+filepath.Join(dir, "sn.sock")+"\"\n[cache]\ndir = \""+filepath.Join(dir, "cache")+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	common := []string{"--config", cfg, "--proc-filesystems", fss, "--dev-fuse", "/dev/null", "--loop-control", "/dev/null",
		"--containerd-config", filepath.Join(dir, "containerd.toml"), "--containerd-address", filepath.Join(dir, "c.sock"),
		"--credentials", filepath.Join(dir, "creds.json"), "--min-free", "1", "--timeout", "1s"}

	out, err := runOpsCmd(t, append([]string{"health"}, common...)...)
	if !errors.Is(err, errUnhealthy) || !strings.Contains(err.Error(), "4 of 12 checks failed") {
		t.Errorf("obd health on a node without daemons: %v", err)
	}
	for _, want := range []string{"OK    kernel: FUSE", "FAIL  snapshotter socket", "fix: start obd-snapshotter", "FAIL  containerd config",
		"fix: run 'obd install'", "SKIP  devices", "4 failed, 1 skipped"} {
		if !strings.Contains(out, want) {
			t.Errorf("obd health printed\n%s\nwithout %q", out, want)
		}
	}
	if strings.Contains(out, "· ") {
		t.Error("obd health without -v printed details")
	}
	out, _ = runOpsCmd(t, append([]string{"health", "-v"}, common...)...)
	if !strings.Contains(out, "· "+fss) {
		t.Errorf("obd health -v printed no details:\n%s", out)
	}

	out, _ = runOpsCmd(t, append([]string{"health", "--json"}, common...)...)
	var results []struct{ Check, Level, Message, Fix string }
	if err := json.Unmarshal([]byte(out), &results); err != nil || len(results) != 12 || results[0].Level != "OK" {
		t.Errorf("obd health --json: %v\n%s", err, out)
	}

	// With containerd's registration and the daemon's status endpoint answering, only containerd itself fails.
	socket := fakeDaemon(t, dir, status.Status{Version: "v1", Images: []status.Image{{ID: "1", ImageRef: "r/a:obd", Mode: status.ModeLazy, State: status.StateAttached}}})
	if err := os.WriteFile(filepath.Join(dir, "containerd.toml"), []byte("version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[proxy_plugins.overlaybd]\ntype = \"snapshot\"\naddress = \""+socket+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = runOpsCmd(t, append([]string{"health", "--socket", socket, "--snapshotter-address", socket}, common...)...)
	if err == nil || !strings.Contains(err.Error(), "1 of 12 checks failed") || !regexp.MustCompile(`(?m)^OK +devices +1 lazy$`).MatchString(out) {
		t.Errorf("obd health with a daemon: %v\n%s", err, out)
	}
}
