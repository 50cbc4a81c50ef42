package registry

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// rotatingHelper writes a helper script that prints gen-1, gen-2, … on successive runs and returns the command
// that runs it and a func counting the runs so far.
func rotatingHelper(t *testing.T) (command string, runs func() int) {
	t.Helper()
	dir := t.TempDir()
	script := filepath.Join(dir, "helper.sh")
	count := filepath.Join(dir, "count")
	body := `#!/bin/sh
n=$(cat "$1" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$1"
echo "gen-$n"
`
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("'%s' '%s'", script, count), func() int {
		b, err := os.ReadFile(count)
		if errors.Is(err, os.ErrNotExist) {
			return 0
		}
		n, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
}

// writeHelpers writes a helpers file with one helper per host.
func writeHelpers(t *testing.T, path string, helpers map[string]Helper) {
	t.Helper()
	var b strings.Builder
	b.WriteString(`{"helpers": {`)
	first := true
	for host, h := range helpers {
		if !first {
			b.WriteString(",")
		}
		first = false
		fmt.Fprintf(&b, "%q: {%q: %q, %q: %q, %q: %q}", host, "command", h.Command, "username", h.Username, "ttl", h.TTL)
	}
	b.WriteString("}}\n")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestHelperRotatingTokens runs a fake helper that prints a new token on each run against a registry that accepts
// only the newest token: the helper runs once per TTL, again when the registry refuses its token, and not more.
func TestHelperRotatingTokens(t *testing.T) {
	f := newFakeRegistry(t)
	f.configure(func() { f.authMode, f.user, f.pass = "basic", DefaultHelperUsername, "gen-1" })
	command, runs := rotatingHelper(t)
	path := filepath.Join(t.TempDir(), "credential-helpers.json")
	writeHelpers(t, path, map[string]Helper{f.host(): {Command: command}})

	hc, err := NewHelperCredentials(path, StaticCredentials("other", "pass"))
	if err != nil {
		t.Fatal(err)
	}
	clock := time.Unix(1_700_000_000, 0)
	hc.now = func() time.Time { return clock }
	newClient := func() *Client {
		return testClient(t, func(o *Options) { o.Credentials, o.RefreshCredentials = hc.Credential, hc.Refresh })
	}
	ctx := context.Background()
	c := newClient()

	if err := c.Ping(ctx, f.host()); err != nil {
		t.Fatalf("first ping: %v", err)
	}
	if n := runs(); n != 1 {
		t.Fatalf("helper ran %d times for the first request, want 1", n)
	}

	// Within the TTL a new client (empty auth cache) gets the same token without running the helper.
	clock = clock.Add(10 * time.Minute)
	if err := newClient().Ping(ctx, f.host()); err != nil {
		t.Fatalf("ping within TTL: %v", err)
	}
	if n := runs(); n != 1 {
		t.Fatalf("helper ran %d times within its TTL, want 1", n)
	}

	// The registry rotates: the cached token is refused, the helper runs again and the request succeeds.
	f.rotate("gen-2")
	if err := c.Ping(ctx, f.host()); err != nil {
		t.Fatalf("ping after the registry rotated its token: %v", err)
	}
	if n := runs(); n != 2 {
		t.Fatalf("helper ran %d times after a 401, want 2", n)
	}

	// Past the TTL the helper runs again before the registry refuses anything.
	clock = clock.Add(DefaultHelperTTL + time.Second)
	f.rotate("gen-3")
	if err := newClient().Ping(ctx, f.host()); err != nil {
		t.Fatalf("ping past the TTL: %v", err)
	}
	if n := runs(); n != 3 {
		t.Fatalf("helper ran %d times past its TTL, want 3", n)
	}

	// A token fetched moments ago that is refused is not fetched again in a loop: the error says unauthorized.
	f.rotate("never")
	err = newClient().Ping(ctx, f.host())
	if !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("ping with a refused fresh token: got %v, want ErrUnauthorized", err)
	}
	if n := runs(); n != 3 {
		t.Fatalf("helper ran %d times for a refused fresh token, want 3", n)
	}

	// Hosts without a helper get the wrapped credentials.
	if u, p, err := hc.Credential(ctx, "elsewhere.example"); err != nil || u != "other" || p != "pass" {
		t.Fatalf("credentials of a host without helper: %q %q %v", u, p, err)
	}
	if hc.Refresh("elsewhere.example") {
		t.Fatal("Refresh of a host without helper reported a refreshable source")
	}
}

func TestHelperConcurrentCallsRunOnce(t *testing.T) {
	command, runs := rotatingHelper(t)
	path := filepath.Join(t.TempDir(), "h.json")
	writeHelpers(t, path, map[string]Helper{"registry.example": {Command: "sleep 0.2; " + command, Username: "AWS", TTL: "1h"}})
	hc, err := NewHelperCredentials(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			u, p, err := hc.Credential(context.Background(), "registry.example")
			if err != nil || u != "AWS" || p != "gen-1" {
				t.Errorf("Credential: %q %q %v", u, p, err)
			}
		}()
	}
	wg.Wait()
	if n := runs(); n != 1 {
		t.Fatalf("helper ran %d times for 8 concurrent requests, want 1", n)
	}
}

