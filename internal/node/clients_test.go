package node

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/registry"
)

// TestClientPoolUsesTokenHelper checks the daemon's wiring of credentials: a registry with a token helper in the
// helpers file of obd.toml gets the helper's token, a new one once the old one is older than the helper's TTL,
// and an unauthorized error naming the helpers file when the registry refuses a fresh token.
func TestClientPoolUsesTokenHelper(t *testing.T) {
	var accepted atomic.Value
	accepted.Store("gen-1")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); ok && u == registry.DefaultHelperUsername && p == accepted.Load().(string) {
			w.WriteHeader(http.StatusOK)
			return
		}
		w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")

	dir := t.TempDir()
	script := filepath.Join(dir, "helper.sh")
	counter := filepath.Join(dir, "count")
	body := "#!/bin/sh\nn=$(cat '" + counter + "' 2>/dev/null || echo 0)\nn=$((n + 1))\necho $n > '" + counter + "'\necho gen-$n\n"
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	helpers := filepath.Join(dir, "credential-helpers.json")
	if err := os.WriteFile(helpers, []byte(`{"helpers": {"`+host+`": {"command": "`+script+`", "ttl": "1s"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := config.Default().Registry
	cfg.DockerConfig = filepath.Join(dir, "config.json") // missing: anonymous for other registries
	cfg.CredentialHelpers = helpers
	cp := &clientPool{cfg: cfg, budget: 5 * time.Second, logger: slog.New(slog.NewTextHandler(io.Discard, nil)), clients: map[string]*registry.Client{}}
	defer cp.close()
	c, err := cp.get(host)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := c.Ping(ctx, host); err != nil {
		t.Fatalf("with the helper's first token: %v", err)
	}
	accepted.Store("gen-2")
	// Past the helper's TTL its token is not used again: the helper runs again.
	time.Sleep(1100 * time.Millisecond)
	if err := c.Ping(ctx, host); err != nil {
		t.Fatalf("after the registry rotated its token: %v", err)
	}
	accepted.Store("never")
	err = c.Ping(ctx, host)
	if !errors.Is(err, registry.ErrUnauthorized) || !strings.Contains(err.Error(), helpers) {
		t.Fatalf("refused fresh token: got %v, want unauthorized naming %s", err, helpers)
	}
}
