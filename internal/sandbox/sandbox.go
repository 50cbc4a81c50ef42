// Package sandbox runs a private node — a registry, containerd and obd-snapshotter, each on its own local port or
// socket under one temporary directory — for the demo, the end-to-end tests and the benchmarks, so that nothing
// global on the machine is touched. Close stops everything and removes every mount and device it made.
package sandbox

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/device"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
)

// Options configure Start.
type Options struct {
	// Snapshotter is the obd-snapshotter binary.
	Snapshotter string
	// CacheSizeGB bounds the snapshotter's block cache (default 4).
	CacheSizeGB int
	// CacheBlockKB is the snapshotter's cache block ([cache] block_size_kb) and CacheFetchKB its least fetch
	// ([cache] fetch_kb); 0 keeps the snapshotter's default.
	CacheBlockKB, CacheFetchKB int
	// PlainHTTP lists more registry hosts (host:port) the snapshotter reaches over plain HTTP ([registry]
	// plain_http), e.g. the sandbox registry behind a shaped link; localhost always is plain HTTP.
	PlainHTTP []string
	// RegistryTOML is more keys of obd.toml's [registry] table, e.g. "docker_config = \"/path\"\n".
	RegistryTOML string
	// CRI turns containerd's CRI plugin on (snapshotter overlaybd, image annotations passed, host network only,
	// no CNI) with a pod sandbox image the sandbox pushes to its registry, and serves obd-snapshotter's CRI proxy
	// on CRISocket.
	CRI bool
	// Logf receives progress lines (optional).
	Logf func(format string, args ...any)
}

// Sandbox is a running private node.
type Sandbox struct {
	// Dir holds every file of the sandbox.
	Dir string
	// Registry is the host:port of the registry, through a proxy that counts the bytes of every blob it serves.
	Registry string
	// Containerd is containerd's gRPC socket.
	Containerd string
	// Namespace is the containerd namespace to use.
	Namespace string
	// SnapshotterSocket is obd-snapshotter's socket.
	SnapshotterSocket string
	// StatusSocket is obd-snapshotter's status endpoint ('obd status --socket'), next to SnapshotterSocket.
	StatusSocket string
	// Metrics is the host:port of obd-snapshotter's Prometheus metrics (GET /metrics).
	Metrics string
	// CRISocket is obd-snapshotter's CRI image-service proxy (with Options.CRI); containerd's socket serves the
	// CRI runtime service.
	CRISocket string
	// PauseImage is the pod sandbox image (with Options.CRI), in the sandbox's registry.
	PauseImage string

	opts     Options
	extraCfg string // more TOML for obd.toml (SetSnapshotterConfig)
	procs    map[string]*proc
	proxy    *http.Server
	counter  *counter
	stopOnce sync.Once
}

type proc struct {
	cmd    *exec.Cmd
	exited chan error
	log    *os.File
}

// Required lists the programs a sandbox needs.
var Required = []string{"docker-registry", "containerd", "containerd-shim-runc-v2", "runc", "ctr"}

