package cri

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/config"
)

// fakePlugin writes an executable plugin into dir that records each request (standard input) in dir/requests,
// counts its runs in dir/count, and prints response with COUNT replaced by the run's number.
func fakePlugin(t *testing.T, dir, name, response string) {
	t.Helper()
	script := "#!/bin/sh\n" +
		"cat >> '" + filepath.Join(dir, "requests") + "'\necho >> '" + filepath.Join(dir, "requests") + "'\n" +
		"n=$(cat '" + filepath.Join(dir, "count") + "' 2>/dev/null || echo 0)\nn=$((n + 1))\necho $n > '" + filepath.Join(dir, "count") + "'\n" +
		"echo \"$PLUGIN_ARG $1\" > '" + filepath.Join(dir, "args") + "'\n" +
		"cat <<'END' | sed \"s/COUNT/$n/\"\n" + response + "\nEND\n"
	if err := os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
}

func runs(t *testing.T, dir string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "count"))
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

func TestProvidersExecPlugin(t *testing.T) {
	dir := t.TempDir()
	fakePlugin(t, dir, "ecr-login", `{"apiVersion": "credentialprovider.kubelet.k8s.io/v1", "kind": "CredentialProviderResponse",
 "cacheKeyType": "Registry", "cacheDuration": "1h0m0s",
 "auth": {"*.dkr.ecr.*.amazonaws.com": {"username": "AWS", "password": "tok-COUNT"},
          "1.dkr.ecr.eu-west-1.amazonaws.com/special": {"username": "special", "password": "sp-COUNT"}}}`)
	ps, err := NewProviders(dir, []config.CredentialProvider{{
		Name: "ecr-login", MatchImages: []string{"*.dkr.ecr.*.amazonaws.com"}, Args: []string{"get-credentials"},
		Env: map[string]string{"PLUGIN_ARG": "from-env"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	clock := &fakeClock{t: time.Unix(1700000000, 0)}
	ps.now = clock.now
	next := func(context.Context, string) (string, string, error) { return "node", "node-pw", nil }
	f := ps.Credentials(next)
	host := "1.dkr.ecr.eu-west-1.amazonaws.com"

	ask := func(host, repo string) (string, string) {
		t.Helper()
		u, p, err := f(scopedContext(t, host, repo), host)
		if err != nil {
			t.Fatalf("%s/%s: %v", host, repo, err)
		}
		return u, p
	}
	if u, p := ask(host, "team/app"); u != "AWS" || p != "tok-1" {
		t.Errorf("got %q %q, want AWS tok-1", u, p)
	}
	req, _ := os.ReadFile(filepath.Join(dir, "requests"))
	if want := `{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"` + host + `/team/app"}`; strings.TrimSpace(string(req)) != want {
		t.Errorf("request %s, want %s", req, want)
	}
	if args, _ := os.ReadFile(filepath.Join(dir, "args")); strings.TrimSpace(string(args)) != "from-env get-credentials" {
		t.Errorf("plugin ran with args/env %q", args)
	}
	// The most specific auth key wins; the answer is cached for the registry (cacheKeyType Registry).
	if u, p := ask(host, "special/x"); u != "special" || p != "sp-1" {
		t.Errorf("got %q %q, want special sp-1", u, p)
	}
	if n := runs(t, dir); n != 1 {
		t.Errorf("plugin ran %d times, want 1 (cached for the registry)", n)
	}
	// Images the plugin does not match are next's.
	if u, _ := ask("gcr.io", "team/app"); u != "node" {
		t.Errorf("unmatched image answered %q, want next's", u)
	}
	if u, _ := ask("2.dkr.ecr.us-east-1.amazonaws.com:5000", "team/app"); u != "node" {
		t.Errorf("a port the pattern does not name answered %q, want next's", u)
	}
	// After cacheDuration the plugin runs again.
	clock.add(time.Hour)
	if _, p := ask(host, "team/app"); p != "tok-2" {
		t.Errorf("after the cache duration got %q, want tok-2", p)
	}
	// A 401 makes it run again, unless the answer is only seconds old.
	if !ps.Refresh(host) {
		t.Error("Refresh of a matched host reported false")
	}
	if _, p := ask(host, "team/app"); p != "tok-2" {
		t.Errorf("a fresh answer was dropped on refresh: %q", p)
	}
	clock.add(10 * time.Second)
	ps.Refresh(host)
	if _, p := ask(host, "team/app"); p != "tok-3" {
		t.Errorf("after a refresh got %q, want tok-3", p)
	}
	if ps.Refresh("gcr.io") {
		t.Error("Refresh of a host no plugin matches reported true")
	}
}

// TestProvidersErrors checks that a failing plugin and a bad answer are errors naming the plugin, with the
// plugin's standard error but never its standard output.
func TestProvidersErrors(t *testing.T) {
	dir := t.TempDir()
	script := "#!/bin/sh\necho 'SECRET-OUTPUT'\necho 'no credentials for this account' >&2\nexit 3\n"
	if err := os.WriteFile(filepath.Join(dir, "failing"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	fakePlugin(t, dir, "badjson", `{"apiVersion": "credentialprovider.kubelet.k8s.io/v1", "kind": "CredentialProviderResponse", "cacheKeyType": "Image", "auth": {"r.io": {"username": 5, "password": "SECRET-OUTPUT"}}}`)
	ps, err := NewProviders(dir, []config.CredentialProvider{
		{Name: "failing", MatchImages: []string{"a.io"}},
		{Name: "badjson", MatchImages: []string{"r.io"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	f := ps.Credentials(nil)
	for host, want := range map[string]string{"a.io": "no credentials for this account", "r.io": `"username" is a JSON number`} {
		_, _, err := f(scopedContext(t, host, "app"), host)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "credential provider") {
			t.Errorf("%s: error %v, want one naming the plugin and saying %q", host, err, want)
		}
		if err != nil && strings.Contains(err.Error(), "SECRET") {
			t.Errorf("%s: the error shows the plugin's output: %v", host, err)
		}
	}
	if _, err := NewProviders(dir, []config.CredentialProvider{{Name: "missing", MatchImages: []string{"r.io"}}}); err == nil {
		t.Error("a missing plugin executable was accepted")
	}
	if _, err := NewProviders(dir, []config.CredentialProvider{{Name: "failing", MatchImages: []string{"r.io:x"}}}); err == nil {
		t.Error("a bad match_images pattern was accepted")
	}
}

func TestParseProviderResponse(t *testing.T) {
	const head = `"apiVersion": "credentialprovider.kubelet.k8s.io/v1", "kind": "CredentialProviderResponse"`
	for _, c := range []struct{ in, err string }{
		{`{` + head + `, "cacheKeyType": "Image", "cacheDuration": "5m", "auth": {"r.io/a": {"username": "u", "password": "p"}}}`, ""},
		{`{` + head + `, "cacheKeyType": "Global", "auth": {}}`, ""},
		{`{` + head + `, "cacheKeyType": "Registry"}`, ""},
		{``, "not a CredentialProviderResponse"},
		{`[]`, "not a CredentialProviderResponse"},
		{`{` + head + `, "cacheKeyType": "Image"} {}`, "trailing data"},
		{`{"kind": "CredentialProviderResponse", "cacheKeyType": "Image"}`, "no apiVersion"},
		{`{"apiVersion": "credentialprovider.kubelet.k8s.io/v1alpha1", "kind": "CredentialProviderResponse", "cacheKeyType": "Image"}`, `apiVersion "credentialprovider.kubelet.k8s.io/v1alpha1"`},
		{`{"apiVersion": "credentialprovider.kubelet.k8s.io/v1", "kind": "Other", "cacheKeyType": "Image"}`, "kind"},
		{`{` + head + `}`, "no cacheKeyType"},
		{`{` + head + `, "cacheKeyType": "Pod"}`, `cacheKeyType "Pod"`},
		{`{` + head + `, "cacheKeyType": "Image", "cacheDuration": "soon"}`, `cacheDuration "soon"`},
		{`{` + head + `, "cacheKeyType": "Image", "cacheDuration": "-1s"}`, `cacheDuration "-1s"`},
		{`{` + head + `, "cacheKeyType": "Image", "auth": {":5000": {"username": "u"}}}`, "no registry host"},
		{`{` + head + `, "cacheKeyType": "Image", "auth": {"r.io": {}}}`, "no username and no password"},
		{`{` + head + `, "cacheKeyType": "Image", "auth": {"r.io": {"user": "u"}}}`, `want {"username", "password"}`},
		{`{` + head + `, "cacheKeyType": "Image", "auth": {"r.io": "u:p"}}`, `want {"username", "password"}`},
		{`{` + head + `, "cacheKeyType": 1}`, `"cacheKeyType" is a JSON number`},
	} {
		_, err := ParseProviderResponse([]byte(c.in))
		switch {
		case c.err == "" && err != nil:
			t.Errorf("%s: %v", c.in, err)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("%s: error %v, want one saying %q", c.in, err, c.err)
		}
	}
}

func TestPatternMatch(t *testing.T) {
	for _, c := range []struct {
		pattern, host, repo string
		want                bool
	}{
		{"*.dkr.ecr.*.amazonaws.com", "1.dkr.ecr.eu-west-1.amazonaws.com", "a", true},
		{"*.dkr.ecr.*.amazonaws.com", "dkr.ecr.eu-west-1.amazonaws.com", "a", false},
		{"gcr.io", "gcr.io", "p/a", true},
		{"gcr.io", "GCR.io", "p/a", true},
		{"gcr.io/p", "gcr.io", "p/a", true},
		{"gcr.io/p", "gcr.io", "p", true},
		{"gcr.io/p", "gcr.io", "pq/a", false},
		{"gcr.io", "gcr.io:443", "a", false},
		{"r.io:5000", "r.io:5000", "a", true},
		{"https://r.io", "r.io", "a", true},
		{"*.io", "a.b.io", "x", false},
	} {
		pt, err := parsePattern(c.pattern)
		if err != nil {
			t.Fatal(err)
		}
		if got := pt.matches(c.host, c.repo); got != c.want {
			t.Errorf("%s matches %s/%s = %v, want %v", c.pattern, c.host, c.repo, got, c.want)
		}
	}
}

// FuzzParseProviderResponse checks that any plugin output is either rejected with an error or gives a response
// whose fields are all valid.
func FuzzParseProviderResponse(f *testing.F) {
	f.Add([]byte(`{"apiVersion": "credentialprovider.kubelet.k8s.io/v1", "kind": "CredentialProviderResponse", "cacheKeyType": "Image", "cacheDuration": "5m", "auth": {"r.io/a": {"username": "u", "password": "p"}}}`))
	f.Add([]byte(`{"apiVersion": "credentialprovider.kubelet.k8s.io/v1", "kind": "CredentialProviderResponse", "cacheKeyType": "Global"}`))
	f.Add([]byte(`{"auth": {"*.io:1": {"username": "x", "password": "p"}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ParseProviderResponse(data)
		if err != nil {
			return
		}
		switch r.CacheKeyType {
		case "Image", "Registry", "Global":
		default:
			t.Fatalf("accepted cacheKeyType %q", r.CacheKeyType)
		}
		if r.CacheDuration < 0 {
			t.Fatalf("accepted cacheDuration %v", r.CacheDuration)
		}
		for k, a := range r.Auth {
			if _, err := parsePattern(k); err != nil {
				t.Fatalf("accepted auth key %q: %v", k, err)
			}
			if a.Username == "" && a.Password == "" {
				t.Fatalf("accepted an empty credential for %q", k)
			}
		}
	})
}
