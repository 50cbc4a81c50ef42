// Package install sets a node up for obd: it writes obd.toml, registers obd's snapshotter in containerd's config
// and installs the systemd unit of obd-snapshotter. It is idempotent and says what it changes, so running it
// again is always safe; it edits containerd's config as text and never rewrites what the user wrote.
package install

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"

	"github.com/BurntSushi/toml"

	"github.com/obdproject/obd/internal/atomicfile"
	"github.com/obdproject/obd/internal/config"
)

// DefaultConfig is obd.toml with every key at its default value, commented out: what install writes when the
// file is missing (deploy/obd.toml is a copy, and a test keeps both equal to the daemon's defaults).
//
//go:embed obd.toml
var DefaultConfig []byte

// Default paths.
const (
	DefaultContainerdConfig = "/etc/containerd/config.toml"
	DefaultUnitDir          = "/etc/systemd/system"
	// SystemdRunDir exists when systemd is the running init system (sd_booted(3)).
	SystemdRunDir = "/run/systemd/system"
)

// Options configure Run. Paths are absolute; empty ones take the defaults.
type Options struct {
	ObdConfig        string // obd.toml (config.DefaultPath)
	ContainerdConfig string // containerd's config.toml (DefaultContainerdConfig)
	SnapshotterBin   string // the obd-snapshotter binary the unit runs; required when a unit is installed
	// Systemd is "auto" (use systemd when it runs: SystemdDir exists), "yes" or "no".
	Systemd    string
	SystemdDir string // SystemdRunDir
	UnitDir    string // DefaultUnitDir
	Systemctl  string // the systemctl program ("systemctl" on PATH)
	// CRI sets disable_snapshot_annotations = false and snapshotter = "overlaybd" for containerd's CRI plugin
	// (Kubernetes) and tells the kubelet flag that sends pulls through obd's CRI proxy.
	CRI bool
	// RestartContainerd restarts containerd (through systemd) when its config changed.
	RestartContainerd bool
	// DryRun says what would change and changes nothing (systemctl is asked only read-only questions).
	DryRun bool
	// ContainerdVersion is containerd's major version, which decides the version of a config file created from
	// scratch (2 for containerd 1.x, 3 for 2.x); 0 asks 'containerd --version' and falls back to 1.x.
	ContainerdVersion int
	Out               io.Writer // changes and next steps (os.Stdout)
}

