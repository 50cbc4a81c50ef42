package install

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/testenv"
)

// credFiles writes an obd.toml naming a docker config and a token helpers file in a temporary directory.
func credFiles(t *testing.T) CredFiles {
	t.Helper()
	dir := t.TempDir()
	docker, helpers := filepath.Join(dir, "config.json"), filepath.Join(dir, "helpers.json")
	obdConfig := filepath.Join(dir, "obd.toml")
	if err := os.WriteFile(obdConfig, []byte("[registry]\ndocker_config = \""+docker+"\"\ncredential_helpers = \""+helpers+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cf, err := FindCredFiles("", "", obdConfig, true)
	if err != nil {
		t.Fatal(err)
	}
	if cf.Docker != docker || cf.Helpers != helpers || cf.DaemonDockerConfig() != docker {
		t.Fatalf("files from obd.toml: %+v", cf)
	}
	return cf
}

func TestFindCredFiles(t *testing.T) {
	cf := credFiles(t)
	flags, err := FindCredFiles("/x/config.json", "/x/helpers.json", cf.ObdConfig, true)
	if err != nil || flags.Docker != "/x/config.json" || flags.Helpers != "/x/helpers.json" {
		t.Errorf("flags first: %+v, %v", flags, err)
	}
	var b strings.Builder
	flags.noteDaemonFile(&b)
	if !strings.Contains(b.String(), "note: obd-snapshotter reads "+cf.Docker+", not /x/config.json") {
		t.Errorf("note: %q", b.String())
	}
	b.Reset()
	cf.noteDaemonFile(&b)
	if b.Len() != 0 {
		t.Errorf("note about the daemon's own file: %q", b.String())
	}
	if _, err := FindCredFiles("", "", filepath.Join(t.TempDir(), "missing.toml"), true); err == nil {
		t.Error("a missing obd.toml named explicitly")
	}
	def, err := FindCredFiles("", "", filepath.Join(t.TempDir(), "missing.toml"), false)
	if err != nil || def.Helpers != registry.DefaultHelperFile {
		t.Errorf("defaults: %+v, %v", def, err)
	}
}

func TestRegistryHost(t *testing.T) {
	for in, want := range map[string]string{"registry.example.com": "registry.example.com", "https://localhost:5000/v2/": "localhost:5000", "index.docker.io": "docker.io"} {
		if got, err := RegistryHost(in); err != nil || got != want {
			t.Errorf("RegistryHost(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "user@host", "a b"} {
		if _, err := RegistryHost(in); err == nil {
			t.Errorf("RegistryHost(%q) succeeded", in)
		}
	}
}

func TestCredFilesSaveListRemove(t *testing.T) {
	cf := credFiles(t)
	var out strings.Builder
	if err := cf.SaveLogin(&out, "reg.test", "alice", "pw"); err != nil || !strings.Contains(out.String(), "saved credentials of alice for reg.test in "+cf.Docker+"\n") {
		t.Fatalf("SaveLogin: %q, %v", out.String(), err)
	}
	h := registry.Helper{Command: "echo token", TTL: "30m"}
	if err := cf.SaveHelper(context.Background(), &out, "reg.test", h, true); err != nil {
		t.Fatal(err)
	}
	if err := cf.SaveHelper(context.Background(), &out, "bad.test", registry.Helper{Command: "exit 3"}, true); err == nil || !strings.Contains(err.Error(), "nothing was saved") {
		t.Errorf("a failing helper: %v", err)
	}
	if s := out.String(); !strings.Contains(s, `saved token helper for reg.test in `+cf.Helpers+`: user `+registry.DefaultHelperUsername+`, token from "echo token", renewed every 30m`) ||
		!strings.Contains(s, "give its absolute path") {
		t.Errorf("saving wrote %q", s)
	}

	var warn strings.Builder
	all, err := cf.List(&warn)
	if err != nil || len(all) != 2 || all[0].Helper == nil || warn.Len() != 0 {
		t.Fatalf("List = %+v, %v (warnings %q)", all, err, warn.String())
	}
	out.Reset()
	if err := cf.WriteList(&out, all); err != nil {
		t.Fatal(err)
	}
	if s := out.String(); !strings.Contains(s, "REGISTRY") || !strings.Contains(s, "alice") || !strings.Contains(s, "(not used: the token helper wins)") || strings.Contains(s, "pw") {
		t.Errorf("list:\n%s", s)
	}

	out.Reset()
	if err := cf.Remove(&out, "reg.test"); err != nil {
		t.Fatal(err)
	}
	if s := out.String(); !strings.Contains(s, "removed the credentials for reg.test") || !strings.Contains(s, "removed the token helper for reg.test") {
		t.Errorf("remove wrote %q", s)
	}
	if err := cf.Remove(&out, "reg.test"); err == nil || !strings.Contains(err.Error(), "no credentials for reg.test") {
		t.Errorf("removing again: %v", err)
	}
	out.Reset()
	if err := cf.WriteList(&out, nil); err != nil || !strings.HasPrefix(out.String(), "no credentials in ") {
		t.Errorf("empty list: %q, %v", out.String(), err)
	}
}

func TestCredFilesVerify(t *testing.T) {
	cf := credFiles(t)
	good, bad := testenv.BasicAuthRegistry(t, "alice", "pw"), testenv.BasicAuthRegistry(t, "bob", "other")
	var out strings.Builder
	for _, host := range []string{good, bad} {
		if err := cf.saveLogin(&out, host, "alice", "pw"); err != nil {
			t.Fatal(err)
		}
	}
	reach := Reach{PlainHTTP: true, Timeout: 5 * time.Second}
	ctx := context.Background()
	if err := cf.Ping(ctx, good, reach, registry.StaticCredentials("alice", "pw"), nil); err != nil {
		t.Errorf("Ping with good credentials: %v", err)
	}
	out.Reset()
	if err := cf.Login(ctx, &out, good, "alice", "pw", true, reach); err != nil || !strings.HasPrefix(out.String(), "Login succeeded: credentials of alice for "+good+" saved in "+cf.Docker) {
		t.Errorf("Login: %q, %v", out.String(), err)
	}
	if err := cf.Login(ctx, &out, good, "alice", "wrong", true, reach); err == nil || !strings.Contains(err.Error(), `the registry refused user "alice"`) {
		t.Errorf("Login with a wrong password: %v", err)
	}

	out.Reset()
	err := cf.Verify(ctx, &out, &out, nil, reach)
	if err == nil || err.Error() != "1 of 2 registries failed the check" {
		t.Errorf("Verify: %v", err)
	}
	if s := out.String(); !strings.Contains(s, good+"  alice  OK") || !strings.Contains(s, "unauthorized (") || !strings.Contains(s, "run 'obd login "+bad+"'") {
		t.Errorf("verify wrote\n%s", s)
	}
	out.Reset()
	if err := cf.Verify(ctx, &out, &out, []string{good}, reach); err != nil {
		t.Errorf("Verify %s: %v\n%s", good, err, out.String())
	}
	out.Reset()
	if err := cf.Verify(ctx, &out, &out, []string{"127.0.0.1:1"}, Reach{PlainHTTP: true, Timeout: time.Second}); err == nil ||
		err.Error() != "1 of 1 registry failed the check" || !strings.Contains(out.String(), "(anonymous)") || !strings.Contains(out.String(), "unreachable: ") {
		t.Errorf("Verify an unreachable registry: %v\n%s", err, out.String())
	}
}

func TestReadLogin(t *testing.T) {
	var prompt strings.Builder
	if u, p, err := ReadLogin(strings.NewReader("s3cret\r\n"), &prompt, "alice", true); err != nil || u != "alice" || p != "s3cret" {
		t.Errorf("password from stdin: %q %q %v", u, p, err)
	}
	for _, tc := range []struct {
		in, user string
		stdin    bool
		err      string
	}{
		{"pw\n", "", true, "no user name: pass -u USER"},
		{"pw\n", "", false, "no user name: pass -u USER"},
		{"\n", "alice", true, "empty password"},
		{"pw\n", "alice", false, "standard input is not a terminal"},
	} {
		if _, _, err := ReadLogin(strings.NewReader(tc.in), &prompt, tc.user, tc.stdin); err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("ReadLogin(%q, %q, %v): %v, want %q", tc.in, tc.user, tc.stdin, err, tc.err)
		}
	}
	if prompt.Len() != 0 {
		t.Errorf("prompted without a terminal: %q", prompt.String())
	}
}
