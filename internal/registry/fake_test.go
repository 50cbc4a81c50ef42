package registry

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// fakeRegistry is an in-process registry on loopback implementing the subset of the distribution API that the
// client uses, with hooks for fault injection.
type fakeRegistry struct {
	t   *testing.T
	srv *httptest.Server

	mu        sync.Mutex
	blobs     map[digest.Digest][]byte
	manifests map[string]fakeManifest // tag or digest → manifest
	authMode  string                  // "", "basic" or "bearer"
	user      string
	pass      string
	refresh   string          // accepted identity (refresh) token, "" for none
	tokens    map[string]bool // valid bearer tokens
	tokenSeq  int
	// blobHook, when set, may answer a blob request itself (return true). n counts blob requests from 1.
	blobHook func(w http.ResponseWriter, r *http.Request, n int) bool
	// redirect, when set, answers blob GETs with 307 to redirect+"/blobdata/<digest>" ("" base = relative).
	redirect      *string
	blobRequests  atomic.Int64
	tokenRequests atomic.Int64
	ranges        []string // Range headers of blob GETs, in order
}

type fakeManifest struct {
	mediaType string
	data      []byte
	noDigest  bool // omit Docker-Content-Digest
}

func newFakeRegistry(t *testing.T) *fakeRegistry {
	t.Helper()
	f := &fakeRegistry{t: t, blobs: map[digest.Digest][]byte{}, manifests: map[string]fakeManifest{}, tokens: map[string]bool{}}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

// host returns the registry's host:port.
func (f *fakeRegistry) host() string { return strings.TrimPrefix(f.srv.URL, "http://") }

// addBlob stores random bytes of size n and returns them with their digest.
func (f *fakeRegistry) addBlob(n int) ([]byte, digest.Digest) {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(uint64(n), 7))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	d := digest.FromBytes(b)
	f.mu.Lock()
	f.blobs[d] = b
	f.mu.Unlock()
	return b, d
}

// rotate invalidates every issued token and sets a new password.
func (f *fakeRegistry) rotate(pass string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pass = pass
	clear(f.tokens)
}

// authorized checks the request's credentials and answers 401 when they do not do.
func (f *fakeRegistry) authorized(w http.ResponseWriter, r *http.Request, repo string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	h := r.Header.Get("Authorization")
	switch f.authMode {
	case "basic":
		u, p, ok := r.BasicAuth()
		if ok && u == f.user && p == f.pass {
			return true
		}
		w.Header().Set("WWW-Authenticate", `Basic realm="fake"`)
	case "bearer":
		if tok, ok := strings.CutPrefix(h, "Bearer "); ok && f.tokens[tok] {
			return true
		}
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="fake",scope="repository:%s:pull"`, f.srv.URL, repo))
	default:
		return true
	}
	http.Error(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`, http.StatusUnauthorized)
	return false
}

func (f *fakeRegistry) serveToken(w http.ResponseWriter, r *http.Request) {
	f.tokenRequests.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	ok := false
	if r.Method == http.MethodPost {
		_ = r.ParseForm()
		ok = f.refresh != "" && r.PostForm.Get("grant_type") == "refresh_token" && r.PostForm.Get("refresh_token") == f.refresh
	} else {
		u, p, has := r.BasicAuth()
		ok = (has && u == f.user && p == f.pass) || (!has && f.user == "")
	}
	if !ok {
		http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}`, http.StatusUnauthorized)
		return
	}
	f.tokenSeq++
	tok := fmt.Sprintf("tok-%d", f.tokenSeq)
	f.tokens[tok] = true
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]string{"token": tok, "access_token": tok})
}

func (f *fakeRegistry) serve(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	switch {
	case p == "/token":
		f.serveToken(w, r)
		return
	case strings.HasPrefix(p, "/blobdata/"):
		f.serveBlobData(w, r, digest.Digest(strings.TrimPrefix(p, "/blobdata/")))
		return
	case p == "/v2/" || p == "/v2":
		if f.authorized(w, r, "") {
			w.WriteHeader(http.StatusOK)
		}
		return
	}
	rest, ok := strings.CutPrefix(p, "/v2/")
	if !ok {
		http.NotFound(w, r)
		return
	}
	if i := strings.LastIndex(rest, "/blobs/"); i >= 0 {
		repo, dg := rest[:i], digest.Digest(rest[i+len("/blobs/"):])
		if !f.authorized(w, r, repo) {
			return
		}
		n := int(f.blobRequests.Add(1))
		f.mu.Lock()
		f.ranges = append(f.ranges, r.Header.Get("Range"))
		hook, redirect := f.blobHook, f.redirect
		f.mu.Unlock()
		if hook != nil && hook(w, r, n) {
			return
		}
		if redirect != nil && r.Method == http.MethodGet {
			w.Header().Set("Location", *redirect+"/blobdata/"+dg.String()+"?sig=abc")
			w.WriteHeader(http.StatusTemporaryRedirect)
			return
		}
		f.serveBlobData(w, r, dg)
		return
	}
	if i := strings.LastIndex(rest, "/manifests/"); i >= 0 {
		repo, ref := rest[:i], rest[i+len("/manifests/"):]
		if !f.authorized(w, r, repo) {
			return
		}
		f.mu.Lock()
		m, ok := f.manifests[ref]
		f.mu.Unlock()
		if !ok {
			http.Error(w, `{"errors":[{"code":"MANIFEST_UNKNOWN"}]}`, http.StatusNotFound)
			return
		}
		w.Header().Set("Content-Type", m.mediaType)
		if !m.noDigest {
			w.Header().Set("Docker-Content-Digest", digest.FromBytes(m.data).String())
		}
		_, _ = w.Write(m.data)
		return
	}
	http.NotFound(w, r)
}

// serveBlobData serves a stored blob with full Range support.
func (f *fakeRegistry) serveBlobData(w http.ResponseWriter, r *http.Request, dg digest.Digest) {
	f.mu.Lock()
	b, ok := f.blobs[dg]
	f.mu.Unlock()
	if !ok {
		http.Error(w, `{"errors":[{"code":"BLOB_UNKNOWN"}]}`, http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(b))
}

// testClient returns a plain-HTTP client with a short budget and quiet logs.
func testClient(t *testing.T, mod func(*Options)) *Client {
	t.Helper()
	opts := Options{
		PlainHTTP:      true,
		Credentials:    StaticCredentials("", ""),
		RetryBudget:    5 * time.Second,
		RequestTimeout: 2 * time.Second,
		Logger:         slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	if mod != nil {
		mod(&opts)
	}
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// basicAuth encodes user:pass for a docker config "auth" field.
func basicAuth(user, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
}

// mustBlob opens a lazy blob.
func mustBlob(t *testing.T, c *Client, host, repo string, dg digest.Digest, size int64) *Blob {
	t.Helper()
	b, err := c.Blob(context.Background(), host, repo, dg, size)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// configure changes the registry's behaviour under its lock.
func (f *fakeRegistry) configure(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn()
}
