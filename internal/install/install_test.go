package install

import (
	"bytes"
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/obdproject/obd/internal/config"
)

// node is a temporary root to install into: every path of Options points inside it, systemd runs (its
// run/systemd/system exists) and systemctl is a fake that records its calls and keeps the unit's enabled/active
// state in files.
type node struct {
	t     *testing.T
	root  string
	opts  Options
	state string // fake systemctl state directory
}

func newNode(t *testing.T) *node {
	t.Helper()
	root := t.TempDir()
	n := &node{t: t, root: root, state: filepath.Join(root, "systemctl-state")}
	for _, d := range []string{"etc/obd", "etc/containerd", "etc/systemd/system", "usr/local/bin", "systemctl-state", "run/systemd/system"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bin := filepath.Join(root, "usr/local/bin/obd-snapshotter")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	systemctl := filepath.Join(root, "usr/local/bin/systemctl")
	script := `#!/bin/sh
state='` + n.state + `'
echo "$*" >> "$state/calls"
case "$1" in
is-enabled) test -e "$state/enabled" ;;
is-active) test -e "$state/active" ;;
enable) touch "$state/enabled"; if [ "$2" = "--now" ]; then touch "$state/active"; fi ;;
daemon-reload|restart) ;;
*) exit 1 ;;
esac
`
	if err := os.WriteFile(systemctl, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	n.opts = Options{
		ObdConfig:         filepath.Join(root, "etc/obd/obd.toml"),
		ContainerdConfig:  filepath.Join(root, "etc/containerd/config.toml"),
		SnapshotterBin:    bin,
		Systemd:           "yes",
		SystemdDir:        filepath.Join(root, "run/systemd/system"),
		UnitDir:           filepath.Join(root, "etc/systemd/system"),
		Systemctl:         systemctl,
		ContainerdVersion: 1,
	}
	return n
}

// run runs install with opts changed by mod and returns what it printed.
func (n *node) run(mod func(*Options)) (string, error) {
	n.t.Helper()
	o := n.opts
	if mod != nil {
		mod(&o)
	}
	var out bytes.Buffer
	o.Out = &out
	err := Run(context.Background(), o)
	return out.String(), err
}

func (n *node) mustRun(mod func(*Options)) string {
	n.t.Helper()
	out, err := n.run(mod)
	if err != nil {
		n.t.Fatalf("install: %v\noutput:\n%s", err, out)
	}
	return out
}

// calls returns the systemctl calls so far.
func (n *node) calls() string {
	b, _ := os.ReadFile(filepath.Join(n.state, "calls"))
	return string(b)
}

func (n *node) write(rel, content string) {
	n.t.Helper()
	if err := os.WriteFile(filepath.Join(n.root, rel), []byte(content), 0o644); err != nil {
		n.t.Fatal(err)
	}
}

func (n *node) read(rel string) string {
	n.t.Helper()
	b, err := os.ReadFile(filepath.Join(n.root, rel))
	if err != nil {
		n.t.Fatal(err)
	}
	return string(b)
}

// snapshot returns every file under the root (but the fake systemctl's state) with its content and mode.
func (n *node) snapshot() map[string]string {
	n.t.Helper()
	files := map[string]string{}
	err := filepath.WalkDir(n.root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(n.root, p)
		if strings.HasPrefix(rel, "systemctl-state") {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			files[rel+"/"] = info.Mode().String()
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		files[rel] = info.Mode().String() + " " + info.ModTime().String() + "\n" + string(b)
		return nil
	})
	if err != nil {
		n.t.Fatal(err)
	}
	return files
}

func assertSame(t *testing.T, before, after map[string]string) {
	t.Helper()
	for k, v := range before {
		if after[k] != v {
			t.Errorf("%s changed:\nbefore: %q\nafter:  %q", k, v, after[k])
		}
	}
	for k := range after {
		if _, ok := before[k]; !ok {
			t.Errorf("%s was created", k)
		}
	}
}

// debianConfig is Debian 12's /etc/containerd/config.toml (containerd 1.6).
const debianConfig = `version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
`

func TestInstallFreshThenNothing(t *testing.T) {
	n := newNode(t)
	n.write("etc/containerd/config.toml", debianConfig)
	out := n.mustRun(nil)
	for _, want := range []string{
		"created " + n.opts.ObdConfig,
		"edited " + n.opts.ContainerdConfig + ": added [proxy_plugins.overlaybd] (type \"snapshot\", address \"/run/obd/snapshotter.sock\")",
		"installed " + filepath.Join(n.opts.UnitDir, UnitName),
		"ran systemctl daemon-reload",
		"ran systemctl enable --now obd-snapshotter.service",
		"next: restart containerd",
		"next: Kubernetes (CRI) pulls pass image annotations",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if got := n.read("etc/obd/obd.toml"); got != string(DefaultConfig) {
		t.Errorf("obd.toml is not the default config")
	}
	cfg := n.read("etc/containerd/config.toml")
	if !strings.HasPrefix(cfg, debianConfig) {
		t.Errorf("the user's config was not kept as it was:\n%s", cfg)
	}
	var doc struct {
		ProxyPlugins map[string]struct{ Type, Address string } `toml:"proxy_plugins"`
	}
	if _, err := toml.Decode(cfg, &doc); err != nil {
		t.Fatalf("edited config does not parse: %v\n%s", err, cfg)
	}
	if p := doc.ProxyPlugins["overlaybd"]; p.Type != "snapshot" || p.Address != config.DefaultAddress {
		t.Errorf("proxy plugin = %+v", p)
	}
	unit := n.read("etc/systemd/system/" + UnitName)
	for _, want := range []string{
		"ExecStart=" + n.opts.SnapshotterBin + " --config " + n.opts.ObdConfig + "\n",
		"Restart=always\n", "Before=containerd.service\n", "KillMode=process\n", "# KillMode=process:",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q:\n%s", want, unit)
		}
	}
	if want := "daemon-reload\nis-enabled --quiet obd-snapshotter.service\nis-active --quiet obd-snapshotter.service\nenable --now obd-snapshotter.service\n"; n.calls() != want {
		t.Errorf("systemctl calls:\n%s\nwant:\n%s", n.calls(), want)
	}

	// Second run: nothing to do, nothing printed, nothing touched, systemctl only asked.
	before := n.snapshot()
	callsBefore := n.calls()
	time.Sleep(10 * time.Millisecond) // a rewrite would show in the modification times
	if out := n.mustRun(nil); out != "" {
		t.Errorf("second run printed:\n%s", out)
	}
	assertSame(t, before, n.snapshot())
	if extra := strings.TrimPrefix(n.calls(), callsBefore); extra != "is-enabled --quiet obd-snapshotter.service\nis-active --quiet obd-snapshotter.service\n" {
		t.Errorf("second run ran systemctl %q", extra)
	}
}

func TestInstallNoContainerdConfig(t *testing.T) {
	for _, tc := range []struct {
		major, version int
	}{{1, 2}, {2, 3}} {
		n := newNode(t)
		out := n.mustRun(func(o *Options) { o.ContainerdVersion, o.Systemd = tc.major, "no" })
		if !strings.Contains(out, "created "+n.opts.ContainerdConfig+": version ") {
			t.Errorf("output does not say the containerd config was created:\n%s", out)
		}
		var doc map[string]any
		cfg := n.read("etc/containerd/config.toml")
		if _, err := toml.Decode(cfg, &doc); err != nil {
			t.Fatal(err)
		}
		if doc["version"] != int64(tc.version) {
			t.Errorf("containerd %d.x: version = %v, want %d", tc.major, doc["version"], tc.version)
		}
		if v, _ := config.Lookup(doc, "proxy_plugins", "overlaybd", "address"); v != config.DefaultAddress {
			t.Errorf("address = %v", v)
		}
		if out := n.mustRun(func(o *Options) { o.Systemd = "no" }); out != "" {
			t.Errorf("second run printed:\n%s", out)
		}
	}
}

// userConfig has comments, odd spacing, another proxy plugin, multi-line values and no final newline.
const userConfig = `# My containerd config. Keep these comments!
version = 2
root = "/var/lib/containerd"   # trailing comment

[grpc]
  address = "/run/containerd/containerd.sock"

[proxy_plugins]
  # stargz for some images
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  disable_snapshot_annotations = true # upstream default
  description = """
[proxy_plugins.overlaybd]
address = "not a table: inside a string"
"""
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    pod_annotations = [
      "a", # comment in an array
      "b",
    ]`

func TestInstallKeepsUserConfig(t *testing.T) {
	n := newNode(t)
	n.write("etc/containerd/config.toml", userConfig)
	n.mustRun(func(o *Options) { o.Systemd = "no" })
	got := n.read("etc/containerd/config.toml")
	if !strings.HasPrefix(got, userConfig+"\n") {
		t.Fatalf("the user's bytes were not kept:\n%s", got)
	}
	added := strings.TrimPrefix(got, userConfig+"\n")
	want := "\n# obd's snapshotter for lazily pulled overlaybd images (obd-snapshotter), added by 'obd install'.\n" +
		"[proxy_plugins.overlaybd]\n  type = \"snapshot\"\n  address = \"/run/obd/snapshotter.sock\"\n"
	if added != want {
		t.Errorf("inserted:\n%q\nwant:\n%q", added, want)
	}
	var doc map[string]any
	if _, err := toml.Decode(got, &doc); err != nil {
		t.Fatal(err)
	}
	if v, _ := config.Lookup(doc, "proxy_plugins", "stargz", "address"); v != "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock" {
		t.Errorf("stargz plugin lost: %v", v)
	}
}

func TestInstallConflictingAddress(t *testing.T) {
	n := newNode(t)
	conf := "version = 2\n\n[proxy_plugins]\n  [proxy_plugins.overlaybd]\n    type = \"snapshot\"\n    address = \"/run/overlaybd-snapshotter/overlaybd.sock\"\n"
	n.write("etc/containerd/config.toml", conf)
	before := n.snapshot()
	out, err := n.run(nil)
	if err == nil {
		t.Fatalf("no error; output:\n%s", out)
	}
	for _, want := range []string{n.opts.ContainerdConfig + ":6:", "/run/overlaybd-snapshotter/overlaybd.sock", "/run/obd/snapshotter.sock", "snapshotter.address"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if out != "" {
		t.Errorf("printed changes despite the error:\n%s", out)
	}
	assertSame(t, before, n.snapshot()) // obd.toml was not created either: checks come first
	if n.calls() != "" {
		t.Errorf("ran systemctl: %s", n.calls())
	}

	// Wrong type, written with dotted keys.
	n.write("etc/containerd/config.toml", "version = 2\nproxy_plugins.overlaybd.type = \"content\"\nproxy_plugins.overlaybd.address = \"/run/obd/snapshotter.sock\"\n")
	if _, err := n.run(nil); err == nil || !strings.Contains(err.Error(), ":2:") || !strings.Contains(err.Error(), `type = "content"`) {
		t.Errorf("wrong type: got %v", err)
	}

	// The same address as obd.toml's: nothing to do.
	n.write("etc/obd/obd.toml", "[snapshotter]\naddress = \"/run/overlaybd-snapshotter/overlaybd.sock\"\n")
	n.write("etc/containerd/config.toml", conf)
	out = n.mustRun(func(o *Options) { o.Systemd = "no" })
	if out != "" {
		t.Errorf("matching address: printed\n%s", out)
	}
}

func TestInstallCRI(t *testing.T) {
	for _, tc := range []struct {
		name, config string
		want         string // the containerd config after install --cri (without the proxy plugin table)
		table        []string
	}{
		{
			name:   "v2 key set to true",
			config: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  disable_snapshot_annotations = true  # keep me\n  snapshotter = \"overlayfs\" # me too\n",
			want:   "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  disable_snapshot_annotations = false  # keep me\n  snapshotter = \"overlaybd\" # me too\n",
			table:  []string{"plugins", "io.containerd.grpc.v1.cri", "containerd"},
		},
		{
			name:   "v2 table without the key",
			config: debianConfig + "  [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    snapshotter = \"overlayfs\"\n",
			want: debianConfig + "  [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n" +
				"    disable_snapshot_annotations = false # added by 'obd install': pass image annotations to snapshotters\n" +
				"    snapshotter = \"overlaybd\"\n",
			table: []string{"plugins", "io.containerd.grpc.v1.cri", "containerd"},
		},
		{
			name:   "v2 no table",
			config: debianConfig,
			want:   debianConfig,
			table:  []string{"plugins", "io.containerd.grpc.v1.cri", "containerd"},
		},
		{
			name:   "v3 table without the key",
			config: "version = 3\n\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'overlayfs'\n",
			want:   "version = 3\n\n[plugins.'io.containerd.cri.v1.images']\n  disable_snapshot_annotations = false # added by 'obd install': pass image annotations to snapshotters\n  snapshotter = \"overlaybd\"\n",
			table:  []string{"plugins", "io.containerd.cri.v1.images"},
		},
		{
			name:   "v3 no table",
			config: "version = 3\n",
			want:   "version = 3\n",
			table:  []string{"plugins", "io.containerd.cri.v1.images"},
		},
		{
			name:   "v2 table with neither key",
			config: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"runc\"\n",
			want: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n" +
				"  disable_snapshot_annotations = false # added by 'obd install': pass image annotations to snapshotters\n" +
				"  snapshotter = \"overlaybd\" # added by 'obd install': pull CRI images with obd's snapshotter\n" +
				"  default_runtime_name = \"runc\"\n",
			table: []string{"plugins", "io.containerd.grpc.v1.cri", "containerd"},
		},
		{
			name:   "v1 (no version)",
			config: "[plugins.cri.containerd]\n  snapshotter = \"overlayfs\"\n  disable_snapshot_annotations = true\n",
			want:   "[plugins.cri.containerd]\n  snapshotter = \"overlaybd\"\n  disable_snapshot_annotations = false\n",
			table:  []string{"plugins", "cri", "containerd"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t)
			n.write("etc/containerd/config.toml", tc.config)
			out := n.mustRun(func(o *Options) { o.Systemd, o.CRI = "no", true })
			got := n.read("etc/containerd/config.toml")
			if !strings.HasPrefix(got, tc.want) {
				t.Errorf("config:\n%s\nwant it to start with:\n%s", got, tc.want)
			}
			for _, want := range []string{"disable_snapshot_annotations = false", `snapshotter = "overlaybd"`,
				"next: for private images, set enable = true in [cri] of " + n.opts.ObdConfig,
				"kubelet with --image-service-endpoint unix:///run/obd/cri.sock"} {
				if !strings.Contains(out, want) {
					t.Errorf("output does not say %q:\n%s", want, out)
				}
			}
			var doc map[string]any
			if _, err := toml.Decode(got, &doc); err != nil {
				t.Fatalf("%v\n%s", err, got)
			}
			if v, _ := config.Lookup(doc, append(tc.table, annotationsKey)...); v != false {
				t.Errorf("%s = %v, want false:\n%s", annotationsKey, v, got)
			}
			if v, _ := config.Lookup(doc, append(tc.table, "snapshotter")...); v != ProxyPluginName {
				t.Errorf("snapshotter = %v, want %s:\n%s", v, ProxyPluginName, got)
			}
			if v, _ := config.Lookup(doc, "proxy_plugins", "overlaybd", "type"); v != "snapshot" {
				t.Errorf("proxy plugin missing:\n%s", got)
			}
			if out := n.mustRun(func(o *Options) { o.Systemd, o.CRI = "no", true }); out != "" {
				t.Errorf("second run printed:\n%s", out)
			}
		})
	}
}

// TestInstallCRIRefusals checks that install --cri refuses values it would not edit safely and names the line.
func TestInstallCRIRefusals(t *testing.T) {
	for _, c := range []struct{ config, want string }{
		{"version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = 5\n", "is not a string"},
		{"version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"\"\"overlayfs\"\"\"\n", "line 3 sets snapshotter in a form obd install does not edit"},
	} {
		n := newNode(t)
		n.write("etc/containerd/config.toml", c.config)
		before := n.snapshot()
		_, err := n.run(func(o *Options) { o.Systemd, o.CRI = "no", true })
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: error %v, want one saying %q", c.config, err, c.want)
		}
		assertSame(t, before, n.snapshot())
	}
}

// TestInstallCRIEnabledProxy checks the kubelet flag printed when obd.toml already serves the CRI proxy.
func TestInstallCRIEnabledProxy(t *testing.T) {
	n := newNode(t)
	n.write("etc/obd/obd.toml", "[cri]\nenable = true\naddress = \"/run/obd-test/cri.sock\"\n")
	out := n.mustRun(func(o *Options) { o.Systemd, o.CRI = "no", true })
	if want := "next: start kubelet with --image-service-endpoint unix:///run/obd-test/cri.sock"; !strings.Contains(out, want) {
		t.Errorf("output does not say %q:\n%s", want, out)
	}
}

func TestInstallDryRun(t *testing.T) {
	n := newNode(t)
	n.write("etc/containerd/config.toml", userConfig)
	before := n.snapshot()
	out := n.mustRun(func(o *Options) { o.DryRun, o.CRI = true, true })
	for _, want := range []string{
		"would create " + n.opts.ObdConfig,
		"would edit " + n.opts.ContainerdConfig + ": added [proxy_plugins.overlaybd] (type \"snapshot\", address \"/run/obd/snapshotter.sock\"); set disable_snapshot_annotations = false in [plugins.\"io.containerd.grpc.v1.cri\".containerd] (line 16)",
		"would install " + filepath.Join(n.opts.UnitDir, UnitName),
		"would run systemctl daemon-reload",
		"would run systemctl enable --now",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("dry run output lacks %q:\n%s", want, out)
		}
	}
	assertSame(t, before, n.snapshot())
	if c := n.calls(); c != "is-enabled --quiet obd-snapshotter.service\nis-active --quiet obd-snapshotter.service\n" {
		t.Errorf("dry run changed systemd: %s", c)
	}
}