// Run sets the node up as opts say. It prints one line per change (nothing when nothing changes) and, after
// changes, what the user has to do next. It checks everything before it changes anything: an invalid obd.toml or
// a conflicting containerd config is an error and leaves every file as it was.
func Run(ctx context.Context, opts Options) error {
	o, err := opts.withDefaults()
	if err != nil {
		return err
	}
	r := &run{opts: o, out: o.Out}

	// 1. obd.toml: validate the user's, or plan the default one.
	cfg := config.Default()
	_, err = os.Stat(o.ObdConfig)
	createObd := errors.Is(err, fs.ErrNotExist)
	switch {
	case createObd:
	case err != nil:
		return fmt.Errorf("obd config: %w", err)
	default:
		var warnings []string
		cfg, warnings, err = config.Load(o.ObdConfig, true)
		if err != nil {
			return fmt.Errorf("%w — fix it, or move it away to get a fresh default one; obd install changed nothing", err)
		}
		for _, w := range warnings {
			fmt.Fprintln(r.out, "warning:", w)
		}
	}
	address := cfg.Snapshotter.Address
	if !filepath.IsAbs(address) {
		return fmt.Errorf("obd config %s: snapshotter.address = %q: want the absolute path of a unix socket", o.ObdConfig, address)
	}

	// 2. containerd's config.
	ctrPath := o.ContainerdConfig
	if resolved, err := filepath.EvalSymlinks(ctrPath); err == nil {
		ctrPath = resolved // edit the file a symlink points to, and keep the symlink
	}
	ctrData, err := os.ReadFile(ctrPath)
	ctrExists := err == nil
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("containerd config: %w", err)
	}
	newVersion := 2
	if !ctrExists && o.containerdMajor(ctx) >= 2 {
		newVersion = 3
	}
	plan, err := planContainerd(o.ContainerdConfig, ctrData, ctrExists, address, o.CRI, newVersion)
	if err != nil {
		return err
	}

	// 3. systemd: the unit is installed where systemd runs, or where the user asks for it (e.g. in an image being
	// built, where it is enabled to start at boot).
	systemdRunning := isDir(o.SystemdDir)
	useSystemd, err := o.systemdWanted(systemdRunning)
	if err != nil {
		return err
	}
	unitPath := filepath.Join(o.UnitDir, UnitName)
	var unit, oldUnit []byte
	sc := systemctl{path: o.Systemctl}
	if useSystemd {
		if err := checkExecutable(o.SnapshotterBin); err != nil {
			return err
		}
		p, err := exec.LookPath(o.Systemctl)
		if err != nil {
			return fmt.Errorf("systemd: %s not found: %w (use --systemd no to skip the unit)", o.Systemctl, err)
		}
		sc.path = p
		unit = Unit(o.SnapshotterBin, o.ObdConfig)
		oldUnit, err = os.ReadFile(unitPath)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("systemd unit: %w", err)
		}
	}

	// Everything checked: make the changes.
	if createObd {
		if err := r.change("create", o.ObdConfig+" (every setting at its default, commented out)", func() error {
			return writeFileAtomic(o.ObdConfig, DefaultConfig, 0o644)
		}); err != nil {
			return err
		}
	}
	if plan.changed() {
		what, changes := "edit", plan.changes
		if !ctrExists {
			what, changes = "create", append([]string{fmt.Sprintf("version %d", plan.version)}, changes...)
		}
		if err := r.change(what, o.ContainerdConfig+": "+strings.Join(changes, "; "), func() error {
			return writeFileAtomic(ctrPath, plan.new, 0o644)
		}); err != nil {
			return err
		}
	}
	unitChanged := useSystemd && !bytes.Equal(unit, oldUnit)
	if unitChanged {
		what := "install"
		if oldUnit != nil {
			what = "update"
		}
		if err := r.change(what, unitPath, func() error { return writeFileAtomic(unitPath, unit, 0o644) }); err != nil {
			return err
		}
		if systemdRunning {
			if err := r.change("run", "systemctl daemon-reload", func() error { return sc.run(ctx, "daemon-reload") }); err != nil {
				return err
			}
		}
	}
	switch {
	case useSystemd && systemdRunning:
		enabled := sc.query(ctx, "is-enabled", "--quiet", UnitName)
		active := sc.query(ctx, "is-active", "--quiet", UnitName)
		switch {
		case !enabled || !active:
			if err := r.change("run", "systemctl enable --now "+UnitName, func() error { return sc.run(ctx, "enable", "--now", UnitName) }); err != nil {
				return err
			}
		case unitChanged && oldUnit != nil:
			r.next(fmt.Sprintf("restart obd-snapshotter to run the updated unit: systemctl restart %s", UnitName))
		}
	case useSystemd: // systemd does not run here (an image being built, a container): enable for the next boot
		if !sc.query(ctx, "is-enabled", "--quiet", UnitName) {
			if err := r.change("run", "systemctl enable "+UnitName, func() error { return sc.run(ctx, "enable", UnitName) }); err != nil {
				return err
			}
		}
	}
	if plan.changed() {
		switch {
		case o.RestartContainerd && systemdRunning:
			if err := r.change("run", "systemctl restart containerd.service", func() error { return sc.run(ctx, "restart", "containerd.service") }); err != nil {
				return err
			}
		case systemdRunning:
			r.next("restart containerd so that it loads its new configuration: systemctl restart containerd (or run obd install --restart-containerd)")
		default:
			r.next("restart containerd so that it loads its new configuration (systemd is not running here: obd install cannot restart it)")
		}
	}

	// Next steps, only along with changes: a run that changes nothing prints nothing.
	if r.changed {
		switch {
		case !useSystemd:
			r.next(fmt.Sprintf("no systemd unit was installed (systemd is not running here, or --systemd no): start the snapshotter before containerd, in the foreground or under your init system:\n    %s --config %s", o.SnapshotterBin, o.ObdConfig))
		case !systemdRunning:
			r.next(fmt.Sprintf("systemd is not running here: %s is enabled and starts at the next boot with systemd", UnitName))
		}
		if plan.addedPlugin && plan.criEnabled && !plan.annotationsPassed {
			r.next(fmt.Sprintf("Kubernetes (CRI) pulls pass image annotations to snapshotters only with %s = false in [%s] of %s, which lazy pulls of overlaybd images need: run obd install --cri to set it", annotationsKey, plan.criTable, o.ContainerdConfig))
		}
		if plan.criEnabled && plan.annotationsPassed {
			if v, _ := snapshotterOf(plan.new, plan.version); v != ProxyPluginName {
				r.next(fmt.Sprintf("to run Kubernetes pods from overlaybd images, set snapshotter = %q in [%s] (obd-snapshotter serves ordinary images too, as overlayfs does)", ProxyPluginName, plan.criTable))
			}
		}
		if o.CRI {
			flag := "--image-service-endpoint unix://" + cfg.CRI.Address
			if cfg.CRI.Enable {
				r.next(fmt.Sprintf("start kubelet with %s (its --container-runtime-endpoint stays containerd's socket), so that lazy reads of private images use the pods' image pull secrets", flag))
			} else {
				r.next(fmt.Sprintf("for private images, set enable = true in [cri] of %s, restart obd-snapshotter and start kubelet with %s (its --container-runtime-endpoint stays containerd's socket), so that lazy reads use the pods' image pull secrets", o.ObdConfig, flag))
			}
		}
	}
	r.flush()
	return nil
}

