// Package config reads obd.toml, the node configuration shared by obd-snapshotter (which runs with it) and the
// obd CLI (whose status and health commands find the daemon's sockets and check the file with the same loader).
package config

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/obdproject/obd/internal/units"
)

// Defaults of obd.toml.
const (
	DefaultPath        = "/etc/obd/obd.toml"
	DefaultRoot        = "/var/lib/obd/snapshotter"
	DefaultAddress     = "/run/obd/snapshotter.sock"
	DefaultLogLevel    = "info"
	DefaultCacheDir    = "/var/lib/obd/cache"
	DefaultCacheGB     = 4
	DefaultBlockKB     = 64
	DefaultFetchKB     = 256
	DefaultRetryBudget = "60s"
	// DefaultCredentialHelpers is obd's token helpers file (registry.DefaultHelperFile).
	DefaultCredentialHelpers = "/etc/obd/credential-helpers.json"
	// DefaultMetricsAddress serves Prometheus metrics on localhost. Upstream's two exporters both default to 9863;
	// obd uses 9864 so that it can run beside either.
	DefaultMetricsAddress = "127.0.0.1:9864"
	// DefaultSlowReadMS is the latency from which a device read is written to the audit log.
	DefaultSlowReadMS = 500
	// DefaultHungReadMS is the age from which a device read that has not finished counts as hung.
	DefaultHungReadMS = 10000
	// DefaultReadAheadKB is the read-ahead of the images' devices: the kernel's default for a block device.
	DefaultReadAheadKB = 128
	// DefaultPrefetchConcurrency is the number of range requests in flight while a trace is prefetched.
	DefaultPrefetchConcurrency = 8
	// DefaultMetadataMB bounds the metadata prefetch of an image without a recorded start.
	DefaultMetadataMB = 16
	// DefaultPredecodeMB bounds the blocks of a start decoded ahead of its reads.
	DefaultPredecodeMB = 64
	// DefaultDownloadDelay and DefaultDownloadMBps are upstream's background download defaults (off by default).
	DefaultDownloadDelay = 300
	DefaultDownloadMBps  = 100
	// DefaultDownloadConcurrency keeps 8 MiB in flight in 1 MiB range requests: more than a 1 Gbit/s link with
	// 20 ms of round trip holds (2.5 MB).
	DefaultDownloadConcurrency = 8
	// DefaultCRIAddress is the socket of the CRI image-service proxy (kubelet's --image-service-endpoint).
	DefaultCRIAddress = "/run/obd/cri.sock"
	// DefaultContainerdAddress is containerd's gRPC socket, which serves the CRI the proxy forwards to.
	DefaultContainerdAddress = "/run/containerd/containerd.sock"
	// DefaultCRICredentialTTL is how long credentials captured from a CRI pull are kept after their last use.
	DefaultCRICredentialTTL = "24h"
)

// Config is the part of obd.toml that obd-snapshotter reads. Other tables belong to other obd components.
type Config struct {
	Snapshotter Snapshotter `toml:"snapshotter"`
	Cache       Cache       `toml:"cache"`
	Registry    Registry    `toml:"registry"`
	Metrics     Metrics     `toml:"metrics"`
	Audit       Audit       `toml:"audit"`
	Prefetch    Prefetch    `toml:"prefetch"`
	Download    Download    `toml:"download"`
	CRI         CRI         `toml:"cri"`
}

// CRI is the [cri] table: Kubernetes. The CRI image-service proxy between kubelet and containerd keeps the
// credentials of each pull for the lazy reads of that image; kubelet credential provider plugins are a credential
// source of their own, used whether or not the proxy runs.
type CRI struct {
	// Enable serves the CRI image-service proxy on Address.
	Enable bool `toml:"enable"`
	// Address is the unix socket of the proxy: kubelet's --image-service-endpoint unix://<Address>.
	Address string `toml:"address"`
	// ContainerdAddress is containerd's gRPC socket, where the proxy forwards every call.
	ContainerdAddress string `toml:"containerd_address"`
	// CredentialTTL is how long the credentials of a pull are kept after the pull or their last use (a Go
	// duration).
	CredentialTTL string `toml:"credential_ttl"`
	// CredentialProviderDir holds the executables of CredentialProviders (kubelet's
	// --image-credential-provider-bin-dir).
	CredentialProviderDir string `toml:"credential_provider_dir"`
	// CredentialProviders are kubelet credential provider plugins, asked for the registries they match.
	CredentialProviders []CredentialProvider `toml:"credential_providers"`
}

