package health

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/internal/testenv"
)

func write(t *testing.T, path, content string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// wantResult checks a result's level, that its message says want and, when not OK, that it has a fix saying fix.
func wantResult(t *testing.T, r Result, level Level, want, fix string) {
	t.Helper()
	if r.Level != level || !strings.Contains(r.Message, want) {
		t.Errorf("%s: %s %q; want %s and a message with %q", r.Check, r.Level, r.Message, level, want)
	}
	if level >= Warn && (r.Fix == "" || !strings.Contains(r.Fix, fix)) {
		t.Errorf("%s: fix %q; want one that says %q", r.Check, r.Fix, fix)
	}
}

func TestKernel(t *testing.T) {
	dir := t.TempDir()
	all := write(t, filepath.Join(dir, "all"), "nodev\tsysfs\n\text4\nnodev\tfuse\nnodev\toverlay\n")
	none := write(t, filepath.Join(dir, "none"), "nodev\tsysfs\n")
	notDev := write(t, filepath.Join(dir, "fuse"), "")
	missing := filepath.Join(dir, "missing")
	// /dev/null is a character device everywhere: it stands in for /dev/fuse and /dev/loop-control.
	ok := checkKernel(Options{ProcFilesystems: all, DevFuse: "/dev/null", LoopControl: "/dev/null"})
	if len(ok) != 4 || Worst(ok) != OK {
		t.Errorf("all present: %+v", ok)
	}

	bad := checkKernel(Options{ProcFilesystems: none, DevFuse: missing, LoopControl: notDev})
	wantResult(t, bad[0], Fail, "no FUSE", "modprobe fuse")
	wantResult(t, bad[1], Fail, "not a character device", "modprobe loop")
	wantResult(t, bad[2], Warn, `"ext4" is not registered`, "modprobe ext4")
	wantResult(t, bad[3], Warn, `"overlay" is not registered`, "modprobe overlay")

	noDev := checkKernel(Options{ProcFilesystems: all, DevFuse: missing, LoopControl: "/dev/null"})
	wantResult(t, noDev[0], Fail, "the kernel has FUSE", "mknod")

	noProc := checkKernel(Options{ProcFilesystems: missing})
	wantResult(t, noProc[0], Fail, "cannot read", "/proc")
}

func TestConfig(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.toml")
	r, cfg := checkConfig(missing, false)
	wantResult(t, r, OK, "the defaults apply", "")
	if cfg.Cache.SizeGB == 0 {
		t.Errorf("defaults not returned: %+v", cfg)
	}
	r, _ = checkConfig(missing, true)
	wantResult(t, r, Fail, missing, missing)

	invalid := write(t, filepath.Join(dir, "invalid.toml"), "[cache]\nsize_gb = 0\n")
	r, cfg = checkConfig(invalid, true)
	wantResult(t, r, Fail, "cache.size_gb = 0", "fix "+invalid)
	if cfg.Snapshotter.Address == "" {
		t.Error("a broken config gives no defaults for the other checks")
	}
	broken := write(t, filepath.Join(dir, "broken.toml"), "[snapshotter\n")
	r, _ = checkConfig(broken, true)
	wantResult(t, r, Fail, broken, "fix "+broken)

	typo := write(t, filepath.Join(dir, "typo.toml"), "[metrics]\nadress = \"127.0.0.1:1\"\n")
	r, _ = checkConfig(typo, true)
	wantResult(t, r, Warn, "unknown key metrics.adress", "remove or correct")

	good := write(t, filepath.Join(dir, "good.toml"), "[snapshotter]\naddress = \"/x/sn.sock\"\n[metrics]\naddress = \"\"\n")
	r, cfg = checkConfig(good, true)
	wantResult(t, r, OK, "is valid", "")
	if cfg.Snapshotter.StatusSocket() != "/x/sn.status.sock" || cfg.Metrics.Address != "" {
		t.Errorf("config %+v", cfg)
	}
}

func TestCredentials(t *testing.T) {
	dir := t.TempDir()
	wantResult(t, checkCredentials(filepath.Join(dir, "none.json")), OK, "anonymously", "")
	good := write(t, filepath.Join(dir, "good.json"), `{"auths":{"registry.test":{"auth":"dXNlcjpwYXNz"}}}`)
	wantResult(t, checkCredentials(good), OK, "parses", "")
	malformed := write(t, filepath.Join(dir, "bad.json"), `{"auths": {"registry.test": {"auth": "not base64!"}}`)
	wantResult(t, checkCredentials(malformed), Fail, malformed, "obd login")
}

// serveStatus serves a fake status endpoint on a unix socket under dir.
func serveStatus(t *testing.T, dir string, st status.Status) string {
	t.Helper()
	socket := filepath.Join(dir, "sn.status.sock")
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) { json.NewEncoder(w).Encode(st) })
	testenv.ServeUnix(t, socket, mux)
	return socket
}

