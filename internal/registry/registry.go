// Package registry talks to OCI/Docker registries: it resolves manifests, pushes converted images and reads blob
// byte ranges lazily with bounded retries, so a node fetches only what containers read and never hangs on a dead registry.
package registry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"oras.land/oras-go/v2/registry/remote/auth"
	"oras.land/oras-go/v2/registry/remote/retry"
)

// Options configure a Client. The zero value talks HTTPS with docker's credentials and the default limits.
type Options struct {
	PlainHTTP   bool           // http:// instead of https:// (e.g. a local registry)
	Insecure    bool           // TLS without certificate verification
	CAFile      string         // extra CA bundle (PEM) trusted besides the system roots
	Credentials CredentialFunc // nil: docker config (DOCKER_CONFIG or ~/.docker/config.json), see LoadDockerConfig
	// CredentialSource names where Credentials come from (e.g. a file path); auth errors tell the user to check it.
	// With Credentials nil it is the docker config path.
	CredentialSource string
	RetryBudget      time.Duration // total time one operation may spend retrying before it fails (default 60s)
	RequestTimeout   time.Duration // per HTTP attempt: wait for headers, and longest stall of a body (default 30s)
	UserAgent        string        // default "obd"
	Mirrors          []string      // host[:port] mirrors tried first for blob reads, falling back to the origin
	Logger           *slog.Logger  // default slog.Default()

	// RefreshCredentials, when set, is called when the registry refuses the credentials for host; when it answers
	// true the operation is tried once more with credentials asked anew (e.g. a token helper run again, see
	// HelperCredentials).
	RefreshCredentials func(host string) bool

	// Observer, if set, is called once per HTTP attempt of a blob or manifest request, when its answer's body is
	// closed (or when no answer came): op is "blob_range", "blob_get", "blob_head" or "manifest"; status is the
	// HTTP status (0 when no answer came); bytes counts the body bytes read; d runs from sending the request to
	// closing the body; err is the transport or body read error, if any. It must be cheap and safe for
	// concurrent use (e.g. Prometheus counters).
	Observer func(op string, status int, bytes int64, d time.Duration, err error)
}

const (
	defaultRetryBudget    = 60 * time.Second
	defaultRequestTimeout = 30 * time.Second
	locationTTL           = 5 * time.Minute // how long a blob's redirect target (S3/CDN) is reused
	mirrorCooldown        = time.Minute     // how long a failed mirror is skipped
	maxManifestBytes      = 4 << 20
)

// Client is a registry client. It is safe for concurrent use; its token cache is shared by all its requests.
type Client struct {
	opts       Options
	log        *slog.Logger
	creds      CredentialFunc
	credSource string
	transport  *http.Transport
	reader     *auth.Client // registry requests; follows redirects without leaking Authorization to other hosts
	plain      *http.Client // requests to a cached redirect target: never carries credentials
	pusher     *auth.Client // pushes, through oras with its bounded retry transport

	mu         sync.Mutex
	locations  map[string]location  // blob key → redirect target
	mirrorDown map[string]time.Time // mirror host → skipped until
}

// location is the final URL a blob GET was redirected to.
type location struct {
	url     string
	expires time.Time
}

