package main

import (
	"bytes"
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/testenv"
)

// credEnv is a temporary set of credentials files for the login and credentials commands.
type credEnv struct {
	t                      *testing.T
	dir, obdConfig, docker string
	helpers                string
}

func newCredEnv(t *testing.T) *credEnv {
	t.Helper()
	dir := t.TempDir()
	e := &credEnv{t: t, dir: dir, obdConfig: filepath.Join(dir, "obd.toml"), docker: filepath.Join(dir, "docker", "config.json"), helpers: filepath.Join(dir, "credential-helpers.json")}
	// obd.toml names the files, as an operator would: no flag is needed and nothing of this machine is read.
	cfg := "[registry]\ndocker_config = " + quote(e.docker) + "\ncredential_helpers = " + quote(e.helpers) + "\n"
	if err := os.WriteFile(e.obdConfig, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return e
}

func quote(s string) string { return `"` + strings.ReplaceAll(s, `"`, `\"`) + `"` }

// run runs obd with stdin and --obd-config, and returns stdout+stderr.
func (e *credEnv) run(stdin string, args ...string) (string, error) {
	e.t.Helper()
	var out bytes.Buffer
	root := newRootCmd()
	root.SetArgs(append(args, "--obd-config", e.obdConfig))
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetIn(strings.NewReader(stdin))
	err := root.ExecuteContext(e.t.Context())
	return out.String(), err
}

// noSecret fails the test if text shows a password in clear or encoded.
func noSecret(t *testing.T, text, user, pass string) {
	t.Helper()
	for _, s := range []string{pass, base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))} {
		if strings.Contains(text, s) {
			t.Errorf("output shows the password (%q):\n%s", s, text)
		}
	}
}

func TestLogin(t *testing.T) {
	host := testenv.BasicAuthRegistry(t, "alice", "pa55-word")
	e := newCredEnv(t)

	// A wrong password is refused and nothing is saved.
	out, err := e.run("wrong\n", "login", host, "-u", "alice", "--password-stdin")
	if err == nil || !strings.Contains(err.Error(), "refused user \"alice\"") || !strings.Contains(err.Error(), "nothing was saved") {
		t.Fatalf("wrong password: got %v\n%s", err, out)
	}
	noSecret(t, out+err.Error(), "alice", "wrong")
	if _, err := os.Stat(e.docker); err == nil {
		t.Fatal("credentials saved after the registry refused them")
	}

	// The right one is saved, with mode 0600, in the file of obd.toml.
	out, err = e.run("pa55-word\n", "login", host, "-u", "alice", "--password-stdin")
	if err != nil {
		t.Fatalf("login: %v\n%s", err, out)
	}
	noSecret(t, out, "alice", "pa55-word")
	if !strings.Contains(out, "Login succeeded") || !strings.Contains(out, e.docker) {
		t.Errorf("output:\n%s", out)
	}
	if strings.Contains(out, "note: obd-snapshotter reads") {
		t.Errorf("warned about the daemon's file although it is the one written:\n%s", out)
	}
	st, err := os.Stat(e.docker)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("credentials file: %v, mode %v", err, st.Mode())
	}
	b, _ := os.ReadFile(e.docker)
	if !strings.Contains(string(b), base64.StdEncoding.EncodeToString([]byte("alice:pa55-word"))) {
		t.Errorf("file does not hold the credentials:\n%s", b)
	}

	// Without --password-stdin on a non-terminal stdin: refused, with the way out.
	if _, err := e.run("pa55-word\n", "login", host, "-u", "alice"); err == nil || !strings.Contains(err.Error(), "--password-stdin") {
		t.Errorf("non-terminal stdin without --password-stdin: got %v", err)
	}
	if _, err := e.run("", "login", host, "--password-stdin"); err == nil || !strings.Contains(err.Error(), "-u") {
		t.Errorf("no user: got %v", err)
	}

	// A file elsewhere (--config-file) is written, with a note that the daemon reads another one.
	other := filepath.Join(e.dir, "other.json")
	out, err = e.run("pa55-word", "login", host, "-u", "alice", "--password-stdin", "--config-file", other, "--no-verify")
	if err != nil || !strings.Contains(out, "note: obd-snapshotter reads "+e.docker+", not "+other) {
		t.Errorf("--config-file: %v\n%s", err, out)
	}
}