// CredentialProvider is one kubelet credential provider plugin (kubelet's CredentialProviderConfig entry).
type CredentialProvider struct {
	// Name is the executable in [cri] credential_provider_dir.
	Name string `toml:"name"`
	// MatchImages are the images it serves: "host[:port][/path]" with "*" for one part of the host name.
	MatchImages []string `toml:"match_images"`
	// DefaultCacheDuration is how long an answer is used when the plugin gives no cacheDuration (a Go duration).
	DefaultCacheDuration string `toml:"default_cache_duration"`
	// Args are passed to the executable.
	Args []string `toml:"args"`
	// Env is added to the environment of the executable.
	Env map[string]string `toml:"env"`
}

// CredentialTTLDuration returns CredentialTTL as a duration (checked by Validate).
func (c CRI) CredentialTTLDuration() time.Duration {
	d, _ := time.ParseDuration(c.CredentialTTL)
	return d
}

// Prefetch is the [prefetch] table: fetching a recorded start ahead of demand.
type Prefetch struct {
	// Concurrency is the number of range requests in flight while a trace is prefetched.
	Concurrency int `toml:"concurrency"`
	// ProfilesDir holds the startup profiles registered on the node ("": <snapshotter root>/profiles).
	ProfilesDir string `toml:"profiles_dir"`
	// OnPull starts an image's prefetch (and opens its layers) when a pull has committed its layers, instead of
	// when its first container is created.
	OnPull bool `toml:"on_pull"`
	// AttachOnPull attaches an image's device when a pull has committed its top layer, instead of when its first
	// container is created.
	AttachOnPull bool `toml:"attach_on_pull"`
	// MetadataMB bounds the blob ranges fetched for the filesystem metadata of an image without a recorded start
	// when its device is attached (0: no metadata prefetch).
	MetadataMB int `toml:"metadata_mb"`
	// PredecodeMB bounds the decoded blocks of an image's start kept ahead of its reads when it is attached on a
	// node that holds them: those of its recorded start, else of its last start on the node (0: off, and starts
	// are not learned).
	PredecodeMB int `toml:"predecode_mb"`
	// PrimePageCache reads what a start over an image is known to read into the kernel's page cache while the
	// container is created (with PredecodeMB, whose bound it shares).
	PrimePageCache bool `toml:"prime_page_cache"`
}

// ProfilesDir returns the directory of registered startup profiles.
func (c Config) ProfilesDir() string {
	if c.Prefetch.ProfilesDir != "" {
		return c.Prefetch.ProfilesDir
	}
	return filepath.Join(c.Snapshotter.Root, "profiles")
}

// Download is the [download] table: the background download of attached images' blobs (upstream's semantics).
type Download struct {
	// Enable turns the background download on.
	Enable bool `toml:"enable"`
	// DelaySeconds is how long after an image is attached (and its trace prefetched) its download starts.
	DelaySeconds int64 `toml:"delay"`
	// MaxMBps bounds the download rate in MB/s per image (0: unbounded).
	MaxMBps int64 `toml:"max_mbps"`
	// Concurrency is the number of range requests in flight per blob.
	Concurrency int `toml:"concurrency"`
}

