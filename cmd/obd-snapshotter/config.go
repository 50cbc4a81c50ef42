package main

import (
	"github.com/containerd/log"

	obdconfig "github.com/obdproject/obd/internal/config"
)

// The configuration types and defaults live in internal/config, shared with the CLI's status and health commands.
type (
	config            = obdconfig.Config
	snapshotterConfig = obdconfig.Snapshotter
	registryConfig    = obdconfig.Registry
)

// Defaults of the [snapshotter] table of obd.toml.
const (
	defaultConfigPath = obdconfig.DefaultPath
	defaultRoot       = obdconfig.DefaultRoot
	defaultAddress    = obdconfig.DefaultAddress
	defaultLogLevel   = obdconfig.DefaultLogLevel
)

func defaultConfig() config { return obdconfig.Default() }

// loadConfig reads path over the defaults and logs unknown keys. A missing file is an error only when the user
// named it (explicit).
func loadConfig(path string, explicit bool) (config, error) {
	cfg, warnings, err := obdconfig.Load(path, explicit)
	for _, w := range warnings {
		log.L.Warn(w)
	}
	return cfg, err
}
