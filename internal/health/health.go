// Package health checks whether a node can run obd: kernel features, obd-snapshotter and its sockets, its
// registration in containerd, the configuration and credentials files, the cache disk and the image devices.
// Each check says OK, WARN or FAIL in one line and, when not OK, how to fix it; 'obd health' prints them.
package health

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/obdproject/obd/internal/units"

	"github.com/BurntSushi/toml"
	"github.com/containerd/containerd/v2/client"
	"golang.org/x/sys/unix"

	obdconfig "github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/status"
)

// Level is the outcome of a check.
type Level int

// Levels, from good to bad. Skip means the check could not run because an earlier one failed.
const (
	OK Level = iota
	Skip
	Warn
	Fail
)

func (l Level) String() string {
	switch l {
	case OK:
		return "OK"
	case Skip:
		return "SKIP"
	case Warn:
		return "WARN"
	}
	return "FAIL"
}

// MarshalJSON writes the level's name.
func (l Level) MarshalJSON() ([]byte, error) { return json.Marshal(l.String()) }

// Result is the outcome of one check.
type Result struct {
	Check   string   `json:"check"`
	Level   Level    `json:"level"`
	Message string   `json:"message"`
	Fix     string   `json:"fix,omitempty"`     // one line: what to do, when Level is Warn or Fail
	Details []string `json:"details,omitempty"` // what was looked at ('obd health -v')
}

// Options say where to look. Empty paths come from obd.toml (ConfigPath) or the defaults, so that tests and
// unusual installations can point every check elsewhere.
type Options struct {
	ConfigPath     string // obd.toml (default /etc/obd/obd.toml)
	ConfigExplicit bool   // the user named ConfigPath: a missing file is a failure

	ProcFilesystems string // default /proc/filesystems
	DevFuse         string // default /dev/fuse
	LoopControl     string // default /dev/loop-control

	SnapshotterAddress string // default: snapshotter.address of obd.toml
	StatusSocket       string // default: the status socket of obd.toml

	ContainerdConfig  string // default /etc/containerd/config.toml
	ContainerdAddress string // default /run/containerd/containerd.sock

	Credentials string // docker config.json; default: registry.docker_config of obd.toml, else docker's default
	CacheDir    string // default: cache.dir of obd.toml

	MinFreeBytes int64         // free space under the cache below which it warns (default 1 GiB)
	Timeout      time.Duration // per daemon request (default 5s)
}

// Defaults of Options.
const (
	DefaultProcFilesystems   = "/proc/filesystems"
	DefaultDevFuse           = "/dev/fuse"
	DefaultLoopControl       = "/dev/loop-control"
	DefaultContainerdConfig  = "/etc/containerd/config.toml"
	DefaultContainerdAddress = "/run/containerd/containerd.sock"
	DefaultMinFreeBytes      = 1 << 30
)

// startHint tells how to start obd-snapshotter.
func startHint(configPath string) string {
	return fmt.Sprintf("start obd-snapshotter: 'systemctl start obd-snapshotter' (set up by 'obd install'), or run 'obd-snapshotter --config %s'", configPath)
}

// Run runs every check, in order, and returns their results.
func Run(ctx context.Context, opts Options) []Result {
	if opts.ConfigPath == "" {
		opts.ConfigPath = obdconfig.DefaultPath
	}
	if opts.ProcFilesystems == "" {
		opts.ProcFilesystems = DefaultProcFilesystems
	}
	if opts.DevFuse == "" {
		opts.DevFuse = DefaultDevFuse
	}
	if opts.LoopControl == "" {
		opts.LoopControl = DefaultLoopControl
	}
	if opts.ContainerdConfig == "" {
		opts.ContainerdConfig = DefaultContainerdConfig
	}
	if opts.ContainerdAddress == "" {
		opts.ContainerdAddress = DefaultContainerdAddress
	}
	if opts.MinFreeBytes == 0 {
		opts.MinFreeBytes = DefaultMinFreeBytes
	}
	if opts.Timeout == 0 {
		opts.Timeout = 5 * time.Second
	}

	var out []Result
	cfgResult, cfg := checkConfig(opts.ConfigPath, opts.ConfigExplicit)
	if opts.SnapshotterAddress == "" {
		opts.SnapshotterAddress = cfg.Snapshotter.Address
	}
	if opts.StatusSocket == "" {
		opts.StatusSocket = cfg.Snapshotter.StatusSocket()
	}
	if opts.Credentials == "" {
		opts.Credentials = cfg.Registry.DockerConfig
		if opts.Credentials == "" {
			opts.Credentials = registry.DefaultDockerConfigPath()
		}
	}
	if opts.CacheDir == "" {
		opts.CacheDir = cfg.Cache.Dir
	}

	out = append(out, checkKernel(opts)...)
	out = append(out, cfgResult, checkCredentials(opts.Credentials))
	sock := checkSocket(opts.SnapshotterAddress, opts.ConfigPath)
	out = append(out, sock)
	st, stResult := checkStatus(ctx, opts)
	out = append(out, stResult)
	out = append(out, checkContainerdConfig(opts.ContainerdConfig, opts.SnapshotterAddress))
	out = append(out, checkContainerd(ctx, opts.ContainerdAddress, opts.Timeout))
	out = append(out, checkCache(opts.CacheDir, cfg.Cache.SizeGB<<30, opts.MinFreeBytes, st))
	if r, ok := checkCacheImports(st); ok {
		out = append(out, r)
	}
	out = append(out, checkDevices(st, opts.StatusSocket))
	return out
}