// Snapshotter is the [snapshotter] table.
type Snapshotter struct {
	// Root holds the snapshot metadata (metadata.db) and directories (snapshots/<id>).
	Root string `toml:"root"`
	// Address is the unix socket containerd's proxy_plugins.overlaybd connects to.
	Address string `toml:"address"`
	// LogLevel is trace, debug, info, warn or error.
	LogLevel string `toml:"log_level"`
	// StatusAddress is the unix socket of the status endpoint (GET /status, /healthz, /metrics) that 'obd status'
	// and 'obd health' ask; empty means next to Address (see StatusSocket).
	StatusAddress string `toml:"status_address"`
	// KeepDevices keeps the devices of overlaybd images working across a crash, kill or upgrade of the daemon: a
	// small holder process keeps their FUSE connections, reads wait while no daemon runs, and the next daemon
	// resumes them (Linux 6.9 or newer). With false, reads fail with EIO once the daemon is gone.
	KeepDevices bool `toml:"keep_devices"`
	// ReadAheadKB is the read_ahead_kb of the images' loop devices: the most the kernel reads ahead on an image's
	// filesystem, every byte of which a cold image fetches (0: leave the device's own).
	ReadAheadKB int `toml:"read_ahead_kb"`
	// RWMode is how containers over overlaybd images write (upstream's rwMode): "overlayfs" (an overlayfs upper
	// directory over the image's read-only mount), "dir" (a writable block layer on the image's layers, its
	// filesystem mounted read-write for the container) or "dev" (the same layer handed to the runtime as a block
	// device). The snapshot label containerd.io/snapshot/overlaybd.writable chooses per container.
	RWMode string `toml:"rw_mode"`
	// RootfsQuota bounds what a container in "dir" or "dev" mode may write, such as "20GiB" (empty: the image
	// disk's free space). The label containerd.io/snapshot/disk_quota chooses per container.
	RootfsQuota string `toml:"rootfs_quota"`
	// Referrers makes a pull of a normal image through the CRI plugin look for an overlaybd image attached to it as
	// an OCI referrer ('obd convert --referrer', native or TurboOCI) and read that lazily instead of downloading and
	// unpacking the image's layers.
	Referrers bool `toml:"referrers"`
}

// Quota returns RootfsQuota in bytes (0: none).
func (s Snapshotter) Quota() (int64, error) {
	if s.RootfsQuota == "" {
		return 0, nil
	}
	q, err := units.ParseBytes(s.RootfsQuota)
	if err != nil {
		return 0, fmt.Errorf("snapshotter.rootfs_quota = %w", err)
	}
	return q, nil
}

// HolderSocket is the socket of the device holder process (see KeepDevices), in Root.
func (s Snapshotter) HolderSocket() string { return filepath.Join(s.Root, "holder.sock") }

// StatusSocket returns the status endpoint's socket: StatusAddress, or Address with ".sock" replaced by
// ".status.sock" (/run/obd/snapshotter.sock → /run/obd/snapshotter.status.sock).
func (s Snapshotter) StatusSocket() string {
	if s.StatusAddress != "" {
		return s.StatusAddress
	}
	return strings.TrimSuffix(s.Address, ".sock") + ".status.sock"
}

// Cache is the [cache] table: the on-disk cache of blob ranges fetched from registries.
type Cache struct {
	// Dir holds the cached data.
	Dir string `toml:"dir"`
	// SizeGB bounds the cache's data in GiB.
	SizeGB int64 `toml:"size_gb"`
	// BlockSizeKB is the unit, in KiB, in which data is cached and a recorded start is prefetched.
	BlockSizeKB int64 `toml:"block_size_kb"`
	// FetchKB is the least, in KiB, that a cache miss fetches: a multiple of BlockSizeKB, or at most BlockSizeKB
	// for BlockSizeKB.
	FetchKB int64 `toml:"fetch_kb"`
}

// Registry is the [registry] table: how blobs are read lazily from registries.
type Registry struct {
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
	// CredentialHelpers is the token helpers file ('obd credentials set REGISTRY --helper CMD'): commands that
	// print a fresh registry token, run again before the token expires; a missing file means no helpers.
	CredentialHelpers string `toml:"credential_helpers"`
}

// Metrics is the [metrics] table.
type Metrics struct {
	// Address is the TCP host:port serving Prometheus metrics at /metrics (and /healthz); empty disables it.
	Address string `toml:"address"`
}

// Audit is the [audit] table: the log of slow and hung device reads.
type Audit struct {
	// SlowReadMS is the latency in milliseconds from which a finished device read is logged; 0 logs none.
	SlowReadMS int64 `toml:"slow_read_ms"`
	// HungReadMS is the age in milliseconds from which a device read still waiting is logged (once) and counted
	// by the obd_device_hung_reads metric.
	HungReadMS int64 `toml:"hung_read_ms"`
	// Path is the file the audit lines are appended to; empty writes them to the daemon's log (stderr).
	Path string `toml:"path"`
}

