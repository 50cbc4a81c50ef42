package node

import (
	"context"
	"encoding/base64"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	digest "github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/cri"
	"github.com/obdproject/obd/internal/registry"
)

// TestClientPoolCredentialOrder checks the order in which the daemon's registry clients ask for credentials: those
// of the CRI pull of the image's repository first, then a credential provider plugin, then the docker config file.
// The registry accepts user "pod" only for team/app, "plugin" only for team/plugin and "node" for the rest.
func TestClientPoolCredentialOrder(t *testing.T) {
	blob := []byte("layer bytes")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		repo, _, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/v2/"), "/blobs/")
		want := map[string]string{"team/app": "pod", "team/plugin": "plugin"}[repo]
		if want == "" {
			want = "node"
		}
		if u, _, ok := r.BasicAuth(); !ok || u != want {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		w.Write(blob)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")

	dir := t.TempDir()
	dockerConfig := filepath.Join(dir, "config.json")
	if err := os.WriteFile(dockerConfig, []byte(`{"auths": {"`+host+`": {"auth": "`+base64.StdEncoding.EncodeToString([]byte("node:pw"))+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	plugin := "#!/bin/sh\ncat > /dev/null\necho '{\"apiVersion\": \"credentialprovider.kubelet.k8s.io/v1\", \"kind\": \"CredentialProviderResponse\", \"cacheKeyType\": \"Image\", \"auth\": {\"" + host + "/team/plugin\": {\"username\": \"plugin\", \"password\": \"pw\"}}}'\n"
	if err := os.WriteFile(filepath.Join(dir, "fake-provider"), []byte(plugin), 0o755); err != nil {
		t.Fatal(err)
	}
	providers, err := cri.NewProviders(dir, []config.CredentialProvider{{Name: "fake-provider", MatchImages: []string{host}}})
	if err != nil {
		t.Fatal(err)
	}
	pulls := cri.NewStore(time.Hour)
	if _, err := pulls.Put(host+"/team/app:v1", "pod", "pw"); err != nil {
		t.Fatal(err)
	}
	cfg := config.Default().Registry
	cfg.DockerConfig = dockerConfig
	cfg.CredentialHelpers = filepath.Join(dir, "missing.json")
	cp := &clientPool{cfg: cfg, budget: 5 * time.Second, logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		pulls: pulls, providers: providers, clients: map[string]*registry.Client{}}
	defer cp.close()
	c, err := cp.get(host)
	if err != nil {
		t.Fatal(err)
	}
	for _, repo := range []string{"team/app", "team/plugin", "team/other", "team/app"} {
		b, err := c.Blob(context.Background(), host, repo, digest.FromBytes(blob), int64(len(blob)))
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, len(blob))
		if _, err := b.ReadAt(p, 0); err != nil {
			t.Errorf("read of %s: %v", repo, err)
		}
	}
}