// Start starts the registry, containerd and obd-snapshotter and waits until each serves.
func Start(ctx context.Context, opts Options) (*Sandbox, error) {
	if opts.CacheSizeGB == 0 {
		opts.CacheSizeGB = 4
	}
	if opts.Logf == nil {
		opts.Logf = func(string, ...any) {}
	}
	// Unix socket paths are limited to 108 bytes: keep the directory short.
	dir, err := os.MkdirTemp("/tmp", "obd-sb-")
	if err != nil {
		return nil, err
	}
	s := &Sandbox{Dir: dir, Namespace: "obd", opts: opts, procs: map[string]*proc{}, counter: &counter{bytes: map[string]int64{}, requests: map[string]int64{}}}
	if err := s.start(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Sandbox) start(ctx context.Context) error {
	regAddr, err := freeAddr()
	if err != nil {
		return err
	}
	regCfg := filepath.Join(s.Dir, "registry.yml")
	if err := os.WriteFile(regCfg, []byte(fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(s.Dir, "registry"), regAddr)), 0o600); err != nil {
		return err
	}
	if err := s.run(ctx, "registry", "docker-registry", "serve", regCfg); err != nil {
		return err
	}
	if err := waitHTTP(ctx, "http://"+regAddr+"/v2/", s.procs["registry"]); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if err := s.startProxy(regAddr); err != nil {
		return err
	}
	s.opts.Logf("registry serving on %s (counting proxy in front)", s.Registry)

	s.Containerd = filepath.Join(s.Dir, "c.sock")
	if s.opts.CRI {
		s.CRISocket = filepath.Join(s.Dir, "cri.sock")
		s.PauseImage = s.Registry + "/pause:obd"
		if err := pushPause(ctx, s.Dir, s.PauseImage); err != nil {
			return fmt.Errorf("pod sandbox image: %w", err)
		}
	}

	s.SnapshotterSocket = filepath.Join(s.Dir, "sn.sock")
	s.StatusSocket = filepath.Join(s.Dir, "sn.status.sock") // the default: the socket's name with .status.sock
	if s.Metrics, err = freeAddr(); err != nil {
		return err
	}
	if err := s.StartSnapshotter(ctx); err != nil {
		return err
	}

	criPlugin := `"io.containerd.grpc.v1.cri", `
	if s.opts.CRI {
		criPlugin = ""
	}
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = [%s"io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]
[grpc]
  address = %q
[ttrpc]
  address = %q
[proxy_plugins.overlaybd]
  type = "snapshot"
  address = %q
`, filepath.Join(s.Dir, "containerd", "root"), filepath.Join(s.Dir, "containerd", "state"), criPlugin, s.Containerd, s.Containerd+".ttrpc", s.SnapshotterSocket)
	if s.opts.CRI {
		// Root lacks CAP_SYS_RESOURCE here: restrict_oom_score_adj lets pods start. An empty CNI directory of the
		// sandbox's own: pods use the host's network.
		cfg += fmt.Sprintf(`[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlaybd"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
`, s.PauseImage, filepath.Join(s.Dir, "cni", "bin"), filepath.Join(s.Dir, "cni", "conf"))
	}
	cfgPath := filepath.Join(s.Dir, "containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return err
	}
	if err := s.run(ctx, "containerd", "containerd", "--config", cfgPath); err != nil {
		return err
	}
	if err := waitSocket(ctx, s.Containerd, s.procs["containerd"]); err != nil {
		return fmt.Errorf("containerd: %w", err)
	}
	s.opts.Logf("containerd serving on %s, snapshotter overlaybd on %s", s.Containerd, s.SnapshotterSocket)
	return nil
}

// StartSnapshotter (re)starts obd-snapshotter with the sandbox's configuration.
func (s *Sandbox) StartSnapshotter(ctx context.Context) error {
	cfg := fmt.Sprintf("[snapshotter]\nroot = %q\naddress = %q\n[cache]\ndir = %q\nsize_gb = %d\n",
		filepath.Join(s.Dir, "snapshotter"), s.SnapshotterSocket, s.CacheDir(), s.opts.CacheSizeGB)
	if s.opts.CacheBlockKB != 0 {
		cfg += fmt.Sprintf("block_size_kb = %d\n", s.opts.CacheBlockKB)
	}
	if s.opts.CacheFetchKB != 0 {
		cfg += fmt.Sprintf("fetch_kb = %d\n", s.opts.CacheFetchKB)
	}
	cfg += "[registry]\nretry_budget = \"20s\"\n"
	if len(s.opts.PlainHTTP) > 0 {
		hosts := make([]string, len(s.opts.PlainHTTP))
		for i, h := range s.opts.PlainHTTP {
			hosts[i] = strconv.Quote(h)
		}
		cfg += "plain_http = [" + strings.Join(hosts, ", ") + "]\n"
	}
	cfg += s.opts.RegistryTOML
	cfg += fmt.Sprintf("[metrics]\naddress = %q\n", s.Metrics) // a port of its own: sandboxes may run side by side
	if s.opts.CRI {
		cfg += fmt.Sprintf("[cri]\nenable = true\naddress = %q\ncontainerd_address = %q\n", s.CRISocket, s.Containerd)
	}
	cfg += s.extraCfg
	cfgPath := s.ConfigFile()
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return err
	}
	if err := s.run(ctx, "snapshotter", s.opts.Snapshotter, "--config", cfgPath); err != nil {
		return err
	}
	return waitSocket(ctx, s.SnapshotterSocket, s.procs["snapshotter"])
}

// SetSnapshotterConfig sets more TOML tables (other than the ones StartSnapshotter writes: snapshotter, cache,
// registry, metrics, and cri with Options.CRI) that are appended to obd.toml from the next StartSnapshotter on, e.g. "[download]\nenable = true\n".
func (s *Sandbox) SetSnapshotterConfig(toml string) {
	if toml != "" && !strings.HasSuffix(toml, "\n") {
		toml += "\n"
	}
	s.extraCfg = toml
}

// SnapshotterPID returns the process id of the running obd-snapshotter, 0 when it is not running.
func (s *Sandbox) SnapshotterPID() int {
	if p := s.procs["snapshotter"]; p != nil && p.cmd.Process != nil {
		return p.cmd.Process.Pid
	}
	return 0
}

// ConfigFile is obd-snapshotter's obd.toml.
func (s *Sandbox) ConfigFile() string { return filepath.Join(s.Dir, "obd.toml") }

// CacheDir is obd-snapshotter's block cache directory. Remove it only while the snapshotter is stopped.
func (s *Sandbox) CacheDir() string { return filepath.Join(s.Dir, "cache") }

// KillSnapshotter kills obd-snapshotter with SIGKILL, as a crash would.
func (s *Sandbox) KillSnapshotter() error {
	p := s.procs["snapshotter"]
	if p == nil {
		return errors.New("snapshotter is not running")
	}
	delete(s.procs, "snapshotter")
	p.cmd.Process.Kill()
	<-p.exited
	p.log.Close()
	return nil
}

// StopSnapshotter stops obd-snapshotter with SIGTERM, as systemctl stop does, and waits for it to exit.
func (s *Sandbox) StopSnapshotter() error {
	p := s.procs["snapshotter"]
	if p == nil {
		return errors.New("snapshotter is not running")
	}
	delete(s.procs, "snapshotter")
	return stop(p)
}

// SetSnapshotterBinary makes the next StartSnapshotter run path (an upgrade, when it is a new build).
func (s *Sandbox) SetSnapshotterBinary(path string) { s.opts.Snapshotter = path }

// Ctr returns a ctr command talking to the sandbox's containerd.
func (s *Sandbox) Ctr(ctx context.Context, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "ctr", append([]string{"--address", s.Containerd, "--namespace", s.Namespace}, args...)...)
	cmd.Env = pathEnv()
	return cmd
}

// Log returns the log of one of the sandbox's processes ("registry", "containerd", "snapshotter").
func (s *Sandbox) Log(name string) string {
	b, _ := os.ReadFile(filepath.Join(s.Dir, name+".log"))
	return string(b)
}

// BlobBytes returns, per blob digest, the bytes the registry served since the last ResetCounters.
func (s *Sandbox) BlobBytes() map[string]int64 { return s.counter.snapshot() }

// BlobRequests returns, per blob digest, the GET requests (whole or ranged) the registry answered since the last
// ResetCounters.
func (s *Sandbox) BlobRequests() map[string]int64 { return s.counter.snapshotRequests() }

// ResetCounters zeroes the byte and request counters.
func (s *Sandbox) ResetCounters() { s.counter.reset() }

// Close stops every process, removes mounts and devices under the sandbox directory, and deletes it.
func (s *Sandbox) Close() error {
	var errs []error
	s.stopOnce.Do(func() {
		for _, name := range []string{"containerd", "snapshotter", "registry"} {
			if p := s.procs[name]; p != nil {
				errs = append(errs, stop(p))
			}
		}
		if s.proxy != nil {
			s.proxy.Close()
		}
		errs = append(errs, s.cleanMounts())
		if errors.Join(errs...) == nil {
			errs = append(errs, os.RemoveAll(s.Dir))
		}
	})
	return errors.Join(errs...)
}

// cleanMounts unmounts everything under the sandbox directory (deepest first) and detaches its loop devices.
func (s *Sandbox) cleanMounts() error {
	var errs []error
	// The devices outlive obd-snapshotter in its holder process: end them, so that they are stale and go.
	root := filepath.Join(s.Dir, "snapshotter")
	if err := device.StopHolder(config.Snapshotter{Root: root}.HolderSocket()); err != nil {
		errs = append(errs, err)
	}
	stateDir := filepath.Join(root, "devices")
	if _, err := device.NewFuseLoop(slog.New(slog.DiscardHandler)).Reconcile(context.Background(), stateDir); err != nil {
		errs = append(errs, err)
	}
	mounts, err := MountsUnder(s.Dir)
	if err != nil {
		return err
	}
	for _, m := range mounts {
		if err := device.Unmount(m); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// MountsUnder lists the mount points under dir (as this process sees them), deepest first.
func MountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			out = append(out, fields[4])
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, sc.Err()
}

func (s *Sandbox) run(ctx context.Context, name, bin string, args ...string) error {
	// A restarted process appends to the log of the ones before it.
	logf, err := os.OpenFile(filepath.Join(s.Dir, name+".log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = pathEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{cmd: cmd, exited: make(chan error, 1), log: logf}
	go func() { p.exited <- cmd.Wait() }()
	s.procs[name] = p
	return nil
}

func stop(p *proc) error {
	defer p.log.Close()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
		return fmt.Errorf("%s ignored SIGTERM for 15s and was killed", filepath.Base(p.cmd.Path))
	}
}

// pathEnv is the environment with the sbin directories on PATH (containerd looks up runc and its shim there).
func pathEnv() []string {
	env := os.Environ()
	for i, kv := range env {
		if strings.HasPrefix(kv, "PATH=") {
			env[i] = kv + ":/usr/local/sbin:/usr/sbin:/sbin"
			return env
		}
	}
	return append(env, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func waitSocket(ctx context.Context, path string, p *proc) error {
	return waitFor(ctx, p, func() bool {
		c, err := net.Dial("unix", path)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

func waitHTTP(ctx context.Context, u string, p *proc) error {
	return waitFor(ctx, p, func() bool {
		resp, err := http.Get(u)
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	})
}

func waitFor(ctx context.Context, p *proc, ready func() bool) error {
	deadline := time.Now().Add(30 * time.Second)
	for !ready() {
		select {
		case err := <-p.exited:
			p.exited <- err
			return fmt.Errorf("exited: %v (log: %s)", err, p.log.Name())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after 30s (log: %s)", p.log.Name())
		}
	}
	return nil
}

// pushPause builds a pod sandbox image that sleeps forever (busybox-static, the only file) and pushes it to ref,
// so that pods start without a registry on the internet.
func pushPause(ctx context.Context, dir, ref string) error {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		return err
	}
	body, err := os.ReadFile(bb)
	if err != nil {
		return err
	}
	var layer bytes.Buffer
	tw := tar.NewWriter(&layer)
	for _, h := range []*tar.Header{
		{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "bin/busybox", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(body))},
	} {
		h.ModTime = time.Unix(1700000000, 0)
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
	}
	if _, err := tw.Write(body); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	lay, err := image.CreateLayout(filepath.Join(dir, "pause"))
	if err != nil {
		return err
	}
	var cfg ocispec.Image
	cfg.Config.Entrypoint = []string{"/bin/busybox", "sleep", "2147483647"}
	if _, err := lay.WriteImage("obd", [][]byte{layer.Bytes()}, "", cfg); err != nil {
		return err
	}
	r, err := image.ParseRef(ref)
	if err != nil {
		return err
	}
	c, err := registry.New(registry.Options{PlainHTTP: true})
	if err != nil {
		return err
	}
	defer c.Close()
	return image.PushLayout(ctx, c, lay, "obd", r)
}

// startProxy puts a reverse proxy that counts blob bytes in front of the registry.
func (s *Sandbox) startProxy(regAddr string) error {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	target := &url.URL{Scheme: "http", Host: regAddr}
	rp := httputil.NewSingleHostReverseProxy(target)
	rp.ModifyResponse = func(resp *http.Response) error {
		if i := strings.Index(resp.Request.URL.Path, "/blobs/sha256:"); i >= 0 && resp.Request.Method == http.MethodGet {
			key := resp.Request.URL.Path[i+len("/blobs/"):]
			s.counter.request(key)
			resp.Body = &countingBody{ReadCloser: resp.Body, c: s.counter, key: key}
		}
		return nil
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.counter.refuse() {
			http.Error(w, "registry down (sandbox)", http.StatusServiceUnavailable)
			return
		}
		rp.ServeHTTP(w, r)
	})
	s.proxy = &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
	go s.proxy.Serve(l)
	s.Registry = l.Addr().String()
	return nil
}

type counter struct {
	mu       sync.Mutex
	bytes    map[string]int64
	requests map[string]int64
	down     bool
	refused  int64
}

// refuse counts a request and reports whether the registry is down.
func (c *counter) refuse() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.down {
		c.refused++
	}
	return c.down
}

// SetRegistryDown makes the registry answer every request with 503 (down) or serve again; it returns the number
// of requests refused since the last call.
func (s *Sandbox) SetRegistryDown(down bool) int64 {
	s.counter.mu.Lock()
	defer s.counter.mu.Unlock()
	n := s.counter.refused
	s.counter.down, s.counter.refused = down, 0
	return n
}

func (c *counter) request(key string) {
	c.mu.Lock()
	c.requests[key]++
	c.mu.Unlock()
}

func (c *counter) add(key string, n int64) {
	c.mu.Lock()
	c.bytes[key] += n
	c.mu.Unlock()
}

func (c *counter) snapshot() map[string]int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.bytes)
}

func (c *counter) snapshotRequests() map[string]int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.requests)
}

func (c *counter) reset() {
	c.mu.Lock()
	c.bytes = map[string]int64{}
	c.requests = map[string]int64{}
	c.mu.Unlock()
}

type countingBody struct {
	io.ReadCloser
	c   *counter
	key string
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.c.add(b.key, int64(n))
	return n, err
}
