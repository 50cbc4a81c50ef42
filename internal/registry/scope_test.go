package registry

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	digest "github.com/opencontainers/go-digest"
)

// TestRequestRepository checks that the CredentialFunc of a Client learns the repository of each blob and
// manifest request, and that credentials answered per repository reach the registry although one client (and its
// cache of basic credentials) serves both repositories: here the registry accepts user R only for repository R.
func TestRequestRepository(t *testing.T) {
	blob := []byte("blob bytes")
	dg := digest.FromBytes(blob)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		repo, _, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/v2/"), "/blobs/")
		repo, _, _ = strings.Cut(repo, "/manifests/")
		if u, _, ok := r.BasicAuth(); !ok || u != repo {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		if strings.Contains(r.URL.Path, "/blobs/") {
			w.Write(blob)
			return
		}
		w.WriteHeader(http.StatusNotFound)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	var mu sync.Mutex
	var asked []string
	c, err := New(Options{PlainHTTP: true, RetryBudget: 1, Credentials: func(ctx context.Context, h string) (string, string, error) {
		repo := RequestRepository(ctx, h)
		mu.Lock()
		asked = append(asked, h+" "+repo)
		mu.Unlock()
		return repo, "p", nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	for _, repo := range []string{"team/app", "other/lib", "team/app"} {
		b, err := c.Blob(ctx, host, repo, dg, int64(len(blob)))
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, len(blob))
		if _, err := b.ReadAt(p, 0); err != nil || string(p) != string(blob) {
			t.Fatalf("read of %s: %q, %v", repo, p, err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	want := []string{host + " team/app", host + " other/lib", host + " team/app"}
	if strings.Join(asked, ",") != strings.Join(want, ",") {
		t.Errorf("credentials asked for %q, want %q", asked, want)
	}
	if got := RequestRepository(ctx, host); got != "" {
		t.Errorf("a context without scope: %q", got)
	}
}
