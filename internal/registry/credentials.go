package registry

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"oras.land/oras-go/v2/registry/remote/credentials"
)

// CredentialFunc returns the username and password for a registry host ("host[:port]"). Empty strings mean
// anonymous access. A username of "<token>" marks password as an identity (refresh) token, as docker does.
type CredentialFunc func(ctx context.Context, host string) (username, password string, err error)

// identityTokenUser is docker's marker username for an identity token stored as the password.
const identityTokenUser = "<token>"

// IdentityTokenUser is the username a CredentialFunc answers to mark the password as an identity (refresh) token.
const IdentityTokenUser = identityTokenUser

// StaticCredentials returns a CredentialFunc that answers user and pass for every host.
func StaticCredentials(user, pass string) CredentialFunc {
	return func(context.Context, string) (string, string, error) { return user, pass, nil }
}

// DefaultDockerConfigPath returns the docker config file docker itself would use: $DOCKER_CONFIG/config.json,
// else ~/.docker/config.json. It returns "" when neither is known (no home directory).
func DefaultDockerConfigPath() string {
	if dir := os.Getenv("DOCKER_CONFIG"); dir != "" {
		return filepath.Join(dir, "config.json")
	}
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		return ""
	}
	return filepath.Join(home, ".docker", "config.json")
}

// LoadDockerConfig reads a docker config file ({"auths": {"host": {"auth": base64("user:pass")} |
// {"username","password"} | {"identitytoken"}}}, plus "credsStore"/"credHelpers" credential helpers) and returns
// a CredentialFunc over it. A file of any other shape is an error naming the file and the problem; a missing file
// means anonymous access. The returned func re-reads the file when it changes, so rotated passwords are picked up
// without a restart. Keys match the way docker matches them: "host", "https://host", "host/v1/", ….
func LoadDockerConfig(path string) (CredentialFunc, error) {
	dc := &dockerConfigFile{path: path}
	if err := dc.reload(); err != nil {
		return nil, err
	}
	return dc.lookup, nil
}

// dockerConfigFile is a docker config file parsed on load and re-parsed when its size or mtime changes.
type dockerConfigFile struct {
	path string

	mu      sync.Mutex
	size    int64
	modTime time.Time
	exists  bool
	cfg     *dockerConfig
}

// dockerAuth is one usable "auths" entry.
type dockerAuth struct {
	username, password string // password holds the identity token when username is identityTokenUser
}

// dockerConfig is the validated content of a docker config file.
type dockerConfig struct {
	auths       map[string]dockerAuth // normalized host → credentials
	helperHosts map[string]bool       // normalized hosts whose "auths" entry is empty: ask the helper
	credsStore  string                // default credential helper suffix, "" if none
	credHelpers map[string]string     // normalized host → helper suffix
}

// reload re-reads the file if it changed since the last read.
func (d *dockerConfigFile) reload() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	st, err := os.Stat(d.path)
	if errors.Is(err, os.ErrNotExist) {
		d.exists, d.cfg = false, &dockerConfig{}
		return nil
	}
	if err != nil {
		return fmt.Errorf("docker config %s: %w", d.path, err)
	}
	if d.exists && d.cfg != nil && st.Size() == d.size && st.ModTime().Equal(d.modTime) {
		return nil
	}
	data, err := os.ReadFile(d.path)
	if err != nil {
		return fmt.Errorf("docker config %s: %w", d.path, err)
	}
	cfg, err := parseDockerConfig(data)
	if err != nil {
		return fmt.Errorf("docker config %s: %w", d.path, err)
	}
	d.exists, d.size, d.modTime, d.cfg = true, st.Size(), st.ModTime(), cfg
	return nil
}

// lookup is the CredentialFunc of the file.
func (d *dockerConfigFile) lookup(ctx context.Context, host string) (string, string, error) {
	if err := d.reload(); err != nil {
		return "", "", err
	}
	d.mu.Lock()
	cfg := d.cfg
	d.mu.Unlock()
	key := normalizeRegistryHost(host)
	if a, ok := cfg.auths[key]; ok {
		return a.username, a.password, nil
	}
	helper := cfg.credHelpers[key]
	if helper == "" && (cfg.helperHosts[key] || cfg.credsStore != "") {
		helper = cfg.credsStore
	}
	if helper == "" {
		return "", "", nil
	}
	cred, err := credentials.NewNativeStore(helper).Get(ctx, credentials.ServerAddressFromHostname(key))
	if err != nil {
		return "", "", fmt.Errorf("docker config %s: credential helper docker-credential-%s for %s: %w", d.path, helper, host, err)
	}
	if cred.RefreshToken != "" {
		return identityTokenUser, cred.RefreshToken, nil
	}
	return cred.Username, cred.Password, nil
}