// Worst returns the worst level of results (OK for none).
func Worst(results []Result) Level {
	w := OK
	for _, r := range results {
		w = max(w, r.Level)
	}
	return w
}

// checkKernel checks the kernel features the device service needs.
func checkKernel(opts Options) []Result {
	fss, err := readFilesystems(opts.ProcFilesystems)
	if err != nil {
		return []Result{{Check: "kernel", Level: Fail, Message: fmt.Sprintf("cannot read %s: %v", opts.ProcFilesystems, err),
			Fix: "run obd health on the node itself, with /proc mounted"}}
	}
	var out []Result

	fuse := Result{Check: "kernel: FUSE", Details: []string{opts.DevFuse, opts.ProcFilesystems}}
	devErr := charDevice(opts.DevFuse)
	switch {
	case !fss["fuse"] && devErr != nil:
		fuse.Level, fuse.Message = Fail, fmt.Sprintf("no FUSE: %v, and no \"fuse\" in %s", devErr, opts.ProcFilesystems)
		fuse.Fix = "load the FUSE module: 'modprobe fuse' (and add it to /etc/modules-load.d/ to keep it after a reboot)"
	case !fss["fuse"]:
		fuse.Level, fuse.Message = Fail, fmt.Sprintf("%s exists but the kernel lists no \"fuse\" filesystem in %s", opts.DevFuse, opts.ProcFilesystems)
		fuse.Fix = "load the FUSE module: 'modprobe fuse'"
	case devErr != nil:
		fuse.Level, fuse.Message = Fail, fmt.Sprintf("the kernel has FUSE but %v", devErr)
		fuse.Fix = "create the device: 'mknod -m 666 /dev/fuse c 10 229'; in a container, pass --device /dev/fuse"
	default:
		fuse.Message = opts.DevFuse + " present and \"fuse\" registered"
	}
	out = append(out, fuse)

	loop := Result{Check: "kernel: loop devices", Details: []string{opts.LoopControl}}
	if err := charDevice(opts.LoopControl); err != nil {
		loop.Level, loop.Message = Fail, fmt.Sprintf("no loop device control: %v", err)
		loop.Fix = "load the loop module: 'modprobe loop'; in a container, give it /dev/loop-control and the /dev/loop* devices"
	} else {
		loop.Message = opts.LoopControl + " present"
	}
	out = append(out, loop)

	for _, fs := range []struct{ name, why string }{
		{"ext4", "the filesystem of overlaybd images"},
		{"overlay", "containers' root filesystems"},
	} {
		r := Result{Check: "kernel: " + fs.name, Details: []string{opts.ProcFilesystems}}
		if fss[fs.name] {
			r.Message = fmt.Sprintf("%q registered (%s)", fs.name, fs.why)
		} else {
			r.Level = Warn
			r.Message = fmt.Sprintf("%q is not registered in %s (needed for %s); mounts fail unless the kernel can load its module", fs.name, opts.ProcFilesystems, fs.why)
			r.Fix = fmt.Sprintf("'modprobe %s'", fs.name)
		}
		out = append(out, r)
	}
	return out
}

// readFilesystems returns the filesystem types listed in a /proc/filesystems file.
func readFilesystems(path string) (map[string]bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 0 {
			out[fields[len(fields)-1]] = true
		}
	}
	return out, sc.Err()
}

