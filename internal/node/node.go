// Package node is the node daemon's composition: the block cache, the registry client pool and the image mounter;
// the snapshotter and its snapshots gRPC server; the metrics, the read tracker with its audit log and the status
// endpoint. cmd/obd-snapshotter turns flags and obd.toml into a Service and serves it.
package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/cri"
	"github.com/obdproject/obd/internal/device"
	"github.com/obdproject/obd/internal/mounter"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/snapshotter"
)

// Service is one obd-snapshotter: New builds it from the configuration, Serve serves it, Close releases it.
type Service struct {
	cfg     config.Config
	log     *slog.Logger
	ops     *ops
	mounter snapshotter.ImageMounter
	cache   *cache.Cache // nil with WithImageMounter
	clients *clientPool  // nil with WithImageMounter
	// pulls holds the credentials of CRI pulls (the [cri] proxy) for the lazy reads of those images; providers are
	// the kubelet credential provider plugins of [cri].
	pulls     *cri.Store
	providers *cri.Providers
	holder    *device.Holder   // nil: devices end with this process
	fuse      *device.FuseLoop // nil with WithImageMounter
}

// Option configures New.
type Option func(*options)

type options struct {
	logger     *slog.Logger
	configPath string
	mounter    snapshotter.ImageMounter
	holder     bool
}

// WithLogger sets the daemon's logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.logger = l } }

// WithConfigPath names the file the configuration was read from, for the status endpoint and for errors that ask
// the user to change a key (default config.DefaultPath).
func WithConfigPath(path string) Option { return func(o *options) { o.configPath = path } }

// WithImageMounter serves overlaybd images with m instead of the daemon's own block cache, registry clients and
// FUSE + loop device mounter, which New then does not open (tests fake the device stack with it).
func WithImageMounter(m snapshotter.ImageMounter) Option { return func(o *options) { o.mounter = m } }

// WithDeviceHolder lets the devices of overlaybd images outlive the daemon when [snapshotter] keep_devices is set:
// their FUSE connections are kept by a holder process, which is this program started again (see device.Holder),
// so the program must call device.RunHolderIfAsked first thing in main.
func WithDeviceHolder() Option { return func(o *options) { o.holder = true } }

// New checks cfg, builds the metrics and opens the audit log, the block cache and the image mounter that serves
// overlaybd images through FUSE + loop. Close releases them.
func New(cfg config.Config, opts ...Option) (*Service, error) {
	o := options{logger: slog.Default(), configPath: config.DefaultPath}
	for _, opt := range opts {
		opt(&o)
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("config %s: %w", o.configPath, err)
	}
	o.logger.Info("starting obd-snapshotter", "root", cfg.Snapshotter.Root, "address", cfg.Snapshotter.Address)
	ops, err := newOps(cfg, o.configPath, o.logger)
	if err != nil {
		return nil, err
	}
	providers, err := cri.NewProviders(cfg.CRI.CredentialProviderDir, cfg.CRI.CredentialProviders)
	if err != nil {
		ops.close()
		return nil, fmt.Errorf("config %s: %w", o.configPath, err)
	}
	s := &Service{cfg: cfg, log: o.logger, ops: ops, mounter: o.mounter, pulls: cri.NewStore(cfg.CRI.CredentialTTLDuration()), providers: providers}
	if o.holder && cfg.Snapshotter.KeepDevices {
		s.holder = device.NewHolder(cfg.Snapshotter.HolderSocket(), o.logger)
	}
	if s.mounter == nil {
		if err := s.openDevices(); err != nil {
			ops.close()
			return nil, err
		}
	}
	return s, nil
}

// openDevices opens the block cache and builds the registry client pool and the image mounter, whose registry
// requests and device reads feed the metrics and the audit log.
func (s *Service) openDevices() error {
	cfg := s.cfg
	c, err := cache.Open(cache.Options{
		Dir: cfg.Cache.Dir, CapacityBytes: cfg.Cache.SizeGB << 30, BlockSize: cfg.Cache.BlockSizeKB << 10, FetchBytes: cfg.Cache.FetchKB << 10, Logger: s.log,
	})
	if err != nil {
		return fmt.Errorf("block cache %s: %w", cfg.Cache.Dir, err)
	}
	budget, _ := time.ParseDuration(cfg.Registry.RetryBudget) // checked by Validate
	cp := &clientPool{cfg: cfg.Registry, budget: budget, logger: s.log, observer: s.ops.observeRegistry, pulls: s.pulls, providers: s.providers,
		clients: map[string]*registry.Client{}}
	fopts := []device.FuseLoopOption{device.WithReadObserver(s.ops.reads.observe), device.WithReadAhead(cfg.Snapshotter.ReadAheadKB)}
	if s.holder != nil {
		fopts = append(fopts, device.WithHolder(s.holder))
	}
	s.fuse = device.NewFuseLoop(s.log, fopts...)
	m := mounter.New(mounter.Options{
		Frontend:            s.fuse,
		StateDir:            s.stateDir(),
		TurboDir:            filepath.Join(s.cfg.Snapshotter.Root, "turbo"),
		Cache:               c,
		Registry:            cp.get,
		Logger:              s.log,
		PrefetchConcurrency: cfg.Prefetch.Concurrency,
		Preload:             cfg.Prefetch.OnPull,
		MetadataBytes:       int64(cfg.Prefetch.MetadataMB) << 20,
		StartsDir:           filepath.Join(s.cfg.Snapshotter.Root, "starts"),
		PredecodeBytes:      int64(cfg.Prefetch.PredecodeMB) << 20,
		PrimePageCache:      cfg.Prefetch.PrimePageCache,
		Download: mounter.DownloadOptions{
			Enable:            cfg.Download.Enable,
			Delay:             time.Duration(cfg.Download.DelaySeconds) * time.Second,
			MaxBytesPerSecond: cfg.Download.MaxMBps * 1e6,
			Concurrency:       cfg.Download.Concurrency,
		},
	})
	s.ops.attach(c, m)
	s.cache, s.clients, s.mounter = c, cp, m
	return nil
}

// stateDir is where the devices' FUSE files are mounted.
func (s *Service) stateDir() string { return filepath.Join(s.cfg.Snapshotter.Root, "devices") }

// Close stops serving the kept devices (see WithDeviceHolder), and closes the registry clients, the block cache
// and the audit log.
func (s *Service) Close() error {
	var errs []error
	if s.fuse != nil {
		// With kept devices, finish the reads being served before the registry clients and the cache close;
		// later ones wait for the next daemon. (Without, the devices end with this process anyway.)
		ctx, cancel := context.WithTimeout(context.Background(), StopGrace)
		s.fuse.Suspend(ctx)
		cancel()
	}
	if s.clients != nil {
		s.clients.close()
	}
	if s.cache != nil {
		errs = append(errs, s.cache.Close())
	}
	if s.holder != nil {
		errs = append(errs, s.holder.Close())
	}
	return errors.Join(append(errs, s.ops.close())...)
}
