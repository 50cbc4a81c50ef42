package install

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// UnitName is the systemd unit of obd-snapshotter.
const UnitName = "obd-snapshotter.service"

// Unit returns the systemd unit that runs the obd-snapshotter binary at bin with the config file at config.
func Unit(bin, config string) []byte {
	return fmt.Appendf(nil, `# obd-snapshotter: obd's containerd snapshotter "overlaybd" (lazily pulled overlaybd images).
# Written by 'obd install', which rewrites it when it differs: put local changes in a drop-in
# ('systemctl edit obd-snapshotter'), which obd install leaves alone.

[Unit]
Description=obd snapshotter for overlaybd images (containerd proxy plugin "overlaybd")
# containerd connects to the snapshotter's socket: start it before containerd, stop it after.
Before=containerd.service
After=local-fs.target network-online.target
Wants=network-online.target

[Service]
Type=simple
# User=root makes systemd set HOME, so that with [registry] docker_config unset the daemon reads
# /root/.docker/config.json: the file 'obd login' and 'docker login' write when run as root.
User=root
# Images are served as FUSE files behind loop devices: load the modules unless they are built in.
ExecStartPre=-/sbin/modprobe -a fuse loop
ExecStart=%s --config %s
Restart=always
RestartSec=1
# KillMode=process: on stop or restart systemd signals the obd-snapshotter process alone instead of killing
# every process of the unit's control group at once (the default, KillMode=control-group). The device holder
# process the daemon starts keeps the /dev/fuse connections of the running containers' image devices open
# ([snapshotter] keep_devices): their reads wait while the daemon is down and the restarted daemon takes them
# over. Killed with the daemon, it would fail them all with EIO. systemd logs it as a left-over process when the
# unit starts again; that is expected.
KillMode=process
# The daemon serves containers' root filesystems: the OOM killer should pick it last.
OOMScoreAdjust=-999
LimitNOFILE=1048576
# No PrivateMounts=, ProtectSystem= or the like: the daemon's mounts must be visible to containerd.

[Install]
WantedBy=multi-user.target
`, unitQuote(bin), unitQuote(config))
}

// unitQuote quotes a path for a systemd command line when it needs it.
func unitQuote(s string) string {
	if !strings.ContainsAny(s, " \t\"'\\;$%") {
		return s
	}
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "$", "$$", "%", "%%")
	return `"` + r.Replace(s) + `"`
}

// systemctl runs systemctl commands.
type systemctl struct {
	path string
}

// run runs systemctl with args and returns its error with its output.
func (s systemctl) run(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, s.path, args...).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if msg != "" {
			return fmt.Errorf("systemctl %s: %w: %s", strings.Join(args, " "), err, msg)
		}
		return fmt.Errorf("systemctl %s: %w", strings.Join(args, " "), err)
	}
	return nil
}

// query runs a systemctl query (is-enabled, is-active) and reports whether it answered yes (exit 0).
func (s systemctl) query(ctx context.Context, args ...string) bool {
	return exec.CommandContext(ctx, s.path, args...).Run() == nil
}

// SnapshotterBinary returns the obd-snapshotter the unit runs: PREFIX/bin/obd-snapshotter, else the one next to
// the running obd.
func SnapshotterBinary(prefix string) (string, error) {
	if prefix != "" {
		abs, err := filepath.Abs(prefix)
		if err != nil {
			return "", fmt.Errorf("--prefix: %w", err)
		}
		return filepath.Join(abs, "bin", "obd-snapshotter"), nil
	}
	self, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("cannot tell where obd is (%w): pass --prefix", err)
	}
	if resolved, err := filepath.EvalSymlinks(self); err == nil {
		self = resolved
	}
	return filepath.Join(filepath.Dir(self), "obd-snapshotter"), nil
}
