package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runInstall runs 'obd install' with every path inside root.
func runInstall(t *testing.T, root string, extra ...string) (string, error) {
	t.Helper()
	args := append([]string{"install",
		"--obd-config", filepath.Join(root, "etc/obd/obd.toml"),
		"--containerd-config", filepath.Join(root, "etc/containerd/config.toml"),
		"--unit-dir", filepath.Join(root, "etc/systemd/system"),
		"--prefix", filepath.Join(root, "usr/local"),
		"--systemd", "no",
	}, extra...)
	var out bytes.Buffer
	cmd := newRootCmd()
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	err := cmd.ExecuteContext(t.Context())
	return out.String(), err
}

func TestInstallCommand(t *testing.T) {
	root := t.TempDir()
	ctrConfig := filepath.Join(root, "etc/containerd/config.toml")
	if err := os.MkdirAll(filepath.Dir(ctrConfig), 0o755); err != nil {
		t.Fatal(err)
	}
	orig := "# mine\nversion = 2\n"
	if err := os.WriteFile(ctrConfig, []byte(orig), 0o644); err != nil {
		t.Fatal(err)
	}

	out, err := runInstall(t, root, "--dry-run", "--cri")
	if err != nil || !strings.Contains(out, "would create ") || !strings.Contains(out, "would edit "+ctrConfig) {
		t.Fatalf("dry run: %v\n%s", err, out)
	}
	if b, _ := os.ReadFile(ctrConfig); string(b) != orig {
		t.Fatal("dry run changed the containerd config")
	}
	if _, err := os.Stat(filepath.Join(root, "etc/obd/obd.toml")); err == nil {
		t.Fatal("dry run created obd.toml")
	}

	out, err = runInstall(t, root, "--cri")
	if err != nil {
		t.Fatalf("install: %v\n%s", err, out)
	}
	for _, want := range []string{"created " + filepath.Join(root, "etc/obd/obd.toml"), "edited " + ctrConfig, filepath.Join(root, "usr/local/bin/obd-snapshotter") + " --config"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	b, _ := os.ReadFile(ctrConfig)
	if !strings.HasPrefix(string(b), orig) || !strings.Contains(string(b), "[proxy_plugins.overlaybd]") || !strings.Contains(string(b), "disable_snapshot_annotations = false") {
		t.Errorf("containerd config:\n%s", b)
	}

	if out, err := runInstall(t, root, "--cri"); err != nil || out != "" {
		t.Errorf("second run: %v, printed:\n%s", err, out)
	}

	// A conflicting address is an error that names the line.
	if err := os.WriteFile(ctrConfig, []byte("version = 2\n[proxy_plugins.overlaybd]\ntype = \"snapshot\"\naddress = \"/elsewhere.sock\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := runInstall(t, root); err == nil || !strings.Contains(err.Error(), ctrConfig+":4:") {
		t.Errorf("conflict: got %v", err)
	}
}

func TestInstallCommandNeedsBinaryForUnit(t *testing.T) {
	root := t.TempDir()
	_, err := runInstall(t, root, "--systemd", "yes")
	if err == nil || !strings.Contains(err.Error(), filepath.Join(root, "usr/local/bin/obd-snapshotter")) {
		t.Fatalf("got %v, want an error naming the missing binary", err)
	}
}
