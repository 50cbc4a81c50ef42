package registry

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeConfig(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadDockerConfigShapes(t *testing.T) {
	for _, tc := range []struct {
		name, content, err string
	}{
		{"auth", `{"auths":{"r.io":{"auth":"` + basicAuth("u", "p:w") + `"}}}`, ""},
		{"username/password", `{"auths":{"r.io":{"username":"u","password":"p"}}}`, ""},
		{"identity token", `{"auths":{"r.io":{"identitytoken":"tok"}}}`, ""},
		{"extra fields", `{"auths":{"r.io":{"auth":"` + basicAuth("u", "p") + `","email":"x@y"}},"psFormat":"table","HttpHeaders":{}}`, ""},
		{"empty auths", `{"auths":{}}`, ""},
		{"helper only", `{"credsStore":"pass"}`, ""},
		{"empty entry with helper", `{"auths":{"r.io":{}},"credsStore":"pass"}`, ""},
		{"empty entry with per-host helper", `{"auths":{"r.io":{}},"credHelpers":{"r.io":"gcloud"}}`, ""},
		{"not JSON", `auths: {}`, "not a JSON object"},
		{"array", `[1,2]`, "not a JSON object"},
		{"null", `null`, "not a JSON object"},
		{"trailing", `{"auths":{}} {}`, "trailing data"},
		{"no auths", `{"other":1}`, `no "auths"`},
		{"auths not object", `{"auths":[]}`, `"auths" is not an object`},
		{"auths null", `{"auths":null}`, `"auths" is not an object`},
		{"entry not object", `{"auths":{"r.io":"u:p"}}`, `entry "r.io": not an object`},
		{"entry empty", `{"auths":{"r.io":{}}}`, `entry "r.io" has no "auth"`},
		{"bad base64", `{"auths":{"r.io":{"auth":"!!!"}}}`, "not valid base64"},
		{"no colon", `{"auths":{"r.io":{"auth":"dXNlcg=="}}}`, `"username:password"`},
		{"username only", `{"auths":{"r.io":{"username":"u"}}}`, "must both be set"},
		{"wrong type", `{"auths":{"r.io":{"auth":5}}}`, "wrong type"},
		{"bad credHelpers", `{"credHelpers":[]}`, `"credHelpers"`},
		{"bad credsStore", `{"credsStore":1}`, `"credsStore"`},
		{"key without host", `{"auths":{"https://":{"auth":"` + basicAuth("u", "p") + `"}}}`, "no registry host"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfig(t, tc.content)
			_, err := LoadDockerConfig(p)
			if tc.err == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted %s", tc.content)
			}
			if !strings.Contains(err.Error(), tc.err) || !strings.Contains(err.Error(), p) {
				t.Fatalf("error %q should name the file and say %q", err, tc.err)
			}
		})
	}
}

func TestLoadDockerConfigMissingFile(t *testing.T) {
	f, err := LoadDockerConfig(filepath.Join(t.TempDir(), "nope.json"))
	if err != nil {
		t.Fatal(err)
	}
	u, p, err := f(context.Background(), "r.io")
	if u != "" || p != "" || err != nil {
		t.Fatalf("missing file: %q %q %v, want anonymous", u, p, err)
	}
}

func TestDockerConfigKeyMatching(t *testing.T) {
	content := `{"auths":{
		"plain.io":{"auth":"` + basicAuth("plain", "1") + `"},
		"https://scheme.io":{"auth":"` + basicAuth("scheme", "2") + `"},
		"http://path.io/v1/":{"auth":"` + basicAuth("path", "3") + `"},
		"https://index.docker.io/v1/":{"auth":"` + basicAuth("hub", "4") + `"},
		"port.io:5000":{"username":"port","password":"5"},
		"https://both.io":{"auth":"` + basicAuth("normalized", "6") + `"},
		"both.io":{"auth":"` + basicAuth("exact", "7") + `"},
		"tok.io":{"identitytoken":"refresh"},
		"ns.io/team/app":{"auth":"` + basicAuth("ns", "8") + `"}
	}}`
	f, err := LoadDockerConfig(writeConfig(t, content))
	if err != nil {
		t.Fatal(err)
	}
	for host, want := range map[string]string{
		"plain.io":             "plain:1",
		"scheme.io":            "scheme:2",
		"path.io":              "path:3",
		"docker.io":            "hub:4",
		"registry-1.docker.io": "hub:4",
		"index.docker.io":      "hub:4",
		"port.io:5000":         "port:5",
		"port.io":              ":",
		"both.io":              "exact:7",
		"tok.io":               identityTokenUser + ":refresh",
		"ns.io":                "ns:8",
		"PLAIN.IO":             "plain:1",
		"other.io":             ":",
	} {
		u, p, err := f(context.Background(), host)
		if err != nil {
			t.Fatal(err)
		}
		if got := u + ":" + p; got != want {
			t.Errorf("%s: got %q, want %q", host, got, want)
		}
	}
}