// charDevice returns nil when path is a character device.
func charDevice(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.Mode()&fs.ModeCharDevice == 0 {
		return fmt.Errorf("%s is not a character device", path)
	}
	return nil
}

// checkConfig loads obd.toml with the daemon's loader. It returns the configuration to take paths from (the
// defaults when the file is broken).
func checkConfig(path string, explicit bool) (Result, obdconfig.Config) {
	r := Result{Check: "config", Details: []string{path}}
	cfg, warnings, err := obdconfig.Load(path, explicit)
	switch {
	case err != nil:
		r.Level, r.Message = Fail, err.Error()
		r.Fix = fmt.Sprintf("fix %s (see docs/operations.md for the keys); obd-snapshotter does not start with it", path)
		return r, obdconfig.Default()
	case len(warnings) > 0:
		r.Level, r.Message = Warn, strings.Join(warnings, "; ")
		r.Fix = fmt.Sprintf("remove or correct the key in %s: it has no effect", path)
	default:
		if _, err := os.Stat(path); err != nil {
			r.Message = fmt.Sprintf("%s not found: the defaults apply", path)
		} else {
			r.Message = path + " is valid"
		}
	}
	r.Details = append(r.Details, fmt.Sprintf("snapshotter.address = %s, status socket %s, cache.dir = %s (%d GiB), metrics.address = %q",
		cfg.Snapshotter.Address, cfg.Snapshotter.StatusSocket(), cfg.Cache.Dir, cfg.Cache.SizeGB, cfg.Metrics.Address))
	return r, cfg
}

// checkCredentials parses the registry credentials file the daemon reads.
func checkCredentials(path string) Result {
	r := Result{Check: "credentials", Details: []string{path}}
	if path == "" {
		r.Message = "no credentials file (no home directory and no registry.docker_config): registries are accessed anonymously"
		return r
	}
	if _, err := registry.LoadDockerConfig(path); err != nil {
		r.Level, r.Message = Fail, err.Error()
		r.Fix = fmt.Sprintf("fix or remove %s (docker config.json format), or log in again with 'obd login REGISTRY'", path)
		return r
	}
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		r.Message = fmt.Sprintf("%s not found: registries are accessed anonymously", path)
		return r
	}
	r.Message = path + " parses"
	return r
}

// checkSocket checks that obd-snapshotter's gRPC socket exists and accepts connections.
func checkSocket(address, configPath string) Result {
	r := Result{Check: "snapshotter socket", Details: []string{address}}
	fi, err := os.Lstat(address)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		r.Level, r.Message, r.Fix = Fail, fmt.Sprintf("%s does not exist: obd-snapshotter is not running", address), startHint(configPath)
		return r
	case err != nil:
		r.Level, r.Message, r.Fix = Fail, err.Error(), "run obd health as root"
		return r
	case fi.Mode()&fs.ModeSocket == 0:
		r.Level, r.Message = Fail, fmt.Sprintf("%s is not a socket", address)
		r.Fix = fmt.Sprintf("remove %s and restart obd-snapshotter, or set snapshotter.address in %s", address, configPath)
		return r
	}
	c, err := net.DialTimeout("unix", address, 2*time.Second)
	if err != nil {
		r.Level, r.Message = Fail, fmt.Sprintf("%s does not answer (%v): obd-snapshotter stopped and left its socket", address, errors.Unwrap(err))
		r.Fix = startHint(configPath)
		return r
	}
	c.Close()
	r.Message = address + " accepts connections"
	return r
}

// checkStatus asks the status endpoint whether the daemon is healthy, and returns its status for later checks.
func checkStatus(ctx context.Context, opts Options) (*status.Status, Result) {
	r := Result{Check: "snapshotter status", Details: []string{opts.StatusSocket}}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	c := status.NewClient(opts.StatusSocket, opts.Timeout)
	if err := c.Healthz(ctx); err != nil {
		r.Level, r.Message = Fail, err.Error()
		r.Fix = startHint(opts.ConfigPath)
		if !errors.Is(err, status.ErrNotRunning) {
			r.Fix = "check obd-snapshotter's log ('journalctl -u obd-snapshotter'); restart it if it hangs"
		}
		return nil, r
	}
	st, err := c.Status(ctx)
	if err != nil {
		r.Level, r.Message = Fail, err.Error()
		r.Fix = "check obd-snapshotter's log ('journalctl -u obd-snapshotter')"
		return nil, r
	}
	r.Message = fmt.Sprintf("obd-snapshotter %s (pid %d) up %s", st.Version, st.PID, (time.Duration(st.UptimeSeconds) * time.Second).String())
	if st.Config.MetricsAddress != "" {
		r.Details = append(r.Details, "metrics at http://"+st.Config.MetricsAddress+"/metrics")
	}
	for _, w := range st.Warnings {
		r.Level, r.Message = Warn, r.Message+"; "+w
		r.Fix = "check obd-snapshotter's log"
	}
	return st, r
}

