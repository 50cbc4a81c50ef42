package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestLoadOperabilityKeys(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "obd.toml")
	if err := os.WriteFile(path, []byte(`
[snapshotter]
address = "/run/x/sn.sock"
status_address = "/run/x/status.sock"

[metrics]
address = ""

[audit]
slow_read_ms = 250
hung_read_ms = 3000
path = "/var/log/obd/audit.log"
typo = 1
`), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, warnings, err := Load(path, true)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Metrics.Address != "" || cfg.Snapshotter.StatusSocket() != "/run/x/status.sock" ||
		cfg.Audit.SlowRead() != 250*time.Millisecond || cfg.Audit.HungRead() != 3*time.Second || cfg.Audit.Path != "/var/log/obd/audit.log" {
		t.Errorf("config %+v", cfg)
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "audit.typo") {
		t.Errorf("warnings %q, want one about audit.typo", warnings)
	}

	d := Default()
	if d.Metrics.Address != DefaultMetricsAddress || d.Snapshotter.StatusSocket() != "/run/obd/snapshotter.status.sock" || d.Audit.SlowReadMS != 500 {
		t.Errorf("defaults %+v", d)
	}
	if cfg, _, err := Load(filepath.Join(dir, "missing.toml"), false); err != nil || !reflect.DeepEqual(cfg, Default()) {
		t.Errorf("missing default file: %+v, %v", cfg, err)
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		mod  func(*Config)
		want string
	}{
		{func(c *Config) { c.Metrics.Address = "9864" }, "metrics.address"},
		{func(c *Config) { c.Audit.SlowReadMS = -1 }, "audit.slow_read_ms"},
		{func(c *Config) { c.Audit.HungReadMS = 0 }, "audit.hung_read_ms"},
		{func(c *Config) { c.Cache.BlockSizeKB = 3 }, "cache.block_size_kb"},
		{func(c *Config) { c.Cache.BlockSizeKB, c.Cache.FetchKB = 64, 96 }, "cache.fetch_kb"},
		{func(c *Config) { c.Cache.FetchKB = -1 }, "cache.fetch_kb"},
		{func(c *Config) { c.Registry.RetryBudget = "soon" }, "registry.retry_budget"},
		{func(c *Config) { c.Snapshotter.RWMode = "rw" }, "snapshotter.rw_mode"},
		{func(c *Config) { c.Snapshotter.RootfsQuota = "lots" }, "snapshotter.rootfs_quota"},
	} {
		c := Default()
		tc.mod(&c)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Validate: %v, want an error about %s", err, tc.want)
		}
	}
	if err := Default().Validate(); err != nil {
		t.Errorf("defaults: %v", err)
	}
	c := Default()
	c.Metrics.Address, c.Audit.SlowReadMS = "", 0
	if err := c.Validate(); err != nil {
		t.Errorf("metrics and audit off: %v", err)
	}
	c = Default()
	c.Snapshotter.RWMode, c.Snapshotter.RootfsQuota = "dir", "20g"
	if q, err := c.Snapshotter.Quota(); err != nil || q != 20<<30 || c.Validate() != nil {
		t.Errorf("rw_mode dir with a 20g quota: %d, %v, %v", q, err, c.Validate())
	}
}

func TestLoadSnapshotterTable(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "obd.toml")
	if err := os.WriteFile(path, []byte(`
[snapshotter]
root = "/srv/obd"
log_level = "debug"
typo = 1

[cache]
size = "10GiB"
`), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, warnings, err := Load(path, true)
	if err != nil {
		t.Fatal(err)
	}
	want := Snapshotter{Root: "/srv/obd", Address: DefaultAddress, LogLevel: "debug", KeepDevices: true, ReadAheadKB: DefaultReadAheadKB, RWMode: "overlayfs", Referrers: true}
	if cfg.Snapshotter != want {
		t.Errorf("config %+v, want %+v", cfg.Snapshotter, want)
	}
	if len(warnings) != 2 {
		t.Errorf("warnings %q, want snapshotter.typo and cache.size", warnings)
	}

	missing := filepath.Join(dir, "missing.toml")
	if _, _, err := Load(missing, true); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing explicit config: %v", err)
	}
	if err := os.WriteFile(path, []byte("[snapshotter\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Load(path, false); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("broken config: %v", err)
	}
}