func TestInstallInvalidObdConfig(t *testing.T) {
	n := newNode(t)
	n.write("etc/obd/obd.toml", "[cache]\nsize_gb = 0\n")
	before := n.snapshot()
	_, err := n.run(nil)
	if err == nil || !strings.Contains(err.Error(), n.opts.ObdConfig) || !strings.Contains(err.Error(), "cache.size_gb") {
		t.Fatalf("got %v, want an error naming the file and the key", err)
	}
	assertSame(t, before, n.snapshot())
	n.write("etc/obd/obd.toml", "[snapshotter\n")
	if _, err := n.run(nil); err == nil || !strings.Contains(err.Error(), n.opts.ObdConfig) {
		t.Fatalf("syntax error: got %v", err)
	}
}

func TestInstallBrokenContainerdConfig(t *testing.T) {
	n := newNode(t)
	n.write("etc/containerd/config.toml", "version = 2\n\nroot = = 1\n[plugins]\n")
	_, err := n.run(nil)
	if err == nil || !strings.Contains(err.Error(), n.opts.ContainerdConfig+":3:") {
		t.Fatalf("got %v, want an error naming the file and line 3", err)
	}
	n.write("etc/containerd/config.toml", "version = 7\n")
	if _, err := n.run(nil); err == nil || !strings.Contains(err.Error(), "version = 7") {
		t.Fatalf("unknown version: got %v", err)
	}
}