// staleSocket leaves a socket file that nobody listens on, as a daemon killed with SIGKILL does.
func staleSocket(t *testing.T, path string) string {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	return path
}

func TestSnapshotterSocket(t *testing.T) {
	dir := testenv.SocketDir(t)
	missing := filepath.Join(dir, "missing.sock")
	wantResult(t, checkSocket(missing, "/etc/obd/obd.toml"), Fail, "obd-snapshotter is not running", "systemctl start obd-snapshotter")

	stale := staleSocket(t, filepath.Join(dir, "stale.sock"))
	wantResult(t, checkSocket(stale, "/etc/obd/obd.toml"), Fail, "does not answer", "start obd-snapshotter")

	file := write(t, filepath.Join(dir, "file"), "")
	wantResult(t, checkSocket(file, "/etc/obd/obd.toml"), Fail, "not a socket", "remove "+file)

	live := filepath.Join(dir, "live.sock")
	l, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	wantResult(t, checkSocket(live, "/etc/obd/obd.toml"), OK, "accepts connections", "")
}

func TestStatusEndpoint(t *testing.T) {
	dir := testenv.SocketDir(t)
	ctx := context.Background()
	opts := Options{ConfigPath: "/etc/obd/obd.toml", Timeout: 2 * time.Second}

	opts.StatusSocket = filepath.Join(dir, "none.sock")
	st, r := checkStatus(ctx, opts)
	wantResult(t, r, Fail, "not running", "systemctl start obd-snapshotter")
	if st != nil {
		t.Error("status of a missing daemon")
	}

	opts.StatusSocket = staleSocket(t, filepath.Join(dir, "stopped.sock"))
	_, r = checkStatus(ctx, opts)
	wantResult(t, r, Fail, "stopped", "obd-snapshotter --config /etc/obd/obd.toml")

	opts.StatusSocket = serveStatus(t, dir, status.Status{Version: "v9", PID: 42, UptimeSeconds: 61})
	st, r = checkStatus(ctx, opts)
	wantResult(t, r, OK, "obd-snapshotter v9 (pid 42) up 1m1s", "")
	if st == nil || st.PID != 42 {
		t.Errorf("status %+v", st)
	}
	wantResult(t, checkDevices(nil, opts.StatusSocket), Skip, "not checked", "")
}

