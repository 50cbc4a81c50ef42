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
func newNode(cfg config, logger *slog.Logger) (*node, error) {
	c, err := cache.Open(cache.Options{
		Dir: cfg.Cache.Dir, CapacityBytes: cfg.Cache.SizeGB << 30, BlockSize: cfg.Cache.BlockSizeKB << 10, Logger: logger,
	})
	if err != nil {
		return nil, fmt.Errorf("block cache %s: %w", cfg.Cache.Dir, err)
	}
	budget, _ := time.ParseDuration(cfg.Registry.RetryBudget)
	cs := &clientSet{cfg: cfg.Registry, budget: budget, logger: logger, clients: map[string]*registry.Client{}}
	m := mounter.New(mounter.Options{
		Frontend: device.NewFuseLoop(logger),
		StateDir: filepath.Join(cfg.Snapshotter.Root, "devices"),
		Cache:    c,
		Registry: cs.get,
		Logger:   logger,
	})
	return &node{mounter: m, cache: c, clients: cs}, nil
}

func (n *node) Close() error {
	n.clients.close()
	return n.cache.Close()
}

// clientSet keeps one registry client per host, configured from the [registry] table.
type clientSet struct {
	cfg     registryConfig
	budget  time.Duration
	logger  *slog.Logger
	mu      sync.Mutex
	clients map[string]*registry.Client
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
	}
	path := cs.cfg.DockerConfig
	if path == "" {
		path = registry.DefaultDockerConfigPath()
	}
	creds, err := registry.LoadDockerConfig(path)
	if err != nil {
		return nil, err
	}
	opts.Credentials, opts.CredentialSource = creds, path
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