// checkContainerdConfig checks that containerd's config registers obd's snapshotter at address.
func checkContainerdConfig(path, address string) Result {
	r := Result{Check: "containerd config", Details: []string{path}}
	snippet := fmt.Sprintf("[proxy_plugins.overlaybd] type = \"snapshot\", address = %q", address)
	data, err := os.ReadFile(path)
	if err != nil {
		r.Level, r.Message = Fail, fmt.Sprintf("cannot read containerd's config: %v", err)
		r.Fix = fmt.Sprintf("run 'obd install', or add %s to %s and restart containerd", snippet, path)
		return r
	}
	doc := map[string]any{}
	if _, err := toml.Decode(string(data), &doc); err != nil {
		r.Level, r.Message = Fail, fmt.Sprintf("%s: %v", path, err)
		r.Fix = fmt.Sprintf("fix %s: containerd cannot read it either", path)
		return r
	}
	plugin, ok := obdconfig.Lookup(doc, "proxy_plugins", "overlaybd")
	pm, isMap := plugin.(map[string]any)
	switch {
	case !ok:
		r.Level, r.Message = Fail, "no [proxy_plugins.overlaybd]: containerd does not know obd's snapshotter"
		r.Fix = fmt.Sprintf("run 'obd install', or add %s to %s and restart containerd", snippet, path)
		return r
	case !isMap:
		r.Level, r.Message, r.Fix = Fail, "proxy_plugins.overlaybd is not a table", fmt.Sprintf("make it the table %s", snippet)
		return r
	}
	if t, _ := pm["type"].(string); t != "snapshot" {
		r.Level, r.Message = Fail, fmt.Sprintf("[proxy_plugins.overlaybd] has type = %q, want \"snapshot\"", pm["type"])
		r.Fix = fmt.Sprintf("set type = \"snapshot\" in [proxy_plugins.overlaybd] of %s and restart containerd", path)
		return r
	}
	if a, _ := pm["address"].(string); a != address {
		r.Level, r.Message = Fail, fmt.Sprintf("[proxy_plugins.overlaybd] has address = %q but obd-snapshotter listens on %q", pm["address"], address)
		r.Fix = fmt.Sprintf("make them the same: edit address in %s (then restart containerd) or snapshotter.address in obd.toml", path)
		return r
	}
	r.Message = fmt.Sprintf("[proxy_plugins.overlaybd] registers %s", address)

	// CRI pulls are lazy only when containerd passes image annotations to snapshotters.
	version, _ := doc["version"].(int64)
	criIDs, table := []string{"io.containerd.grpc.v1.cri", "cri"}, []string{"plugins", "io.containerd.grpc.v1.cri", "containerd"}
	switch version {
	case 0, 1:
		criIDs, table = []string{"cri"}, []string{"plugins", "cri", "containerd"}
	case 3:
		criIDs, table = []string{"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images"}, []string{"plugins", "io.containerd.cri.v1.images"}
	}
	if disabled, _ := doc["disabled_plugins"].([]any); slices.ContainsFunc(disabled, func(v any) bool { s, _ := v.(string); return slices.Contains(criIDs, s) }) {
		r.Details = append(r.Details, "the CRI plugin is disabled: only ctr/nerdctl/'obd pull' pulls")
		return r
	}
	if v, _ := obdconfig.Lookup(doc, append(table, "disable_snapshot_annotations")...); v != false {
		tableName := table[0]
		for _, t := range table[1:] {
			if strings.Contains(t, ".") {
				t = fmt.Sprintf("%q", t)
			}
			tableName += "." + t
		}
		r.Level = Warn
		r.Message += "; but CRI (Kubernetes) pulls do not pass image annotations, so they download overlaybd images instead of pulling them lazily"
		r.Fix = fmt.Sprintf("set disable_snapshot_annotations = false in [%s] of %s (or run 'obd install --cri') and restart containerd", tableName, path)
	}
	return r
}

