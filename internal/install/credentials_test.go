package install

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/registry"
)

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func TestSetDockerLoginNewFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "docker", "config.json")
	notes, err := SetDockerLogin(path, "registry.example:5000", "alice", "s3cret")
	if err != nil {
		t.Fatal(err)
	}
	if len(notes) != 1 || !strings.Contains(notes[0], "created "+path) {
		t.Errorf("notes = %q", notes)
	}
	if m := mode(t, path); m != 0o600 {
		t.Errorf("mode %04o, want 0600", m)
	}
	creds, err := registry.LoadDockerConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if u, p, err := creds(context.Background(), "registry.example:5000"); err != nil || u != "alice" || p != "s3cret" {
		t.Errorf("the daemon's reader got %q %q %v", u, p, err)
	}
}

func TestSetDockerLoginMerges(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.json")
	orig := `{
	"auths": {
		"other.example": {"auth": "Ym9iOnB3"},
		"https://registry.example/v1/": {"auth": "b2xkOm9sZA=="}
	},
	"credHelpers": {"ecr.example": "ecr-login"},
	"HttpHeaders": {"User-Agent": "x"},
	"psFormat": "table {{.ID}}"
}`
	if err := os.WriteFile(path, []byte(orig), 0o644); err != nil {
		t.Fatal(err)
	}
	notes, err := SetDockerLogin(path, "Registry.Example", "alice", "pw")
	if err != nil {
		t.Fatal(err)
	}
	if len(notes) != 1 || !strings.Contains(notes[0], "0644") || !strings.Contains(notes[0], "0600") {
		t.Errorf("notes = %q: want a note about the mode fixed", notes)
	}
	if m := mode(t, path); m != 0o600 {
		t.Errorf("mode %04o, want 0600", m)
	}
	var got map[string]json.RawMessage
	b, _ := os.ReadFile(path)
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"credHelpers", "HttpHeaders", "psFormat"} {
		if _, ok := got[k]; !ok {
			t.Errorf("top-level key %q lost:\n%s", k, b)
		}
	}
	var auths map[string]map[string]string
	_ = json.Unmarshal(got["auths"], &auths)
	if len(auths) != 2 || auths["other.example"]["auth"] != "Ym9iOnB3" || auths["registry.example"] == nil {
		t.Errorf("auths = %v: want other.example kept and the old registry.example entry replaced", auths)
	}
	list, warnings, err := ListDockerLogins(path)
	if err != nil || len(warnings) != 0 {
		t.Fatal(err, warnings)
	}
	var summary []string
	for _, c := range list {
		summary = append(summary, c.Registry+"="+c.User+"@"+c.Source)
	}
	want := []string{"ecr.example=?@docker-credential-ecr-login", "other.example=bob@" + path, "registry.example=alice@" + path}
	if strings.Join(summary, " ") != strings.Join(want, " ") {
		t.Errorf("list = %v, want %v", summary, want)
	}
	if strings.Contains(strings.Join(summary, " "), "pw") {
		t.Error("list shows a password")
	}

	removed, _, err := RemoveDockerLogin(path, "registry.example")
	if err != nil || !removed {
		t.Fatalf("remove: %v %v", removed, err)
	}
	if removed, _, err := RemoveDockerLogin(path, "registry.example"); err != nil || removed {
		t.Fatalf("second remove: %v %v", removed, err)
	}
}

func TestDockerHubKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.json")
	if _, err := SetDockerLogin(path, "docker.io", "alice", "pw"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if !strings.Contains(string(b), `"https://index.docker.io/v1/"`) {
		t.Errorf("Docker Hub key not docker's:\n%s", b)
	}
	creds, _ := registry.LoadDockerConfig(path)
	if u, _, _ := creds(context.Background(), "registry-1.docker.io"); u != "alice" {
		t.Errorf("Docker Hub credentials not found for registry-1.docker.io: %q", u)
	}
}

func TestMalformedCredentialsFiles(t *testing.T) {
	for _, tc := range []struct{ name, content string }{
		{"not json", "{auths"},
		{"array", "[]"},
		{"auths not object", `{"auths": []}`},
		{"broken other entry", `{"auths": {"other.example": {"auth": "%%%"}}}`},
		{"two objects", `{} {}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "config.json")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := SetDockerLogin(path, "r.example", "alice", "pw")
			if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "not changed") {
				t.Errorf("got %v, want an error naming %s and saying it was not changed", err, path)
			}
			if b, _ := os.ReadFile(path); string(b) != tc.content {
				t.Errorf("file changed to %q", b)
			}
		})
	}
	path := filepath.Join(t.TempDir(), "h.json")
	if err := os.WriteFile(path, []byte(`{"helpers": {"x": {"command": ""}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := SetTokenHelper(path, "r.example", registry.Helper{Command: "echo t"}); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("broken helpers file: got %v", err)
	}
}

func TestEmptyCredentialsFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(path, []byte("{}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := SetDockerLogin(path, "r.example", "alice", "pw"); err != nil {
		t.Fatal(err)
	}
	if _, err := SetDockerLogin(path, "r.example", "al:ice", "pw"); err == nil {
		t.Error("user name with ':' accepted")
	}
	if _, err := SetDockerLogin(path, "r.example", "alice", ""); err == nil {
		t.Error("empty password accepted")
	}
}

func TestTokenHelpersFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "obd", "credential-helpers.json")
	if _, err := SetTokenHelper(path, "gcr.io", registry.Helper{Command: "gcloud auth print-access-token"}); err != nil {
		t.Fatal(err)
	}
	if _, err := SetTokenHelper(path, "https://ECR.example/", registry.Helper{Command: "aws ecr get-login-password", Username: "AWS", TTL: "6h0m0s"}); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, path); m != 0o600 {
		t.Errorf("mode %04o, want 0600", m)
	}
	list, _, err := ListTokenHelpers(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].Registry != "ecr.example" || list[0].User != "AWS" || list[1].User != registry.DefaultHelperUsername {
		t.Errorf("list = %+v", list)
	}
	if _, err := SetTokenHelper(path, "gcr.io", registry.Helper{Command: "x", TTL: "0s"}); err == nil {
		t.Error("ttl 0 accepted")
	}
	if removed, _, err := RemoveTokenHelper(path, "gcr.io"); err != nil || !removed {
		t.Fatalf("remove: %v %v", removed, err)
	}
	hf, err := registry.ReadHelperFile(path)
	if err != nil || len(hf.Helpers) != 1 {
		t.Fatalf("after remove: %+v %v", hf, err)
	}
}
