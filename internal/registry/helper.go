package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/obdproject/obd/internal/iocount"
)

// Token helpers are commands that print a short-lived registry token ("gcloud auth print-access-token", "aws ecr
// get-login-password"). obd-snapshotter runs them itself, so lazy reads keep working long after the token that a
// pull used has expired. They are kept in obd's own file (DefaultHelperFile), not in the docker config.

const (
	// DefaultHelperFile is the token helpers file obd-snapshotter reads unless [registry] credential_helpers says
	// otherwise.
	DefaultHelperFile = "/etc/obd/credential-helpers.json"
	// DefaultHelperTTL is how long a helper's token is used before the helper runs again.
	DefaultHelperTTL = 30 * time.Minute
	// DefaultHelperUsername is sent with a helper's token when the helper names no user: the name Google's
	// registries expect with an OAuth access token.
	DefaultHelperUsername = "oauth2accesstoken"

	helperTimeout    = time.Minute     // longest a helper may run
	helperMinRefresh = 5 * time.Second // a token younger than this is not refreshed on a 401: it would not help
	maxHelperOutput  = 64 << 10
)

// HelperFile is the content of a token helpers file:
//
//	{"helpers": {"gcr.io": {"command": "gcloud auth print-access-token", "username": "oauth2accesstoken", "ttl": "30m"}}}
type HelperFile struct {
	Helpers map[string]Helper `json:"helpers"`
}

// Helper is the token helper of one registry host.
type Helper struct {
	// Command is run with /bin/sh -c; its standard output, without surrounding white space, is the token.
	Command string `json:"command"`
	// Username is sent with the token as the password; "" means DefaultHelperUsername.
	Username string `json:"username,omitempty"`
	// TTL is how long a token is used before the command runs again (a Go duration such as "30m"); "" means
	// DefaultHelperTTL. The command also runs again when the registry refuses its token.
	TTL string `json:"ttl,omitempty"`
}

// User returns the username sent with the helper's token.
func (h Helper) User() string {
	if h.Username == "" {
		return DefaultHelperUsername
	}
	return h.Username
}

// Lifetime returns how long a token of the helper is used.
func (h Helper) Lifetime() time.Duration {
	d, err := time.ParseDuration(h.TTL)
	if h.TTL == "" || err != nil || d <= 0 {
		return DefaultHelperTTL
	}
	return d
}

// Token runs the helper's command once and returns the token it printed.
func (h Helper) Token(ctx context.Context) (string, error) { return runHelper(ctx, h.Command) }

// Validate checks the helper of host.
func (h Helper) Validate() error {
	if strings.TrimSpace(h.Command) == "" {
		return errors.New(`"command" is empty`)
	}
	if h.TTL != "" {
		if d, err := time.ParseDuration(h.TTL); err != nil || d < time.Second {
			return fmt.Errorf(`"ttl" %q: want a duration of at least 1s, such as "30m"`, h.TTL)
		}
	}
	return nil
}

// ParseHelperFile parses and validates the bytes of a token helpers file. Its keys are returned as written.
func ParseHelperFile(data []byte) (*HelperFile, error) {
	var top map[string]json.RawMessage
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&top); err != nil || top == nil {
		if err == nil {
			err = errors.New("null")
		}
		return nil, fmt.Errorf("not a JSON object: %w", err)
	}
	if dec.More() {
		return nil, errors.New("trailing data after the JSON object")
	}
	hf := &HelperFile{Helpers: map[string]Helper{}}
	raw, ok := top["helpers"]
	if !ok {
		return hf, nil
	}
	var entries map[string]json.RawMessage
	if err := json.Unmarshal(raw, &entries); err != nil {
		return nil, errors.New(`"helpers" is not an object`)
	}
	seen := map[string]string{}
	for k, v := range entries {
		var h Helper
		d := json.NewDecoder(bytes.NewReader(v))
		d.DisallowUnknownFields()
		if err := d.Decode(&h); err != nil {
			return nil, fmt.Errorf(`"helpers" entry %q: want {"command", "username", "ttl"}: %w`, k, err)
		}
		if err := h.Validate(); err != nil {
			return nil, fmt.Errorf(`"helpers" entry %q: %w`, k, err)
		}
		host := normalizeRegistryHost(k)
		if host == "" {
			return nil, fmt.Errorf(`"helpers" entry %q: no registry host in the key`, k)
		}
		if other, dup := seen[host]; dup {
			a, b := min(k, other), max(k, other)
			return nil, fmt.Errorf(`"helpers" entries %q and %q name the same registry`, a, b)
		}
		seen[host] = k
		hf.Helpers[k] = h
	}
	return hf, nil
}