func TestDevices(t *testing.T) {
	long := time.Now().Add(-5 * time.Minute)
	st := &status.Status{Images: []status.Image{
		{ID: "1", ImageRef: "r/app:lazy", Mode: status.ModeLazy, State: status.StateAttached, BytesFetched: 1 << 20},
		{ID: "2", ImageRef: "r/app:full", Mode: status.ModeLocal, State: status.StateAttached},
		{ID: "N0", Mode: status.ModeOverlayfs, State: status.StateNone},
	}}
	wantResult(t, checkDevices(st, "s"), OK, "1 lazy, 1 downloaded, 1 overlayfs", "")

	st.Images[0].HungReads = 3
	wantResult(t, checkDevices(st, "s"), Warn, "hung reads: r/app:lazy (3)", "registry")

	st.Images = append(st.Images, status.Image{ID: "3", ImageRef: "r/app:slow", Mode: status.ModeLazy, State: status.StateAttaching, Since: &long})
	wantResult(t, checkDevices(st, "s"), Warn, "slow attach: r/app:slow", "registry")

	st.Images = append(st.Images, status.Image{ID: "4", ImageRef: "r/app:bad", Mode: status.ModeLazy, State: status.StateFailed,
		Error: "layer sha256:ab: 401 unauthorized"})
	wantResult(t, checkDevices(st, "/run/x.sock"), Fail, "r/app:bad (layer sha256:ab: 401 unauthorized)", "obd status --socket /run/x.sock")
}

func TestCacheImports(t *testing.T) {
	if _, ok := checkCacheImports(&status.Status{}); ok {
		t.Error("a node that imported no snapshot has a cache snapshots check")
	}
	if _, ok := checkCacheImports(nil); ok {
		t.Error("a node whose status does not answer has a cache snapshots check")
	}
	im := status.CacheImport{Source: "r/cache:app", Blobs: []string{"sha256:a", "sha256:b"}, Blocks: 10, CachedBlobs: 2, ImageBlobs: 2}
	st := &status.Status{Cache: status.Cache{Imports: []status.CacheImport{im}}}
	r, _ := checkCacheImports(st)
	wantResult(t, r, OK, "1 imported, every blob cached", "")

	st.Cache.Imports[0].CachedBlobs = 1
	r, _ = checkCacheImports(st)
	wantResult(t, r, Warn, "evicted since: r/cache:app (1 of 2 blobs)", "obd cache import")

	st.Cache.Imports[0].ImageBlobs = 0
	r, _ = checkCacheImports(st)
	wantResult(t, r, Warn, "blobs of no image pulled on this node: r/cache:app (2 of 2 blobs)", "obd pull")
}

func TestContainerdConfig(t *testing.T) {
	dir := t.TempDir()
	const addr = "/run/obd/snapshotter.sock"
	wantResult(t, checkContainerdConfig(filepath.Join(dir, "missing.toml"), addr), Fail, "cannot read", "obd install")

	for _, tc := range []struct {
		name, config string
		level        Level
		msg, fix     string
	}{
		{"broken", "[proxy_plugins\n", Fail, "toml", "fix"},
		{"no plugin", "version = 2\n", Fail, "no [proxy_plugins.overlaybd]", `address = "/run/obd/snapshotter.sock"`},
		{"wrong type", "version = 2\n[proxy_plugins.overlaybd]\ntype = \"content\"\naddress = \"/run/obd/snapshotter.sock\"\n", Fail, `type = "content"`, `type = "snapshot"`},
		{"other address", "version = 2\n[proxy_plugins.overlaybd]\ntype = \"snapshot\"\naddress = \"/run/other.sock\"\n", Fail, `"/run/other.sock"`, "make them the same"},
		{"registered, CRI off", "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[proxy_plugins.overlaybd]\ntype = \"snapshot\"\naddress = \"/run/obd/snapshotter.sock\"\n", OK, "registers", ""},
		{"CRI without annotations", "version = 2\n[proxy_plugins.overlaybd]\ntype = \"snapshot\"\naddress = \"/run/obd/snapshotter.sock\"\n", Warn, "CRI", "disable_snapshot_annotations = false"},
		{"CRI with annotations", "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndisable_snapshot_annotations = false\n[proxy_plugins.overlaybd]\ntype = \"snapshot\"\naddress = \"/run/obd/snapshotter.sock\"\n", OK, "registers", ""},
		{"containerd 2", "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\ndisable_snapshot_annotations = false\n[proxy_plugins.overlaybd]\ntype = \"snapshot\"\naddress = \"/run/obd/snapshotter.sock\"\n", OK, "registers", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := write(t, filepath.Join(dir, "config.toml"), tc.config)
			wantResult(t, checkContainerdConfig(path, addr), tc.level, tc.msg, tc.fix)
		})
	}
}