// checkContainerd asks containerd for its version on its socket.
func checkContainerd(ctx context.Context, address string, timeout time.Duration) Result {
	r := Result{Check: "containerd", Details: []string{address}}
	if _, err := os.Stat(address); err != nil {
		r.Level, r.Message = Fail, fmt.Sprintf("containerd's socket: %v", err)
		r.Fix = "start containerd: 'systemctl start containerd' (or name its socket with --containerd-address)"
		return r
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := client.New(address, client.WithTimeout(timeout))
	if err == nil {
		defer c.Close()
		var v client.Version
		if v, err = c.Version(ctx); err == nil {
			r.Message = fmt.Sprintf("containerd %s answers on %s", v.Version, address)
			return r
		}
	}
	r.Level, r.Message = Fail, fmt.Sprintf("containerd does not answer on %s: %v", address, err)
	r.Fix = "restart containerd ('systemctl restart containerd') and check its log ('journalctl -u containerd')"
	return r
}

// checkCache checks the free space of the cache's filesystem and how full the cache is.
func checkCache(dir string, capacity, minFree int64, st *status.Status) Result {
	r := Result{Check: "cache", Details: []string{dir}}
	probe := dir
	for {
		if _, err := os.Stat(probe); err == nil {
			break
		}
		parent := filepath.Dir(probe)
		if parent == probe {
			break
		}
		probe = parent
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(probe, &sfs); err != nil {
		r.Level, r.Message = Fail, fmt.Sprintf("cannot check the filesystem of %s: %v", dir, err)
		r.Fix = "create the cache directory or set cache.dir in obd.toml"
		return r
	}
	free := int64(sfs.Bavail) * sfs.Bsize
	used := int64(-1)
	if st != nil && st.Cache.Dir == dir {
		used, capacity = st.Cache.UsedBytes, st.Cache.CapacityBytes
	} else if u, err := diskUsage(dir); err == nil {
		used = u
	}
	var parts []string
	if used >= 0 {
		parts = append(parts, fmt.Sprintf("%s of %s used (%.0f%%)", units.Bytes(used), units.Bytes(capacity), 100*float64(used)/float64(max(capacity, 1))))
	}
	parts = append(parts, fmt.Sprintf("%s free on its filesystem", units.Bytes(free)))
	r.Message = dir + ": " + strings.Join(parts, ", ")
	switch {
	case free < 64<<10:
		r.Level = Fail
		r.Message += ": the disk is full, fetched blocks cannot be cached and every read goes to the registry"
		r.Fix = fmt.Sprintf("free space on the filesystem of %s, or move cache.dir to a larger disk", dir)
	case free < minFree:
		r.Level = Warn
		r.Message += fmt.Sprintf(": less than %s free", units.Bytes(minFree))
		r.Fix = fmt.Sprintf("free space on the filesystem of %s, or lower cache.size_gb so the cache cannot fill the disk", dir)
	case used >= 0 && capacity > 0 && float64(used) > 0.95*float64(capacity):
		r.Level = Warn
		r.Message += ": the cache is over 95% of its capacity and evicts blocks that running images may read again"
		r.Fix = "raise cache.size_gb in obd.toml (and restart obd-snapshotter) if the disk allows"
	case capacity > 0 && used >= 0 && capacity-used > free:
		r.Level = Warn
		r.Message += fmt.Sprintf(": the cache may grow by %s, more than is free", units.Bytes(capacity-used))
		r.Fix = "lower cache.size_gb in obd.toml or free space on the disk"
	}
	return r
}

// diskUsage returns the bytes a directory tree occupies on disk (sparse cache files count what they hold).
func diskUsage(dir string) (int64, error) {
	var total int64
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.Type().IsRegular() {
			var st unix.Stat_t
			if err := unix.Lstat(path, &st); err == nil {
				total += st.Blocks * 512
			}
		}
		return nil
	})
	return total, err
}