func TestHelperFileReloads(t *testing.T) {
	path := filepath.Join(t.TempDir(), "h.json")
	hc, err := NewHelperCredentials(path, nil) // missing file: no helpers
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if u, p, err := hc.Credential(ctx, "r.example"); err != nil || u != "" || p != "" {
		t.Fatalf("no helpers file: got %q %q %v, want anonymous", u, p, err)
	}
	writeHelpers(t, path, map[string]Helper{"https://r.example/v1/": {Command: "echo tok-a"}})
	if _, p, err := hc.Credential(ctx, "r.example"); err != nil || p != "tok-a" {
		t.Fatalf("after adding a helper: got %q %v", p, err)
	}
	// A changed command runs at once, whatever the TTL.
	writeHelpers(t, path, map[string]Helper{"r.example": {Command: "echo tok-bb"}})
	if _, p, err := hc.Credential(ctx, "r.example"); err != nil || p != "tok-bb" {
		t.Fatalf("after changing the command: got %q %v", p, err)
	}
	hosts, err := hc.Hosts()
	if err != nil || len(hosts) != 1 || hosts[0] != "r.example" {
		t.Fatalf("Hosts: %v %v", hosts, err)
	}
	if err := os.WriteFile(path, []byte(`{"helpers": {"r.example": {"command": ""}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := hc.Credential(ctx, "r.example"); err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("broken helpers file: got %v, want an error naming %s", err, path)
	}
}

func TestHelperFailures(t *testing.T) {
	for _, tc := range []struct {
		name, command string
		want          []string // in the error
	}{
		{"exit status", "echo leaked-token; echo 'not logged in' >&2; exit 3", []string{"exit status 3", "not logged in"}},
		{"no output", "true", []string{"printed no token"}},
		{"two lines", "echo leaked-token; echo leaked-token", []string{"more than one line"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "h.json")
			writeHelpers(t, path, map[string]Helper{"r.example": {Command: tc.command}})
			hc, err := NewHelperCredentials(path, nil)
			if err != nil {
				t.Fatal(err)
			}
			_, _, err = hc.Credential(context.Background(), "r.example")
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range append(tc.want, path, "r.example") {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "leaked-token\n") || strings.Count(err.Error(), "leaked-token") > strings.Count(tc.command, "leaked-token") {
				t.Errorf("error %q shows the helper's output", err)
			}
		})
	}
}

func TestParseHelperFile(t *testing.T) {
	for _, tc := range []struct {
		name, data, want string // want: "" for valid, else part of the error
	}{
		{"empty object", `{}`, ""},
		{"one helper", `{"helpers": {"gcr.io": {"command": "gcloud auth print-access-token"}}, "other": 1}`, ""},
		{"not json", `{`, "not a JSON object"},
		{"null", `null`, "not a JSON object"},
		{"helpers not object", `{"helpers": []}`, `"helpers" is not an object`},
		{"empty command", `{"helpers": {"gcr.io": {"command": " "}}}`, `"command" is empty`},
		{"bad ttl", `{"helpers": {"gcr.io": {"command": "x", "ttl": "soon"}}}`, `"ttl"`},
		{"unknown field", `{"helpers": {"gcr.io": {"command": "x", "password": "p"}}}`, "unknown field"},
		{"same host twice", `{"helpers": {"gcr.io": {"command": "x"}, "https://gcr.io": {"command": "y"}}}`, "same registry"},
		{"trailing", `{} {}`, "trailing data"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseHelperFile([]byte(tc.data))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("unexpected error %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want an error with %q", err, tc.want)
			}
		})
	}
}