func TestContainerdDown(t *testing.T) {
	dir := testenv.SocketDir(t)
	ctx := context.Background()
	wantResult(t, checkContainerd(ctx, filepath.Join(dir, "none.sock"), time.Second), Fail, "no such file", "systemctl start containerd")
	stale := staleSocket(t, filepath.Join(dir, "c.sock"))
	wantResult(t, checkContainerd(ctx, stale, time.Second), Fail, "does not answer", "systemctl restart containerd")
}

func TestCache(t *testing.T) {
	dir := t.TempDir()
	wantResult(t, checkCache(filepath.Join(dir, "cache"), 1<<30, 1, nil), OK, "0 B of 1.0 GiB used", "")
	st := &status.Status{Cache: status.Cache{Dir: dir, UsedBytes: 99 << 20, CapacityBytes: 100 << 20}}
	wantResult(t, checkCache(dir, 1<<30, 1, st), Warn, "over 95%", "raise cache.size_gb")
	wantResult(t, checkCache(dir, 1<<30, 1<<62, nil), Warn, "less than", "free space")
}

func TestCacheDiskFull(t *testing.T) {
	testenv.Root(t) // mounts a tmpfs
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=4m"); err != nil {
		testenv.Skip(t, "cannot mount a tmpfs: "+err.Error())
	}
	defer unix.Unmount(dir, unix.MNT_DETACH)
	wantResult(t, checkCache(dir, 1<<30, 1<<20, nil), Warn, "the cache may grow by", "lower cache.size_gb")
	if err := os.WriteFile(filepath.Join(dir, "fill"), make([]byte, 5<<20), 0o600); err == nil {
		t.Fatal("wrote 5 MiB to a 4 MiB tmpfs")
	}
	wantResult(t, checkCache(dir, 1<<30, 1<<20, nil), Fail, "the disk is full", "free space on the filesystem of "+dir)
}

// TestRun runs every check against private paths: a node where nothing runs.
func TestRun(t *testing.T) {
	dir := testenv.SocketDir(t)
	cfg := write(t, filepath.Join(dir, "obd.toml"), "[snapshotter]\naddress = \""+filepath.Join(dir, "sn.sock")+"\"\n[cache]\ndir = \""+filepath.Join(dir, "cache")+"\"\n")
	fss := write(t, filepath.Join(dir, "filesystems"), "\text4\nnodev\tfuse\nnodev\toverlay\n")
	results := Run(context.Background(), Options{
		ConfigPath: cfg, ConfigExplicit: true, ProcFilesystems: fss, DevFuse: "/dev/null", LoopControl: "/dev/null",
		ContainerdConfig: filepath.Join(dir, "containerd.toml"), ContainerdAddress: filepath.Join(dir, "c.sock"),
		Credentials: filepath.Join(dir, "creds.json"), MinFreeBytes: 1, Timeout: time.Second,
	})
	levels := map[string]Level{}
	for _, r := range results {
		levels[r.Check] = r.Level
		if r.Level >= Warn && r.Fix == "" {
			t.Errorf("%s: %s without a fix: %s", r.Check, r.Level, r.Message)
		}
	}
	want := map[string]Level{"kernel: FUSE": OK, "config": OK, "credentials": OK, "snapshotter socket": Fail, "snapshotter status": Fail,
		"containerd config": Fail, "containerd": Fail, "cache": OK, "devices": Skip}
	for check, l := range want {
		if levels[check] != l {
			t.Errorf("%s: %s, want %s", check, levels[check], l)
		}
	}
	if Worst(results) != Fail {
		t.Error("a node without its daemons is not unhealthy")
	}
}