// withDefaults fills in the default paths.
func (o Options) withDefaults() (Options, error) {
	def := func(p *string, v string) {
		if *p == "" {
			*p = v
		}
	}
	def(&o.ObdConfig, config.DefaultPath)
	def(&o.ContainerdConfig, DefaultContainerdConfig)
	def(&o.Systemd, "auto")
	def(&o.SystemdDir, SystemdRunDir)
	def(&o.UnitDir, DefaultUnitDir)
	def(&o.Systemctl, "systemctl")
	if o.Out == nil {
		o.Out = os.Stdout
	}
	for name, p := range map[string]string{"obd config": o.ObdConfig, "containerd config": o.ContainerdConfig, "unit directory": o.UnitDir} {
		if !filepath.IsAbs(p) {
			return o, fmt.Errorf("%s %q: want an absolute path", name, p)
		}
	}
	if o.SnapshotterBin != "" && !filepath.IsAbs(o.SnapshotterBin) {
		return o, fmt.Errorf("obd-snapshotter binary %q: want an absolute path", o.SnapshotterBin)
	}
	return o, nil
}

// systemdWanted decides whether to install the unit.
func (o Options) systemdWanted(running bool) (bool, error) {
	switch o.Systemd {
	case "yes":
		return true, nil
	case "no":
		return false, nil
	case "auto":
		return running, nil
	}
	return false, fmt.Errorf("--systemd %q: want auto, yes or no", o.Systemd)
}

// isDir reports whether path is a directory.
func isDir(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.IsDir()
}

// containerdMajor returns containerd's major version: ContainerdVersion, else what 'containerd --version' says,
// else 1.
func (o Options) containerdMajor(ctx context.Context) int {
	if o.ContainerdVersion > 0 {
		return o.ContainerdVersion
	}
	out, err := exec.CommandContext(ctx, "containerd", "--version").Output()
	if err != nil {
		return 1
	}
	return parseContainerdMajor(string(out))
}

// containerdVersionRE finds the version in 'containerd --version' output, e.g. "containerd
// github.com/containerd/containerd 1.6.20~ds1 …" or "containerd github.com/containerd/containerd/v2 v2.0.0 …".
var containerdVersionRE = regexp.MustCompile(`\s+v?(\d+)\.\d+`)

func parseContainerdMajor(out string) int {
	if m := containerdVersionRE.FindStringSubmatch(out); m != nil {
		if n, err := strconv.Atoi(m[1]); err == nil {
			return n
		}
	}
	return 1
}

// snapshotterOf returns the CRI snapshotter set in a containerd config.
func snapshotterOf(data []byte, version int) (string, bool) {
	doc := map[string]any{}
	if _, err := toml.Decode(string(data), &doc); err != nil {
		return "", false
	}
	v, ok := config.Lookup(doc, append(criLayoutOf(version).table, "snapshotter")...)
	s, _ := v.(string)
	return s, ok
}

// checkExecutable checks that the unit's binary is there.
func checkExecutable(path string) error {
	if path == "" {
		return errors.New("obd-snapshotter: no binary to run: pass --prefix DIR (DIR/bin/obd-snapshotter)")
	}
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("obd-snapshotter binary %s: %w — build it (make build) and put it next to obd, or pass --prefix DIR for DIR/bin/obd-snapshotter", path, err)
	}
	if st.IsDir() || st.Mode()&0o111 == 0 {
		return fmt.Errorf("obd-snapshotter binary %s is not an executable file", path)
	}
	return nil
}

// run carries out the changes of one Run and reports them.
type run struct {
	opts    Options
	out     io.Writer
	changed bool
	hints   []string
}

// pastTense of the verbs changes use.
var pastTense = map[string]string{"create": "created", "edit": "edited", "install": "installed", "update": "updated", "run": "ran"}

// change prints what is changed and does it (with DryRun, prints what would be changed).
func (r *run) change(verb, what string, do func() error) error {
	r.changed = true
	if r.opts.DryRun {
		fmt.Fprintf(r.out, "would %s %s\n", verb, what)
		return nil
	}
	if err := do(); err != nil {
		return err
	}
	fmt.Fprintf(r.out, "%s %s\n", pastTense[verb], what)
	return nil
}

// next records a step left to the user.
func (r *run) next(s string) { r.hints = append(r.hints, s) }

// flush prints the next steps.
func (r *run) flush() {
	for _, h := range r.hints {
		fmt.Fprintln(r.out, "next:", h)
	}
}

// writeFileAtomic replaces path with data through a temporary file in the same directory, keeping the mode and
// owner of an existing file (perm is for a new one).
func writeFileAtomic(path string, data []byte, perm fs.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	uid, gid := -1, -1
	if st, err := os.Stat(path); err == nil {
		perm = st.Mode().Perm()
		uid, gid = statOwner(st)
	}
	return atomicfile.Replace(path, perm, func(f *os.File) error {
		if _, err := f.Write(data); err != nil {
			return err
		}
		if uid >= 0 && os.Geteuid() == 0 {
			if err := f.Chown(uid, gid); err != nil {
				return err
			}
		}
		return f.Sync()
	})
}

// statOwner returns the owner of a file, or -1, -1 where the system does not say.
func statOwner(st fs.FileInfo) (uid, gid int) {
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		return int(sys.Uid), int(sys.Gid)
	}
	return -1, -1
}