// ReadHelperFile reads a token helpers file; a missing file has no helpers.
func ReadHelperFile(path string) (*HelperFile, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return &HelperFile{Helpers: map[string]Helper{}}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("token helpers %s: %w", path, err)
	}
	hf, err := ParseHelperFile(data)
	if err != nil {
		return nil, fmt.Errorf("token helpers %s: %w", path, err)
	}
	return hf, nil
}

// HelperCredentials answers credentials for registries from their token helpers, and for the other registries
// from the CredentialFunc it wraps. A helper runs when its host is first asked for, again once its token is older
// than the helper's TTL, and again after Refresh (the registry refused the token). Concurrent requests for one host
// share one run. The helpers file is read again when it changes, so new helpers need no restart. Tokens are kept
// in memory only and never logged.
type HelperCredentials struct {
	path string
	next CredentialFunc

	now        func() time.Time
	run        func(ctx context.Context, command string) (string, error)
	minRefresh time.Duration

	mu      sync.Mutex
	size    int64
	modTime time.Time
	loaded  bool
	helpers map[string]Helper       // normalized host → helper
	tokens  map[string]*helperToken // normalized host → last token
}

// helperToken is the last token a host's helper printed.
type helperToken struct {
	mu      sync.Mutex // held while the helper runs
	command string     // the command that printed token
	token   string
	fetched time.Time
	stale   bool // refused by the registry: run the helper again
}

// NewHelperCredentials reads the helpers file at path (missing: no helpers) and returns credentials that ask the
// helpers first and next (nil: anonymous) for every other registry. A malformed file is an error naming it.
func NewHelperCredentials(path string, next CredentialFunc) (*HelperCredentials, error) {
	if next == nil {
		next = StaticCredentials("", "")
	}
	h := &HelperCredentials{
		path:       path,
		next:       next,
		now:        time.Now,
		run:        runHelper,
		minRefresh: helperMinRefresh,
		helpers:    map[string]Helper{},
		tokens:     map[string]*helperToken{},
	}
	if _, err := h.current(); err != nil {
		return nil, err
	}
	return h, nil
}

// Credential is the CredentialFunc: the helper's user and token for a host with a helper, next's answer otherwise.
func (h *HelperCredentials) Credential(ctx context.Context, host string) (string, string, error) {
	helpers, err := h.current()
	if err != nil {
		return "", "", err
	}
	key := normalizeRegistryHost(host)
	helper, ok := helpers[key]
	if !ok {
		return h.next(ctx, host)
	}
	h.mu.Lock()
	t := h.tokens[key]
	if t == nil {
		t = &helperToken{}
		h.tokens[key] = t
	}
	h.mu.Unlock()

	t.mu.Lock()
	defer t.mu.Unlock()
	if t.token != "" && !t.stale && t.command == helper.Command && h.now().Sub(t.fetched) < helper.Lifetime() {
		return helper.User(), t.token, nil
	}
	tok, err := h.run(ctx, helper.Command)
	if err != nil {
		return "", "", fmt.Errorf("token helper for %s (in %s): %w", host, h.path, err)
	}
	t.command, t.token, t.fetched, t.stale = helper.Command, tok, h.now(), false
	return helper.User(), tok, nil
}

