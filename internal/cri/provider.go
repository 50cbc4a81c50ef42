package cri

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/registry"
)

// Kubelet credential provider plugins: executables that read a CredentialProviderRequest (JSON) on standard input
// and print a CredentialProviderResponse, the protocol of kubelet's --image-credential-provider-config. The types
// are defined here, not imported from k8s.io/kubelet, to keep obd's dependencies few.

const (
	// ProviderAPIVersion is the version of the exec-plugin protocol obd speaks.
	ProviderAPIVersion = "credentialprovider.kubelet.k8s.io/v1"

	providerTimeout    = time.Minute
	providerMinRefresh = 5 * time.Second // an answer younger than this is not asked again after a 401
	maxProviderOutput  = 1 << 20
)

// providerRequest is a CredentialProviderRequest.
type providerRequest struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Image      string `json:"image"`
}

// ProviderResponse is a plugin's CredentialProviderResponse, checked by ParseProviderResponse.
type ProviderResponse struct {
	// CacheKeyType is "Image", "Registry" or "Global": what the answer may be reused for.
	CacheKeyType string
	// CacheDuration is how long the answer may be reused; HasCacheDuration is false when the plugin gave none.
	CacheDuration    time.Duration
	HasCacheDuration bool
	// Auth maps image patterns ("host[:port][/path]", "*" for a part of the host name) to credentials.
	Auth map[string]ProviderAuth
}

// ProviderAuth is one credential of a response.
type ProviderAuth struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