func TestLoginMergesAndFixesMode(t *testing.T) {
	host := testenv.BasicAuthRegistry(t, "alice", "pw1")
	e := newCredEnv(t)
	if err := os.MkdirAll(filepath.Dir(e.docker), 0o755); err != nil {
		t.Fatal(err)
	}
	orig := `{"auths": {"other.example": {"auth": "Ym9iOnNlY3JldA=="}}, "credsStore": "", "detachKeys": "ctrl-x"}`
	if err := os.WriteFile(e.docker, []byte(orig), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := e.run("pw1", "login", host, "-u", "alice", "--password-stdin")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !strings.Contains(out, "readable by others (mode 0644): set its mode to 0600") {
		t.Errorf("no note about the mode:\n%s", out)
	}
	b, _ := os.ReadFile(e.docker)
	for _, want := range []string{"other.example", "Ym9iOnNlY3JldA==", `"detachKeys": "ctrl-x"`, host} {
		if !strings.Contains(string(b), want) {
			t.Errorf("file lacks %q:\n%s", want, b)
		}
	}

	// list: hosts and users, never passwords.
	out, err = e.run("", "credentials", "list")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{host, "alice", "other.example", "bob"} {
		if !strings.Contains(out, want) {
			t.Errorf("list lacks %q:\n%s", want, out)
		}
	}
	noSecret(t, out, "alice", "pw1")
	noSecret(t, out, "bob", "secret")
}

func TestLoginMalformedFile(t *testing.T) {
	host := testenv.BasicAuthRegistry(t, "alice", "pw")
	e := newCredEnv(t)
	if err := os.MkdirAll(filepath.Dir(e.docker), 0o700); err != nil {
		t.Fatal(err)
	}
	bad := `{"auths": {"x": "not an object"`
	if err := os.WriteFile(e.docker, []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := e.run("pw", "login", host, "-u", "alice", "--password-stdin")
	if err == nil || !strings.Contains(err.Error(), e.docker) {
		t.Fatalf("got %v, want an error naming %s", err, e.docker)
	}
	if b, _ := os.ReadFile(e.docker); string(b) != bad {
		t.Errorf("malformed file overwritten: %q", b)
	}
}

func TestCredentialsVerify(t *testing.T) {
	good := testenv.BasicAuthRegistry(t, "alice", "right")
	refusing := testenv.BasicAuthRegistry(t, "carol", "other")
	closed := httptest.NewServer(http.NotFoundHandler())
	down := strings.TrimPrefix(closed.URL, "http://")
	closed.Close()
	e := newCredEnv(t)
	for _, c := range []struct{ host, user, pass string }{{good, "alice", "right"}, {refusing, "bob", "wrong"}, {down, "dave", "pw"}} {
		if out, err := e.run(c.pass, "credentials", "set", c.host, "-u", c.user, "--password-stdin"); err != nil {
			t.Fatalf("set %s: %v\n%s", c.host, err, out)
		}
	}
	out, err := e.run("", "credentials", "verify", "--timeout", "1s")
	if err == nil || !strings.Contains(err.Error(), "2 of 3") {
		t.Errorf("verify: got %v, want 2 of 3 failed", err)
	}
	lines := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 0 {
			lines[f[0]] = l
		}
	}
	if l := lines[good]; !strings.Contains(l, "alice") || !strings.HasSuffix(strings.TrimSpace(l), "OK") {
		t.Errorf("good registry: %q", l)
	}
	if l := lines[refusing]; !strings.Contains(l, "unauthorized") || !strings.Contains(l, "401") || !strings.Contains(l, "obd login "+refusing) {
		t.Errorf("refusing registry: %q", l)
	}
	if l := lines[down]; !strings.Contains(l, "unreachable") {
		t.Errorf("closed port: %q", l)
	}
	for _, p := range []string{"right", "wrong"} {
		if strings.Contains(out, p) {
			t.Errorf("verify output shows a password:\n%s", out)
		}
	}
	// One registry by name.
	if out, err := e.run("", "credentials", "verify", good); err != nil || !strings.Contains(out, "OK") {
		t.Errorf("verify %s: %v\n%s", good, err, out)
	}
	// remove
	if out, err := e.run("", "credentials", "remove", refusing); err != nil || !strings.Contains(out, "removed the credentials for "+refusing) {
		t.Errorf("remove: %v\n%s", err, out)
	}
	if _, err := e.run("", "credentials", "remove", refusing); err == nil {
		t.Error("removing missing credentials succeeded")
	}
}

func TestCredentialsHelper(t *testing.T) {
	host := testenv.BasicAuthRegistry(t, "oauth2accesstoken", "tok-from-helper")
	e := newCredEnv(t)
	script := filepath.Join(e.dir, "helper.sh")
	if err := os.WriteFile(script, []byte("#!/bin/sh\necho tok-from-helper\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := e.run("", "credentials", "set", host, "--helper", script, "--ttl", "10m")
	if err != nil {
		t.Fatalf("set --helper: %v\n%s", err, out)
	}
	if st, err := os.Stat(e.helpers); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("helpers file: %v", err)
	}
	if strings.Contains(out, "tok-from-helper") {
		t.Errorf("set shows the token:\n%s", out)
	}
	out, err = e.run("", "credentials", "list")
	if err != nil || !strings.Contains(out, host) || !strings.Contains(out, "oauth2accesstoken") || !strings.Contains(out, "token helper") {
		t.Errorf("list: %v\n%s", err, out)
	}
	out, err = e.run("", "credentials", "verify")
	if err != nil || !strings.Contains(out, "OK") || strings.Contains(out, "tok-from-helper") {
		t.Errorf("verify with the helper: %v\n%s", err, out)
	}
	// A failing helper is not saved.
	if _, err := e.run("", "credentials", "set", "r.example", "--helper", "exit 4"); err == nil || !strings.Contains(err.Error(), "nothing was saved") {
		t.Errorf("failing helper: got %v", err)
	}
}
