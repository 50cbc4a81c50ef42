package install

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/testenv"
)

// TestContainerdAcceptsEditedConfig gives the configs install writes to the real containerd, which must read them
// and see the proxy plugin and the CRI setting.
func TestContainerdAcceptsEditedConfig(t *testing.T) {
	ctrd := testenv.Tools(t, "containerd")[0]
	out, err := exec.Command(ctrd, "--version").Output()
	if err != nil {
		t.Fatalf("containerd --version: %v", err)
	}
	major := parseContainerdMajor(string(out))
	for name, orig := range map[string]string{"debian": debianConfig, "user": userConfig, "none": ""} {
		t.Run(name, func(t *testing.T) {
			n := newNode(t)
			if orig != "" {
				n.write("etc/containerd/config.toml", orig)
			}
			n.mustRun(func(o *Options) { o.Systemd, o.CRI, o.ContainerdVersion = "no", true, major })
			dump, err := exec.Command(ctrd, "--config", n.opts.ContainerdConfig, "config", "dump").CombinedOutput()
			if err != nil {
				t.Fatalf("containerd config dump: %v\n%s", err, dump)
			}
			for _, want := range []string{"[proxy_plugins.overlaybd]", `address = "/run/obd/snapshotter.sock"`, "disable_snapshot_annotations = false"} {
				if !strings.Contains(string(dump), want) {
					t.Errorf("containerd does not see %q in the edited config:\n%s", want, dump)
				}
			}
		})
	}
}

// TestUnitVerifies checks the unit with systemd's own checker.
func TestUnitVerifies(t *testing.T) {
	analyze := testenv.Tools(t, "systemd-analyze")[0]
	dir := t.TempDir()
	bin := filepath.Join(dir, "obd-snapshotter")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	unit := filepath.Join(dir, UnitName)
	if err := os.WriteFile(unit, Unit(bin, "/etc/obd/obd.toml"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", unit).CombinedOutput()
	// Outside a systemd-booted machine systemd-analyze may complain about the units ours refers to (containerd,
	// network-online.target); only complaints about ours count.
	var own []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, UnitName) {
			own = append(own, l)
		}
	}
	if len(own) > 0 {
		t.Errorf("systemd-analyze verify (%v):\n%s", err, strings.Join(own, "\n"))
	}
}
