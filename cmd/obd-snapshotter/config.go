package main

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/BurntSushi/toml"
	"github.com/containerd/log"
)

// Defaults of the [snapshotter] table of obd.toml.
const (
	defaultConfigPath = "/etc/obd/obd.toml"
	defaultRoot       = "/var/lib/obd/snapshotter"
	defaultAddress    = "/run/obd/snapshotter.sock"
	defaultLogLevel   = "info"
)

// config is the part of obd.toml this daemon reads. Other tables belong to other obd components.
type config struct {
	Snapshotter snapshotterConfig `toml:"snapshotter"`
}

// snapshotterConfig is the [snapshotter] table.
type snapshotterConfig struct {
	// Root holds the snapshot metadata (metadata.db) and directories (snapshots/<id>).
	Root string `toml:"root"`
	// Address is the unix socket containerd's proxy_plugins.overlaybd connects to.
	Address string `toml:"address"`
	// LogLevel is trace, debug, info, warn or error.
	LogLevel string `toml:"log_level"`
}

func defaultConfig() config {
	return config{Snapshotter: snapshotterConfig{Root: defaultRoot, Address: defaultAddress, LogLevel: defaultLogLevel}}
}

// loadConfig reads path over the defaults. A missing file is an error only when the user named it (explicit).
func loadConfig(path string, explicit bool) (config, error) {
	cfg := defaultConfig()
	md, err := toml.DecodeFile(path, &cfg)
	switch {
	case errors.Is(err, fs.ErrNotExist) && !explicit:
		return defaultConfig(), nil
	case err != nil:
		return config{}, fmt.Errorf("config %s: %w", path, err)
	}
	for _, k := range md.Undecoded() {
		if len(k) > 0 && k[0] == "snapshotter" {
			log.L.Warnf("config %s: unknown key %s ignored", path, strings.Join(k, "."))
		}
	}
	return cfg, nil
}