// ParseProviderResponse parses and checks the standard output of a credential provider plugin. It never puts a
// credential into an error.
func ParseProviderResponse(data []byte) (*ProviderResponse, error) {
	var raw struct {
		APIVersion    *string                    `json:"apiVersion"`
		Kind          *string                    `json:"kind"`
		CacheKeyType  *string                    `json:"cacheKeyType"`
		CacheDuration *string                    `json:"cacheDuration"`
		Auth          map[string]json.RawMessage `json:"auth"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&raw); err != nil {
		return nil, fmt.Errorf("not a CredentialProviderResponse JSON object: %w", jsonTypeError(err))
	}
	if dec.More() {
		return nil, errors.New("trailing data after the JSON object")
	}
	switch {
	case raw.APIVersion == nil:
		return nil, fmt.Errorf("no apiVersion: want %q", ProviderAPIVersion)
	case *raw.APIVersion != ProviderAPIVersion:
		return nil, fmt.Errorf("apiVersion %q: want %q", *raw.APIVersion, ProviderAPIVersion)
	case raw.Kind == nil || *raw.Kind != "CredentialProviderResponse":
		return nil, errors.New(`kind: want "CredentialProviderResponse"`)
	case raw.CacheKeyType == nil:
		return nil, errors.New(`no cacheKeyType: want "Image", "Registry" or "Global"`)
	}
	r := &ProviderResponse{CacheKeyType: *raw.CacheKeyType, Auth: map[string]ProviderAuth{}}
	switch r.CacheKeyType {
	case "Image", "Registry", "Global":
	default:
		return nil, fmt.Errorf(`cacheKeyType %q: want "Image", "Registry" or "Global"`, r.CacheKeyType)
	}
	if raw.CacheDuration != nil {
		d, err := time.ParseDuration(*raw.CacheDuration)
		if err != nil || d < 0 {
			return nil, fmt.Errorf("cacheDuration %q: want a duration such as \"1h0m0s\"", *raw.CacheDuration)
		}
		r.CacheDuration, r.HasCacheDuration = d, true
	}
	for k, v := range raw.Auth {
		if _, err := parsePattern(k); err != nil {
			return nil, fmt.Errorf("auth key %q: %w", k, err)
		}
		var a ProviderAuth
		d := json.NewDecoder(bytes.NewReader(v))
		d.DisallowUnknownFields()
		if err := d.Decode(&a); err != nil {
			return nil, fmt.Errorf(`auth entry %q: want {"username", "password"} strings: %w`, k, jsonTypeError(err))
		}
		if a.Username == "" && a.Password == "" {
			return nil, fmt.Errorf("auth entry %q: no username and no password", k)
		}
		r.Auth[k] = a
	}
	return r, nil
}

// jsonTypeError drops the value from a JSON error (it could be a secret) and keeps where it was.
func jsonTypeError(err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Errorf("field %q is a JSON %s, not a %s", te.Field, te.Value, te.Type)
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("invalid JSON at byte %d", se.Offset)
	}
	return err
}

// pattern is a parsed image pattern of matchImages or of a response's auth keys.
type pattern struct {
	host []string // dot-separated parts; each may hold path.Match wildcards
	port string
	path string // "" or a repository prefix
}

// parsePattern parses "host[:port][/path]" (a scheme is ignored).
func parsePattern(s string) (pattern, error) {
	if i := strings.Index(s, "://"); i >= 0 {
		s = s[i+3:]
	}
	hostport, p, _ := strings.Cut(s, "/")
	host, port, hasPort := strings.Cut(hostport, ":")
	if host == "" {
		return pattern{}, errors.New("no registry host")
	}
	if hasPort && (port == "" || strings.Trim(port, "0123456789") != "") {
		return pattern{}, fmt.Errorf("port %q is not a number", port)
	}
	pt := pattern{host: strings.Split(strings.ToLower(host), "."), port: port, path: strings.Trim(p, "/")}
	for _, part := range pt.host {
		if _, err := path.Match(part, ""); err != nil || part == "" {
			return pattern{}, fmt.Errorf("host part %q is not a valid pattern", part)
		}
	}
	return pt, nil
}

// matches reports whether the image "host[:port]/repository" matches the pattern: its host matches
// (matchesHost) and the pattern's path is a prefix of the repository by whole parts.
func (pt pattern) matches(hostport, repo string) bool {
	return pt.matchesHost(hostport) && (pt.path == "" || repo == pt.path || strings.HasPrefix(repo, pt.path+"/"))
}

// matchesHost reports whether "host[:port]" has as many host parts as the pattern, each matching its pattern
// part, and the pattern's port.
func (pt pattern) matchesHost(hostport string) bool {
	host, port, _ := strings.Cut(strings.ToLower(hostport), ":")
	parts := strings.Split(host, ".")
	if len(parts) != len(pt.host) || port != pt.port {
		return false
	}
	for i, p := range pt.host {
		if ok, _ := path.Match(p, parts[i]); !ok {
			return false
		}
	}
	return true
}

// Providers answers credentials from kubelet credential provider plugins: for a registry request, the first
// plugin (in configuration order) whose match_images match the image is run, its answer cached as it says, and
// the credentials of its most specific matching auth key are used. Images no plugin matches are answered by
// next. Credentials are kept in memory only and never logged.
type Providers struct {
	providers []*provider
	now       func() time.Time
	run       func(ctx context.Context, p *provider, stdin []byte) ([]byte, error)

	mu    sync.Mutex
	cache map[string]*cachedAnswer // provider name + cache key → answer
}

// provider is one configured plugin.
type provider struct {
	name, path   string
	args, env    []string
	match        []pattern
	defaultCache time.Duration
}

// cachedAnswer is a plugin's parsed answer.
type cachedAnswer struct {
	resp    *ProviderResponse
	fetched time.Time
	expires time.Time
}

// NewProviders checks the plugins of the [cri] table: each must be an executable in dir.
func NewProviders(dir string, cfgs []config.CredentialProvider) (*Providers, error) {
	ps := &Providers{now: time.Now, run: runProvider, cache: map[string]*cachedAnswer{}}
	for _, c := range cfgs {
		p := &provider{name: c.Name, path: filepath.Join(dir, c.Name), args: c.Args}
		st, err := os.Stat(p.path)
		if err != nil {
			return nil, fmt.Errorf("credential provider %s: %w", c.Name, err)
		}
		if st.IsDir() || st.Mode()&0o111 == 0 {
			return nil, fmt.Errorf("credential provider %s: %s is not an executable file", c.Name, p.path)
		}
		for _, m := range c.MatchImages {
			pt, err := parsePattern(m)
			if err != nil {
				return nil, fmt.Errorf("credential provider %s: match_images %q: %w", c.Name, m, err)
			}
			p.match = append(p.match, pt)
		}
		if c.DefaultCacheDuration != "" {
			if p.defaultCache, err = time.ParseDuration(c.DefaultCacheDuration); err != nil {
				return nil, fmt.Errorf("credential provider %s: default_cache_duration: %w", c.Name, err)
			}
		}
		keys := make([]string, 0, len(c.Env))
		for k := range c.Env {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			p.env = append(p.env, k+"="+c.Env[k])
		}
		ps.providers = append(ps.providers, p)
	}
	return ps, nil
}

// find returns the first plugin matching the image host/repo, or nil.
func (ps *Providers) find(host, repo string) *provider {
	for _, p := range ps.providers {
		for _, m := range p.match {
			if m.matches(host, repo) {
				return p
			}
		}
	}
	return nil
}

// Credentials returns a CredentialFunc that answers from the plugin matching the request's image and asks next
// for images no plugin matches or whose answer holds no matching credentials.
func (ps *Providers) Credentials(next registry.CredentialFunc) registry.CredentialFunc {
	return func(ctx context.Context, host string) (string, string, error) {
		repo := registry.RequestRepository(ctx, host)
		p := ps.find(host, repo)
		if p == nil {
			return next(ctx, host)
		}
		resp, err := ps.answer(ctx, p, host, repo)
		if err != nil {
			return "", "", err
		}
		best := ""
		var cred ProviderAuth
		for k, a := range resp.Auth {
			pt, _ := parsePattern(k) // checked by ParseProviderResponse
			if pt.matches(host, repo) && (len(k) > len(best) || len(k) == len(best) && k < best) {
				best, cred = k, a
			}
		}
		if best == "" {
			return next(ctx, host)
		}
		return cred.Username, cred.Password, nil
	}
}

// answer returns the plugin's cached answer for the image, running it when there is none.
func (ps *Providers) answer(ctx context.Context, p *provider, host, repo string) (*ProviderResponse, error) {
	image := host
	if repo != "" {
		image += "/" + repo
	}
	now := ps.now()
	ps.mu.Lock()
	for _, key := range []string{"Image:" + image, "Registry:" + host, "Global:"} {
		if a := ps.cache[p.name+" "+key]; a != nil {
			if now.Before(a.expires) {
				ps.mu.Unlock()
				return a.resp, nil
			}
			delete(ps.cache, p.name+" "+key)
		}
	}
	ps.mu.Unlock()

	req, _ := json.Marshal(providerRequest{APIVersion: ProviderAPIVersion, Kind: "CredentialProviderRequest", Image: image})
	out, err := ps.run(ctx, p, req)
	if err != nil {
		return nil, fmt.Errorf("credential provider %s for %s: %w", p.name, image, err)
	}
	resp, err := ParseProviderResponse(out)
	if err != nil {
		return nil, fmt.Errorf("credential provider %s for %s: %w", p.name, image, err)
	}
	ttl := p.defaultCache
	if resp.HasCacheDuration {
		ttl = resp.CacheDuration
	}
	if ttl > 0 {
		key := map[string]string{"Image": "Image:" + image, "Registry": "Registry:" + host, "Global": "Global:"}[resp.CacheKeyType]
		ps.mu.Lock()
		ps.cache[p.name+" "+key] = &cachedAnswer{resp: resp, fetched: now, expires: now.Add(ttl)}
		ps.mu.Unlock()
	}
	return resp, nil
}

// Refresh forgets the cached answers a plugin gave for host after the registry refused them, so the next request
// runs the plugin again; answers younger than a few seconds are kept (asking again would not help). It reports
// whether a plugin matches host, that is whether asking again can give other credentials (for
// registry.Options.RefreshCredentials).
func (ps *Providers) Refresh(host string) bool {
	matched := false
	for _, p := range ps.providers {
		for _, m := range p.match {
			if m.matchesHost(host) {
				matched = true
			}
		}
	}
	if !matched {
		return false
	}
	now := ps.now()
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for k, a := range ps.cache {
		_, key, _ := strings.Cut(k, " ")
		h, _, _ := strings.Cut(strings.TrimPrefix(strings.TrimPrefix(key, "Image:"), "Registry:"), "/")
		if (key == "Global:" || h == host) && now.Sub(a.fetched) >= providerMinRefresh {
			delete(ps.cache, k)
		}
	}
	return true
}

// runProvider runs the plugin with the request on its standard input and returns its standard output. Its
// standard error is kept for the error message; its output, which holds credentials, never goes into one.
func runProvider(ctx context.Context, p *provider, stdin []byte) ([]byte, error) {
	return registry.RunCredentialCommand(ctx, p.path, providerTimeout, maxProviderOutput, stdin, func(ctx context.Context) *exec.Cmd {
		cmd := exec.CommandContext(ctx, p.path, p.args...)
		cmd.Env = append(os.Environ(), p.env...)
		return cmd
	})
}