// SlowRead returns SlowReadMS as a duration (0: disabled).
func (a Audit) SlowRead() time.Duration { return time.Duration(a.SlowReadMS) * time.Millisecond }

// HungRead returns HungReadMS as a duration.
func (a Audit) HungRead() time.Duration { return time.Duration(a.HungReadMS) * time.Millisecond }

// Default returns the configuration used when obd.toml is missing.
func Default() Config {
	return Config{
		Snapshotter: Snapshotter{Root: DefaultRoot, Address: DefaultAddress, LogLevel: DefaultLogLevel, KeepDevices: true, ReadAheadKB: DefaultReadAheadKB, RWMode: "overlayfs", Referrers: true},
		Cache:       Cache{Dir: DefaultCacheDir, SizeGB: DefaultCacheGB, BlockSizeKB: DefaultBlockKB, FetchKB: DefaultFetchKB},
		Registry:    Registry{RetryBudget: DefaultRetryBudget, CredentialHelpers: DefaultCredentialHelpers},
		Metrics:     Metrics{Address: DefaultMetricsAddress},
		Audit:       Audit{SlowReadMS: DefaultSlowReadMS, HungReadMS: DefaultHungReadMS},
		Prefetch:    Prefetch{Concurrency: DefaultPrefetchConcurrency, OnPull: true, AttachOnPull: true, MetadataMB: DefaultMetadataMB, PredecodeMB: DefaultPredecodeMB, PrimePageCache: true},
		Download:    Download{DelaySeconds: DefaultDownloadDelay, MaxMBps: DefaultDownloadMBps, Concurrency: DefaultDownloadConcurrency},
		CRI:         CRI{Address: DefaultCRIAddress, ContainerdAddress: DefaultContainerdAddress, CredentialTTL: DefaultCRICredentialTTL},
	}
}

// tables are the tables of obd.toml this package reads; unknown keys in them are reported.
var tables = []string{"snapshotter", "cache", "registry", "metrics", "audit", "prefetch", "download", "cri"}

// Load reads path over the defaults. A missing file is an error only when the user named it (explicit). It
// returns warnings about keys of its tables that it does not know (typos), which the caller logs or shows.
func Load(path string, explicit bool) (cfg Config, warnings []string, err error) {
	cfg = Default()
	md, err := toml.DecodeFile(path, &cfg)
	switch {
	case errors.Is(err, fs.ErrNotExist) && !explicit:
		return Default(), nil, nil
	case err != nil:
		return Config{}, nil, fmt.Errorf("config %s: %w", path, err)
	}
	for _, k := range md.Undecoded() {
		if len(k) > 0 && slices.Contains(tables, k[0]) {
			warnings = append(warnings, fmt.Sprintf("config %s: unknown key %s ignored", path, strings.Join(k, ".")))
		}
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, warnings, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, warnings, nil
}

// Validate checks the values that have a fixed range; each error names the key and what it wants.
func (c Config) Validate() error {
	if r := c.Snapshotter.ReadAheadKB; r < 0 || r > 16384 {
		return fmt.Errorf("snapshotter.read_ahead_kb = %d: want 0 (the device's own) to 16384 KiB", r)
	}
	if m := c.Snapshotter.RWMode; m != "" && m != "overlayfs" && m != "dir" && m != "dev" {
		return fmt.Errorf("snapshotter.rw_mode = %q: want \"overlayfs\", \"dir\" or \"dev\"", m)
	}
	if _, err := c.Snapshotter.Quota(); err != nil {
		return err
	}
	if c.Cache.SizeGB <= 0 {
		return fmt.Errorf("cache.size_gb = %d: want a positive number of GiB", c.Cache.SizeGB)
	}
	if b := c.Cache.BlockSizeKB; b < 4 || b > 4096 || b&(b-1) != 0 {
		return fmt.Errorf("cache.block_size_kb = %d: want a power of two from 4 to 4096", b)
	}
	if f, b := c.Cache.FetchKB, c.Cache.BlockSizeKB; f < 0 || f > 8192 || f > b && f%b != 0 {
		return fmt.Errorf("cache.fetch_kb = %d: want a multiple of block_size_kb (%d) up to 8192, or at most block_size_kb for block_size_kb", f, b)
	}
	if d, err := time.ParseDuration(c.Registry.RetryBudget); err != nil || d <= 0 {
		return fmt.Errorf("registry.retry_budget = %q: want a positive duration such as \"60s\"", c.Registry.RetryBudget)
	}
	if a := c.Metrics.Address; a != "" {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return fmt.Errorf("metrics.address = %q: want host:port such as %q, or \"\" to disable metrics", a, DefaultMetricsAddress)
		}
	}
	if c.Audit.SlowReadMS < 0 {
		return fmt.Errorf("audit.slow_read_ms = %d: want 0 (off) or a number of milliseconds", c.Audit.SlowReadMS)
	}
	if c.Audit.HungReadMS <= 0 {
		return fmt.Errorf("audit.hung_read_ms = %d: want a positive number of milliseconds", c.Audit.HungReadMS)
	}
	if c.Prefetch.Concurrency < 1 || c.Prefetch.Concurrency > 256 {
		return fmt.Errorf("prefetch.concurrency = %d: want 1 to 256 requests", c.Prefetch.Concurrency)
	}
	if c.Prefetch.MetadataMB < 0 || c.Prefetch.MetadataMB > 4096 {
		return fmt.Errorf("prefetch.metadata_mb = %d: want 0 (off) to 4096", c.Prefetch.MetadataMB)
	}
	if c.Prefetch.PredecodeMB < 0 || c.Prefetch.PredecodeMB > 4096 {
		return fmt.Errorf("prefetch.predecode_mb = %d: want 0 (off) to 4096", c.Prefetch.PredecodeMB)
	}
	if d := c.Prefetch.ProfilesDir; d != "" && !filepath.IsAbs(d) {
		return fmt.Errorf("prefetch.profiles_dir = %q: want an absolute path", d)
	}
	if c.Download.Concurrency < 1 || c.Download.Concurrency > 64 {
		return fmt.Errorf("download.concurrency = %d: want 1 to 64 requests", c.Download.Concurrency)
	}
	if c.Download.DelaySeconds < 0 || c.Download.MaxMBps < 0 {
		return fmt.Errorf("download.delay = %d, download.max_mbps = %d: want 0 or more", c.Download.DelaySeconds, c.Download.MaxMBps)
	}
	return c.CRI.validate()
}