// New returns a Client for opts.
func New(opts Options) (*Client, error) {
	if opts.RetryBudget <= 0 {
		opts.RetryBudget = defaultRetryBudget
	}
	if opts.RequestTimeout <= 0 {
		opts.RequestTimeout = defaultRequestTimeout
	}
	if opts.UserAgent == "" {
		opts.UserAgent = "obd"
	}
	c := &Client{
		opts:       opts,
		log:        opts.Logger,
		creds:      opts.Credentials,
		credSource: opts.CredentialSource,
		locations:  map[string]location{},
		mirrorDown: map[string]time.Time{},
	}
	if c.log == nil {
		c.log = slog.Default()
	}
	if c.creds == nil {
		path := DefaultDockerConfigPath()
		c.creds = StaticCredentials("", "")
		if path != "" {
			f, err := LoadDockerConfig(path)
			if err != nil {
				return nil, err
			}
			c.creds = f
			if c.credSource == "" {
				c.credSource = path
			}
		}
	}
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: opts.Insecure}
	if opts.CAFile != "" {
		pem, err := os.ReadFile(opts.CAFile)
		if err != nil {
			return nil, fmt.Errorf("registry CA file: %w", err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("registry CA file %s: no PEM certificate in it", opts.CAFile)
		}
		tlsConf.RootCAs = pool
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsConf
	tr.MaxIdleConnsPerHost = 32
	c.transport = tr

	cache := auth.NewCache()
	hdr := http.Header{"User-Agent": {opts.UserAgent}}
	c.reader = &auth.Client{
		Client:     &http.Client{Transport: tr, CheckRedirect: stripAuthOnHostChange},
		Header:     hdr,
		Cache:      cache,
		Credential: c.orasCredential,
	}
	c.plain = &http.Client{Transport: tr, CheckRedirect: stripAuthOnHostChange}
	c.pusher = &auth.Client{
		Client:     &http.Client{Transport: retry.NewTransport(tr), CheckRedirect: stripAuthOnHostChange},
		Header:     hdr,
		Cache:      cache,
		Credential: c.orasCredential,
	}
	return c, nil
}

// Close releases idle connections.
func (c *Client) Close() error {
	c.transport.CloseIdleConnections()
	return nil
}

// stripAuthOnHostChange follows up to 10 redirects and drops the Authorization header whenever the target's
// host:port differs from the original request's (net/http only compares host names, not ports).
func stripAuthOnHostChange(req *http.Request, via []*http.Request) error {
	if len(via) >= 10 {
		return errors.New("stopped after 10 redirects")
	}
	if req.URL.Host != via[0].URL.Host {
		req.Header.Del("Authorization")
	}
	return nil
}

// orasCredential adapts the CredentialFunc to oras' auth package.
func (c *Client) orasCredential(ctx context.Context, hostport string) (auth.Credential, error) {
	user, pass, err := c.creds(ctx, hostport)
	if err != nil {
		return auth.EmptyCredential, &permanentError{err: err} // a broken credential source does not heal by retrying
	}
	if user == identityTokenUser {
		return auth.Credential{RefreshToken: pass}, nil
	}
	return auth.Credential{Username: user, Password: pass}, nil
}

// apiHost maps a registry name to the host serving its API (Docker Hub's "docker.io" is served elsewhere).
func apiHost(host string) string {
	if host == "docker.io" {
		return "registry-1.docker.io"
	}
	return host
}

// baseURL returns scheme://host of a registry's API.
func (c *Client) baseURL(host string) string {
	if c.opts.PlainHTTP {
		return "http://" + apiHost(host)
	}
	return "https://" + apiHost(host)
}

// authHint tells the user what to do about an authentication failure at host.
func (c *Client) authHint(host string) string {
	if c.credSource != "" {
		return fmt.Sprintf("check credentials for %s in %s or run 'obd login %s'", host, c.credSource, host)
	}
	return fmt.Sprintf("check credentials for %s or run 'obd login %s'", host, host)
}

// cachedLocation returns the unexpired redirect target recorded for key, or "".
func (c *Client) cachedLocation(key string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	l, ok := c.locations[key]
	if !ok {
		return ""
	}
	if time.Now().After(l.expires) {
		delete(c.locations, key)
		return ""
	}
	return l.url
}

// setLocation records the redirect target of key; "" forgets it.
func (c *Client) setLocation(key, url string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if url == "" {
		delete(c.locations, key)
		return
	}
	now := time.Now()
	if len(c.locations) >= 4096 {
		for k, l := range c.locations {
			if now.After(l.expires) {
				delete(c.locations, k)
			}
		}
		if len(c.locations) >= 4096 {
			clear(c.locations)
		}
	}
	c.locations[key] = location{url: url, expires: now.Add(locationTTL)}
}

// liveMirrors lists the configured mirrors of host that are not in cooldown.
func (c *Client) liveMirrors(host string) []string {
	var live []string
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, m := range c.opts.Mirrors {
		if m != "" && m != host && !now.Before(c.mirrorDown[m]) {
			live = append(live, m)
		}
	}
	return live
}

// markMirrorDown skips mirror for a while after it failed.
func (c *Client) markMirrorDown(mirror string, err error) {
	c.mu.Lock()
	c.mirrorDown[mirror] = time.Now().Add(mirrorCooldown)
	c.mu.Unlock()
	c.log.Warn("registry mirror failed; using the origin", "mirror", mirror, "skip_for", mirrorCooldown, "err", err)
}

// drainClose discards a little of body (so the connection can be reused) and closes it.
func drainClose(body io.ReadCloser) {
	_, _ = io.CopyN(io.Discard, body, 64<<10)
	_ = body.Close()
}

// mediaTypeOf returns the media type of a Content-Type header value, without parameters.
func mediaTypeOf(contentType string) string {
	mt, _, _ := strings.Cut(contentType, ";")
	return strings.TrimSpace(strings.ToLower(mt))
}
