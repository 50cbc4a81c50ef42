package main

import (
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/device"
	"github.com/obdproject/obd/internal/mounter"
	"github.com/obdproject/obd/internal/registry"
)

// node is the daemon's data plane: block cache, registry clients and the image mounter.
type node struct {
	mounter *mounter.Mounter
	cache   *cache.Cache
	clients *clientSet
}

// newNode opens the block cache and builds the image mounter that serves overlaybd images through FUSE + loop.
// o (optional) receives the registry requests and device reads for metrics and the audit log.
func newNode(cfg config, logger *slog.Logger, o *ops) (*node, error) {
	c, err := cache.Open(cache.Options{
		Dir: cfg.Cache.Dir, CapacityBytes: cfg.Cache.SizeGB << 30, BlockSize: cfg.Cache.BlockSizeKB << 10, Logger: logger,
	})
	if err != nil {
		return nil, fmt.Errorf("block cache %s: %w", cfg.Cache.Dir, err)
	}
	budget, _ := time.ParseDuration(cfg.Registry.RetryBudget)
	cs := &clientSet{cfg: cfg.Registry, budget: budget, logger: logger, clients: map[string]*registry.Client{}}
	var fopts []device.FuseLoopOption
	if o != nil {
		cs.observer = o.observeRegistry
		fopts = append(fopts, device.WithReadObserver(o.reads.observe))
	}
	m := mounter.New(mounter.Options{
		Frontend: device.NewFuseLoop(logger, fopts...),
		StateDir: filepath.Join(cfg.Snapshotter.Root, "devices"),
		Cache:    c,
		Registry: cs.get,
		Logger:   logger,
	})
	if o != nil {
		o.attach(c, m)
	}
	return &node{mounter: m, cache: c, clients: cs}, nil
}

func (n *node) Close() error {
	n.clients.close()
	return n.cache.Close()
}

// clientSet keeps one registry client per host, configured from the [registry] table.
type clientSet struct {
	cfg    registryConfig
	budget time.Duration
	logger *slog.Logger
	// observer, if set, is every client's Options.Observer (metrics).
	observer func(op string, status int, bytes int64, d time.Duration, err error)
	mu       sync.Mutex
	clients  map[string]*registry.Client
}

func (cs *clientSet) get(host string) (*registry.Client, error) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if c, ok := cs.clients[host]; ok {
		return c, nil
	}
	opts := registry.Options{
		PlainHTTP:   registry.IsLocalhost(host) || slices.Contains(cs.cfg.PlainHTTP, host),
		Insecure:    slices.Contains(cs.cfg.Insecure, host),
		RetryBudget: cs.budget,
		Mirrors:     cs.cfg.Mirrors,
		UserAgent:   "obd-snapshotter",
		Logger:      cs.logger,
		Observer:    cs.observer,
	}
	path := dockerConfigPath(cs.cfg)
	creds, err := registry.LoadDockerConfig(path)
	if err != nil {
		return nil, err
	}
	// Token helpers ('obd credentials set --helper') come first; they are run again before their tokens expire.
	helpers, err := registry.NewHelperCredentials(cs.cfg.CredentialHelpers, creds)
	if err != nil {
		return nil, err
	}
	opts.Credentials, opts.RefreshCredentials, opts.CredentialSource = helpers.Credential, helpers.Refresh, path
	if helpers.Has(host) {
		opts.CredentialSource = cs.cfg.CredentialHelpers + " (token helper)"
	}
	c, err := registry.New(opts)
	if err != nil {
		return nil, fmt.Errorf("registry %s: %w", host, err)
	}
	cs.clients[host] = c
	return c, nil
}

func (cs *clientSet) close() {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	for _, c := range cs.clients {
		c.Close()
	}
}