// validate checks the [cri] table.
func (c CRI) validate() error {
	for key, p := range map[string]string{"cri.address": c.Address, "cri.containerd_address": c.ContainerdAddress} {
		if !filepath.IsAbs(p) {
			return fmt.Errorf("%s = %q: want the absolute path of a unix socket", key, p)
		}
	}
	if d, err := time.ParseDuration(c.CredentialTTL); err != nil || d <= 0 {
		return fmt.Errorf("cri.credential_ttl = %q: want a positive duration such as \"24h\"", c.CredentialTTL)
	}
	if len(c.CredentialProviders) > 0 && !filepath.IsAbs(c.CredentialProviderDir) {
		return fmt.Errorf("cri.credential_provider_dir = %q: want the absolute path of the directory of the credential provider plugins", c.CredentialProviderDir)
	}
	for i, p := range c.CredentialProviders {
		if p.Name == "" || strings.ContainsRune(p.Name, '/') || p.Name == "." || p.Name == ".." {
			return fmt.Errorf("cri.credential_providers[%d].name = %q: want the name of an executable in cri.credential_provider_dir", i, p.Name)
		}
		if len(p.MatchImages) == 0 {
			return fmt.Errorf("cri.credential_providers[%d] (%s): match_images is empty: want the registries it serves, such as \"*.dkr.ecr.*.amazonaws.com\"", i, p.Name)
		}
		if p.DefaultCacheDuration != "" {
			if d, err := time.ParseDuration(p.DefaultCacheDuration); err != nil || d < 0 {
				return fmt.Errorf("cri.credential_providers[%d] (%s): default_cache_duration = %q: want a duration such as \"12h\"", i, p.Name, p.DefaultCacheDuration)
			}
		}
	}
	return nil
}

// Lookup returns the value at a path of nested tables in a decoded TOML document.
func Lookup(doc map[string]any, keys ...string) (any, bool) {
	var cur any = doc
	for _, k := range keys {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = m[k]; !ok {
			return nil, false
		}
	}
	return cur, true
}