func TestDockerConfigReloads(t *testing.T) {
	p := writeConfig(t, `{"auths":{"r.io":{"username":"u","password":"old"}}}`)
	f, err := LoadDockerConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, pass, _ := f(context.Background(), "r.io"); pass != "old" {
		t.Fatalf("pass %q", pass)
	}
	future := time.Now().Add(time.Minute)
	if err := os.WriteFile(p, []byte(`{"auths":{"r.io":{"username":"u","password":"newer"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(p, future, future); err != nil {
		t.Fatal(err)
	}
	if _, pass, _ := f(context.Background(), "r.io"); pass != "newer" {
		t.Fatalf("after rewrite: pass %q, want the new password", pass)
	}
	if err := os.WriteFile(p, []byte(`{"auths":"broken"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f(context.Background(), "r.io"); err == nil || !strings.Contains(err.Error(), p) {
		t.Fatalf("a file broken later must be an error naming it, got %v", err)
	}
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	if u, _, err := f(context.Background(), "r.io"); u != "" || err != nil {
		t.Fatalf("removed file: %q %v, want anonymous", u, err)
	}
}

func TestNewReadsDockerConfig(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("DOCKER_CONFIG", dir)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"auths":{"r.io":{}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Options{}); err == nil || !strings.Contains(err.Error(), filepath.Join(dir, "config.json")) {
		t.Fatalf("New with a broken docker config: err = %v", err)
	}
	f := newFakeRegistry(t)
	f.configure(func() { f.authMode, f.user, f.pass = "basic", "carol", "pw" })
	data, dg := f.addBlob(100)
	cfg := `{"auths":{"` + f.host() + `":{"auth":"` + basicAuth("carol", "pw") + `"}}}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := New(Options{PlainHTTP: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	if _, err := b.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
}

func FuzzLoadDockerConfig(f *testing.F) {
	for _, s := range []string{
		`{"auths":{"r.io":{"auth":"dTpw"}}}`,
		`{"auths":{"https://index.docker.io/v1/":{"username":"u","password":"p"}},"credsStore":"x"}`,
		`{"auths":{"r.io":{"identitytoken":"t"}}}`,
		`{"credHelpers":{"a":"b"}}`,
		`{"auths":{"r.io":{}}}`,
		`[]`, `null`, `{}`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := parseDockerConfig(data)
		if err != nil {
			if cfg != nil {
				t.Fatal("config returned with an error")
			}
			return
		}
		for host, a := range cfg.auths {
			if host == "" || host != normalizeRegistryHost(host) {
				t.Fatalf("unnormalized key %q", host)
			}
			if a.username == "" {
				t.Fatalf("entry %q accepted without a username", host)
			}
		}
	})
}

func TestIsLocalhost(t *testing.T) {
	for host, want := range map[string]bool{
		"localhost": true, "localhost:5000": true, "127.0.0.1:5000": true, "127.9.9.9": true, "[::1]:5000": true,
		"::1": true, "registry.local:5000": false, "10.0.0.1:5000": false, "localhost.example.com": false,
	} {
		if got := IsLocalhost(host); got != want {
			t.Errorf("IsLocalhost(%q) = %v, want %v", host, got, want)
		}
	}
}

func TestUserCredentials(t *testing.T) {
	creds, source, err := UserCredentials("alice:pa:ss")
	if err != nil || source != "--creds" {
		t.Fatalf("UserCredentials(alice:pa:ss) source %q, %v", source, err)
	}
	if u, p, err := creds(context.Background(), "r.test"); u != "alice" || p != "pa:ss" || err != nil {
		t.Errorf("credentials %q %q %v", u, p, err)
	}
	for _, bad := range []string{"alice", ":pw"} {
		if _, _, err := UserCredentials(bad); err == nil || err.Error() != "--creds: want user:password" {
			t.Errorf("UserCredentials(%q): %v", bad, err)
		}
	}
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	if _, source, err := UserCredentials(""); err != nil || source != DefaultDockerConfigPath() {
		t.Errorf("UserCredentials() source %q, %v", source, err)
	}
}