// parseDockerConfig validates and parses the bytes of a docker config file.
func parseDockerConfig(data []byte) (*dockerConfig, error) {
	var top map[string]json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&top); err != nil {
		return nil, fmt.Errorf("not a JSON object: %w", err)
	}
	if top == nil {
		return nil, errors.New("not a JSON object")
	}
	if dec.More() {
		return nil, errors.New("trailing data after the JSON object")
	}
	cfg := &dockerConfig{auths: map[string]dockerAuth{}, helperHosts: map[string]bool{}, credHelpers: map[string]string{}}
	if raw, ok := top["credsStore"]; ok {
		if err := json.Unmarshal(raw, &cfg.credsStore); err != nil {
			return nil, errors.New(`"credsStore" is not a string`)
		}
	}
	if raw, ok := top["credHelpers"]; ok {
		var helpers map[string]string
		if err := json.Unmarshal(raw, &helpers); err != nil || helpers == nil {
			return nil, errors.New(`"credHelpers" is not an object of strings`)
		}
		for k, v := range helpers {
			if v == "" {
				return nil, fmt.Errorf(`"credHelpers" entry %q names no helper`, k)
			}
			cfg.credHelpers[normalizeRegistryHost(k)] = v
		}
	}
	raw, ok := top["auths"]
	if !ok {
		if cfg.credsStore == "" && len(cfg.credHelpers) == 0 {
			return nil, errors.New(`no "auths" object (and no "credsStore" or "credHelpers")`)
		}
		return cfg, nil
	}
	var auths map[string]json.RawMessage
	if err := json.Unmarshal(raw, &auths); err != nil || auths == nil {
		return nil, errors.New(`"auths" is not an object`)
	}
	// Exact keys ("host") win over keys that only normalize to the host ("https://host/v1/"); among the latter the
	// first in sorted order wins, so the answer does not depend on map iteration order.
	keys := make([]string, 0, len(auths))
	for k := range auths {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		ei, ej := keys[i] == normalizeRegistryHost(keys[i]), keys[j] == normalizeRegistryHost(keys[j])
		if ei != ej {
			return ei
		}
		return keys[i] < keys[j]
	})
	for _, k := range keys {
		a, usable, err := parseDockerAuthEntry(auths[k])
		if err != nil {
			return nil, fmt.Errorf(`"auths" entry %q: %w`, k, err)
		}
		host := normalizeRegistryHost(k)
		if host == "" {
			return nil, fmt.Errorf(`"auths" entry %q: no registry host in the key`, k)
		}
		if !usable {
			if cfg.credsStore == "" && cfg.credHelpers[host] == "" {
				return nil, fmt.Errorf(`"auths" entry %q has no "auth", "username"/"password" or "identitytoken" (and no credential helper is configured)`, k)
			}
			cfg.helperHosts[host] = true
			continue
		}
		if _, dup := cfg.auths[host]; !dup {
			cfg.auths[host] = a
		}
	}
	return cfg, nil
}

// parseDockerAuthEntry parses one "auths" value. usable is false for an entry with no credential in it (docker
// writes such entries when a credential helper holds the secret).
func parseDockerAuthEntry(raw json.RawMessage) (a dockerAuth, usable bool, err error) {
	var e struct {
		Auth          *string `json:"auth"`
		Username      *string `json:"username"`
		Password      *string `json:"password"`
		IdentityToken *string `json:"identitytoken"`
	}
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(raw, &probe); err != nil || probe == nil {
		return a, false, errors.New("not an object")
	}
	if err := json.Unmarshal(raw, &e); err != nil {
		return a, false, fmt.Errorf("a field has the wrong type: %w", err)
	}
	str := func(p *string) string {
		if p == nil {
			return ""
		}
		return *p
	}
	if auth := str(e.Auth); auth != "" {
		dec, err := base64.StdEncoding.DecodeString(auth)
		if err != nil {
			return a, false, fmt.Errorf(`"auth" is not valid base64: %w`, err)
		}
		user, pass, ok := strings.Cut(string(dec), ":")
		if !ok || user == "" {
			return a, false, errors.New(`"auth" does not decode to "username:password"`)
		}
		a = dockerAuth{username: user, password: pass}
		usable = true
	} else if str(e.Username) != "" || str(e.Password) != "" {
		if str(e.Username) == "" || str(e.Password) == "" {
			return a, false, errors.New(`"username" and "password" must both be set`)
		}
		a = dockerAuth{username: str(e.Username), password: str(e.Password)}
		usable = true
	}
	if tok := str(e.IdentityToken); tok != "" {
		a = dockerAuth{username: identityTokenUser, password: tok}
		usable = true
	}
	return a, usable, nil
}

// ValidateDockerConfig checks the bytes of a docker config file the way LoadDockerConfig does.
func ValidateDockerConfig(data []byte) error {
	_, err := parseDockerConfig(data)
	return err
}

// HostKey returns the registry host a docker config key or a registry name stands for, the way docker matches
// them: scheme and path dropped, lower case, Docker Hub's aliases folded to "index.docker.io".
func HostKey(s string) string { return normalizeRegistryHost(s) }

// normalizeRegistryHost turns a docker config key or a registry host into the host docker would look up:
// scheme and path dropped, Docker Hub's aliases folded to "index.docker.io".
func normalizeRegistryHost(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.Index(s, "://"); i >= 0 {
		s = s[i+3:]
	}
	if i := strings.IndexByte(s, '/'); i >= 0 {
		s = s[:i]
	}
	s = strings.ToLower(s)
	switch s {
	case "docker.io", "registry-1.docker.io", "index.docker.io":
		return "index.docker.io"
	}
	return s
}

// UserCredentials returns the credentials of creds (user:password, from a --creds flag) and "--creds" as their
// source, or when creds is "" those of the default docker config file and its path.
func UserCredentials(creds string) (CredentialFunc, string, error) {
	if creds != "" {
		user, pass, ok := strings.Cut(creds, ":")
		if !ok || user == "" {
			return nil, "", fmt.Errorf("--creds: want user:password")
		}
		return StaticCredentials(user, pass), "--creds", nil
	}
	path := DefaultDockerConfigPath()
	c, err := LoadDockerConfig(path)
	return c, path, err
}
