package main

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/containerd/log"
)

// Defaults of the [snapshotter] table of obd.toml.
const (
	defaultConfigPath = "/etc/obd/obd.toml"
	defaultRoot       = "/var/lib/obd/snapshotter"
	defaultAddress    = "/run/obd/snapshotter.sock"
	defaultLogLevel   = "info"
	defaultCacheDir   = "/var/lib/obd/cache"
	defaultCacheGB    = 4
	defaultBlockKB    = 256
	defaultBudget     = "60s"
)

// config is the part of obd.toml this daemon reads. Other tables belong to other obd components.
type config struct {
	Snapshotter snapshotterConfig `toml:"snapshotter"`
	Cache       cacheConfig       `toml:"cache"`
	Registry    registryConfig    `toml:"registry"`
}

// cacheConfig is the [cache] table: the on-disk cache of blob ranges fetched from registries.
type cacheConfig struct {
	// Dir holds the cached data.
	Dir string `toml:"dir"`
	// SizeGB bounds the cache's data in GiB.
	SizeGB int64 `toml:"size_gb"`
	// BlockSizeKB is the unit, in KiB, in which missing data is fetched and cached.
	BlockSizeKB int64 `toml:"block_size_kb"`
}

// registryConfig is the [registry] table: how blobs are read lazily from registries.
type registryConfig struct {
	// DockerConfig is the credentials file (docker config.json format); empty means $DOCKER_CONFIG/config.json or
	// ~/.docker/config.json.
	DockerConfig string `toml:"docker_config"`
	// PlainHTTP lists registry hosts served over plain HTTP; localhost and 127.0.0.0/8 always are.
	PlainHTTP []string `toml:"plain_http"`
	// Insecure lists registry hosts whose TLS certificates are not verified.
	Insecure []string `toml:"insecure"`
	// RetryBudget bounds how long one read retries a failing registry before the read fails with EIO.
	RetryBudget string `toml:"retry_budget"`
	// Mirrors are tried first for blob reads (host[:port]).
	Mirrors []string `toml:"mirrors"`
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
	return config{
		Snapshotter: snapshotterConfig{Root: defaultRoot, Address: defaultAddress, LogLevel: defaultLogLevel},
		Cache:       cacheConfig{Dir: defaultCacheDir, SizeGB: defaultCacheGB, BlockSizeKB: defaultBlockKB},
		Registry:    registryConfig{RetryBudget: defaultBudget},
	}
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
		if len(k) > 0 && (k[0] == "snapshotter" || k[0] == "cache" || k[0] == "registry") {
			log.L.Warnf("config %s: unknown key %s ignored", path, strings.Join(k, "."))
		}
	}
	if err := cfg.validate(); err != nil {
		return config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

func (c config) validate() error {
	if c.Cache.SizeGB <= 0 {
		return fmt.Errorf("cache.size_gb = %d: want a positive number of GiB", c.Cache.SizeGB)
	}
	if b := c.Cache.BlockSizeKB; b < 4 || b > 4096 || b&(b-1) != 0 {
		return fmt.Errorf("cache.block_size_kb = %d: want a power of two from 4 to 4096", b)
	}
	if d, err := time.ParseDuration(c.Registry.RetryBudget); err != nil || d <= 0 {
		return fmt.Errorf("registry.retry_budget = %q: want a positive duration such as \"60s\"", c.Registry.RetryBudget)
	}
	return nil
}
