package node

import (
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/cri"
	"github.com/obdproject/obd/internal/registry"
)

// clientPool keeps one registry client per host, configured from the [registry] table. Its clients ask for
// credentials in this order: those of the CRI pull of the image's repository (pulls), the token helpers, the
// kubelet credential provider plugins (providers), the docker config file.
type clientPool struct {
	cfg       config.Registry
	budget    time.Duration
	logger    *slog.Logger
	pulls     *cri.Store     // nil: none
	providers *cri.Providers // nil: none
	// observer, if set, is every client's Options.Observer (metrics).
	observer func(op string, status int, bytes int64, d time.Duration, err error)
	mu       sync.Mutex
	clients  map[string]*registry.Client
}

func (cp *clientPool) get(host string) (*registry.Client, error) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if c, ok := cp.clients[host]; ok {
		return c, nil
	}
	opts := registry.Options{
		PlainHTTP:   registry.IsLocalhost(host) || slices.Contains(cp.cfg.PlainHTTP, host),
		Insecure:    slices.Contains(cp.cfg.Insecure, host),
		RetryBudget: cp.budget,
		Mirrors:     cp.cfg.Mirrors,
		UserAgent:   "obd-snapshotter",
		Logger:      cp.logger,
		Observer:    cp.observer,
	}
	path := dockerConfigPath(cp.cfg)
	creds, err := registry.LoadDockerConfig(path)
	if err != nil {
		return nil, err
	}
	if cp.providers != nil {
		creds = cp.providers.Credentials(creds)
	}
	// Token helpers ('obd credentials set --helper') come before plugins and files; they are run again before
	// their tokens expire.
	helpers, err := registry.NewHelperCredentials(cp.cfg.CredentialHelpers, creds)
	if err != nil {
		return nil, err
	}
	opts.Credentials, opts.RefreshCredentials, opts.CredentialSource = helpers.Credential, helpers.Refresh, path
	if cp.providers != nil {
		opts.RefreshCredentials = func(host string) bool {
			h := helpers.Refresh(host)
			return cp.providers.Refresh(host) || h
		}
	}
	if cp.pulls != nil {
		opts.Credentials = cp.pulls.Credentials(opts.Credentials)
	}
	if helpers.Has(host) {
		opts.CredentialSource = cp.cfg.CredentialHelpers + " (token helper)"
	}
	c, err := registry.New(opts)
	if err != nil {
		return nil, fmt.Errorf("registry %s: %w", host, err)
	}
	cp.clients[host] = c
	return c, nil
}

func (cp *clientPool) close() {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	for _, c := range cp.clients {
		c.Close()
	}
}

// dockerConfigPath is the credentials file the registry clients read.
func dockerConfigPath(rc config.Registry) string {
	if rc.DockerConfig != "" {
		return rc.DockerConfig
	}
	return registry.DefaultDockerConfigPath()
}