// checkCacheImports reports whether the cache snapshots imported on the node still match it: their blobs cached,
// and layers of images pulled on the node. It has no result on a node that imported none.
func checkCacheImports(st *status.Status) (Result, bool) {
	if st == nil || len(st.Cache.Imports) == 0 {
		return Result{}, false
	}
	r := Result{Check: "cache snapshots"}
	var evicted, stray []string
	for _, im := range st.Cache.Imports {
		n := len(im.Blobs)
		r.Details = append(r.Details, fmt.Sprintf("%s (imported %s): %d blobs, %d blocks, %d dropped; %d cached, %d layers of images here",
			im.Source, im.Time.Format(time.DateTime), n, im.Blocks, im.Dropped, im.CachedBlobs, im.ImageBlobs))
		if im.CachedBlobs < n {
			evicted = append(evicted, fmt.Sprintf("%s (%d of %d blobs)", im.Source, n-im.CachedBlobs, n))
		}
		if im.ImageBlobs < n {
			stray = append(stray, fmt.Sprintf("%s (%d of %d blobs)", im.Source, n-im.ImageBlobs, n))
		}
	}
	r.Message = fmt.Sprintf("%d imported", len(st.Cache.Imports))
	switch {
	case len(stray) > 0:
		r.Level = Warn
		r.Message += "; blobs of no image pulled on this node: " + strings.Join(stray, ", ")
		r.Fix = "pull the images the snapshot was taken of ('obd pull'), or drop their blocks with 'obd cache prune'"
		if len(evicted) > 0 {
			r.Message += "; evicted since: " + strings.Join(evicted, ", ")
		}
	case len(evicted) > 0:
		r.Level = Warn
		r.Message += "; evicted since: " + strings.Join(evicted, ", ")
		r.Fix = "import the snapshot again ('obd cache import'), or raise cache.size_gb if the cache evicts them for lack of room"
	default:
		r.Message += ", every blob cached and a layer of an image on this node"
	}
	return r, true
}

// checkDevices reports the image devices and their state, from the status endpoint.
func checkDevices(st *status.Status, socket string) Result {
	r := Result{Check: "devices"}
	if st == nil {
		r.Level, r.Message = Skip, "not checked: the status endpoint does not answer (see above)"
		return r
	}
	counts := map[string]int{}
	var failed, hung, stuck []string
	for _, img := range st.Images {
		name := img.ImageRef
		if name == "" {
			name = "image " + img.ID
		}
		r.Details = append(r.Details, fmt.Sprintf("%s: %s, %s, %s fetched", name, img.Mode, img.State, units.Bytes(img.BytesFetched)))
		switch {
		case img.Mode == status.ModeOverlayfs:
			counts["overlayfs"]++
		case img.State == status.StateFailed:
			failed = append(failed, fmt.Sprintf("%s (%s)", name, img.Error))
		case img.Mode == status.ModeInvalid:
			failed = append(failed, fmt.Sprintf("%s (%s)", name, img.Reason))
		case img.State == status.StateAttaching && img.Since != nil && time.Since(*img.Since) > time.Minute:
			stuck = append(stuck, fmt.Sprintf("%s (attaching for %s)", name, time.Since(*img.Since).Round(time.Second)))
		default:
			counts[img.Mode]++
		}
		if img.HungReads > 0 {
			hung = append(hung, fmt.Sprintf("%s (%d)", name, img.HungReads))
		}
	}
	var parts []string
	for _, m := range []string{status.ModeLazy, status.ModeLocal, status.ModeMixed, "overlayfs"} {
		if counts[m] > 0 {
			label := m
			if m == status.ModeLocal {
				label = "downloaded"
			}
			parts = append(parts, fmt.Sprintf("%d %s", counts[m], label))
		}
	}
	if len(parts) == 0 {
		parts = []string{"no images in use"}
	}
	r.Message = strings.Join(parts, ", ")
	switch {
	case len(failed) > 0:
		r.Level = Fail
		r.Message = fmt.Sprintf("%d failed: %s; %s", len(failed), strings.Join(failed, "; "), r.Message)
		r.Fix = fmt.Sprintf("fix the cause named above; 'obd status --socket %s' shows each image, and the container's next start retries", socket)
	case len(hung) > 0 || len(stuck) > 0:
		r.Level = Warn
		var w []string
		if len(hung) > 0 {
			w = append(w, "hung reads: "+strings.Join(hung, ", "))
		}
		if len(stuck) > 0 {
			w = append(w, "slow attach: "+strings.Join(stuck, ", "))
		}
		r.Message = strings.Join(w, "; ") + "; " + r.Message
		r.Fix = "check that the registry answers (obd_registry_errors_total in /metrics) and the audit log of slow reads"
	}
	return r
}