// noSystemd makes the node one where systemd does not run.
func (n *node) noSystemd() {
	if err := os.RemoveAll(n.opts.SystemdDir); err != nil {
		n.t.Fatal(err)
	}
}

func TestInstallWithoutSystemd(t *testing.T) {
	n := newNode(t)
	n.noSystemd()
	out := n.mustRun(func(o *Options) { o.Systemd = "auto" })
	if !strings.Contains(out, "systemd is not running") || !strings.Contains(out, n.opts.SnapshotterBin+" --config "+n.opts.ObdConfig) {
		t.Errorf("no foreground hint:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(n.opts.UnitDir, UnitName)); err == nil {
		t.Error("unit installed without systemd")
	}
	if n.calls() != "" {
		t.Errorf("ran systemctl without systemd: %s", n.calls())
	}
	if out := n.mustRun(func(o *Options) { o.Systemd = "auto" }); out != "" {
		t.Errorf("second run printed:\n%s", out)
	}
	if _, err := n.run(func(o *Options) { o.Systemd = "maybe" }); err == nil {
		t.Error("--systemd maybe accepted")
	}
}

// TestInstallSystemdNotRunning: --systemd yes where systemd does not run (an image being built) installs and
// enables the unit for the next boot, without daemon-reload or starting anything.
func TestInstallSystemdNotRunning(t *testing.T) {
	n := newNode(t)
	n.noSystemd()
	out := n.mustRun(func(o *Options) { o.Systemd = "yes"; o.RestartContainerd = true })
	for _, want := range []string{"installed " + filepath.Join(n.opts.UnitDir, UnitName), "ran systemctl enable obd-snapshotter.service\n", "starts at the next boot", "cannot restart it"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if want := "is-enabled --quiet obd-snapshotter.service\nenable obd-snapshotter.service\n"; n.calls() != want {
		t.Errorf("systemctl calls:\n%s\nwant:\n%s", n.calls(), want)
	}
	if out := n.mustRun(func(o *Options) { o.Systemd = "yes" }); out != "" {
		t.Errorf("second run printed:\n%s", out)
	}
}

func TestInstallMissingBinary(t *testing.T) {
	n := newNode(t)
	before := n.snapshot()
	_, err := n.run(func(o *Options) { o.SnapshotterBin = filepath.Join(n.root, "nowhere/obd-snapshotter") })
	if err == nil || !strings.Contains(err.Error(), "nowhere/obd-snapshotter") || !strings.Contains(err.Error(), "--prefix") {
		t.Fatalf("got %v", err)
	}
	assertSame(t, before, n.snapshot())
}

func TestInstallUpdatesUnitAndRestartsContainerd(t *testing.T) {
	n := newNode(t)
	n.mustRun(nil)
	n.write("etc/systemd/system/"+UnitName, "[Service]\nExecStart=/old\n")
	n.write("etc/containerd/config.toml", "version = 2\n")
	out := n.mustRun(func(o *Options) { o.RestartContainerd = true })
	for _, want := range []string{"updated " + filepath.Join(n.opts.UnitDir, UnitName), "ran systemctl restart containerd.service", "next: restart obd-snapshotter"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "next: restart containerd") {
		t.Errorf("asked to restart containerd after restarting it:\n%s", out)
	}
}

func TestInstallFollowsSymlink(t *testing.T) {
	n := newNode(t)
	n.write("etc/containerd/real.toml", "version = 2\n")
	link := filepath.Join(n.root, "etc/containerd/config.toml")
	if err := os.Symlink("real.toml", link); err != nil {
		t.Fatal(err)
	}
	n.mustRun(func(o *Options) { o.Systemd = "no" })
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&fs.ModeSymlink == 0 {
		t.Fatalf("symlink replaced: %v", err)
	}
	if !strings.Contains(n.read("etc/containerd/real.toml"), "[proxy_plugins.overlaybd]") {
		t.Error("the symlink's target was not edited")
	}
}

func TestParseContainerdMajor(t *testing.T) {
	for out, want := range map[string]int{
		"containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n":                    1,
		"containerd github.com/containerd/containerd/v2 v2.0.0 207ad711eabd375a01713109a8a197d197ff6542\n": 2,
		"containerd containerd.io 1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da\n":                       1,
		"garbage": 1,
	} {
		if got := parseContainerdMajor(out); got != want {
			t.Errorf("%q: got %d, want %d", out, got, want)
		}
	}
}

func TestSnapshotterBinary(t *testing.T) {
	dir := t.TempDir()
	if got, err := SnapshotterBinary(dir); err != nil || got != filepath.Join(dir, "bin", "obd-snapshotter") {
		t.Errorf("SnapshotterBinary(%s) = %q, %v", dir, got, err)
	}
	got, err := SnapshotterBinary("")
	if err != nil || filepath.Base(got) != "obd-snapshotter" || !filepath.IsAbs(got) {
		t.Errorf("SnapshotterBinary() = %q, %v", got, err)
	}
}