// Refresh marks the token of host stale after the registry refused it, so the next Credential runs the helper
// again; a token fetched moments ago is kept (running the helper again would not help). It reports whether host
// has a helper, that is whether asking for credentials again can give other ones. It is meant for
// Options.RefreshCredentials.
func (h *HelperCredentials) Refresh(host string) bool {
	helpers, err := h.current()
	if err != nil {
		return false
	}
	key := normalizeRegistryHost(host)
	if _, ok := helpers[key]; !ok {
		return false
	}
	h.mu.Lock()
	t := h.tokens[key]
	h.mu.Unlock()
	if t == nil {
		return true
	}
	t.mu.Lock()
	if h.now().Sub(t.fetched) >= h.minRefresh {
		t.stale = true
	}
	t.mu.Unlock()
	return true
}

// Has reports whether host has a helper.
func (h *HelperCredentials) Has(host string) bool {
	helpers, err := h.current()
	if err != nil {
		return false
	}
	_, ok := helpers[normalizeRegistryHost(host)]
	return ok
}

// Hosts lists the hosts that have a helper, sorted.
func (h *HelperCredentials) Hosts() ([]string, error) {
	helpers, err := h.current()
	if err != nil {
		return nil, err
	}
	hosts := make([]string, 0, len(helpers))
	for k := range helpers {
		hosts = append(hosts, k)
	}
	sort.Strings(hosts)
	return hosts, nil
}

// current returns the helpers, reading the file again if it changed since the last read.
func (h *HelperCredentials) current() (map[string]Helper, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.path == "" {
		return h.helpers, nil
	}
	st, err := os.Stat(h.path)
	if errors.Is(err, os.ErrNotExist) {
		h.loaded, h.helpers = false, map[string]Helper{}
		return h.helpers, nil
	}
	if err != nil {
		return nil, fmt.Errorf("token helpers %s: %w", h.path, err)
	}
	if h.loaded && st.Size() == h.size && st.ModTime().Equal(h.modTime) {
		return h.helpers, nil
	}
	hf, err := ReadHelperFile(h.path)
	if err != nil {
		return nil, err
	}
	helpers := make(map[string]Helper, len(hf.Helpers))
	for k, v := range hf.Helpers {
		helpers[normalizeRegistryHost(k)] = v
	}
	h.loaded, h.size, h.modTime, h.helpers = true, st.Size(), st.ModTime(), helpers
	return helpers, nil
}

// RunCredentialCommand runs the command newCmd makes (name labels its errors) with stdin, within timeout, and
// returns its standard output, of at most maxOut bytes. That output holds a secret and never goes into an error;
// the first 4 KiB of its standard error do.
func RunCredentialCommand(ctx context.Context, name string, timeout time.Duration, maxOut int, stdin []byte,
	newCmd func(context.Context) *exec.Cmd) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := newCmd(ctx)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	stdout, stderr := iocount.LimitedBuffer{Limit: maxOut}, iocount.LimitedBuffer{Limit: 4 << 10}
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (limit %s)", ctx.Err(), timeout)
		}
		if msg := strings.Join(strings.Fields(stderr.String()), " "); msg != "" {
			if len(msg) > 300 {
				msg = msg[:300] + "…"
			}
			return nil, fmt.Errorf("%s: %w: %s", name, err, msg)
		}
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if stdout.Truncated {
		return nil, fmt.Errorf("%s printed more than %d bytes", name, maxOut)
	}
	return stdout.Bytes(), nil
}

// runHelper runs command with /bin/sh -c and returns what it printed, trimmed. Its standard error is kept for the
// error message; its standard output, which holds the token, never goes into one.
func runHelper(ctx context.Context, command string) (string, error) {
	out, err := RunCredentialCommand(ctx, fmt.Sprintf("%q", command), helperTimeout, maxHelperOutput, nil,
		func(ctx context.Context) *exec.Cmd { return exec.CommandContext(ctx, "/bin/sh", "-c", command) })
	if err != nil {
		return "", err
	}
	tok := strings.TrimSpace(string(out))
	switch {
	case tok == "":
		return "", fmt.Errorf("%q printed no token", command)
	case strings.ContainsAny(tok, "\r\n"):
		return "", fmt.Errorf("%q printed more than one line: want only the token", command)
	}
	return tok, nil
}
