package registry

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestReadAtRandomRanges(t *testing.T) {
	f := newFakeRegistry(t)
	data, dg := f.addBlob(1<<20 + 123)
	c := testClient(t, nil)
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	r := rand.New(rand.NewPCG(1, 2))
	for range 50 {
		off := r.Int64N(int64(len(data)))
		n := r.IntN(70000) + 1
		p := make([]byte, n)
		got, err := b.ReadAt(p, off)
		want := min(n, len(data)-int(off))
		if got != want {
			t.Fatalf("ReadAt(%d, %d) = %d, want %d (%v)", n, off, got, want, err)
		}
		if got < n && err != io.EOF {
			t.Fatalf("short read at the end must return io.EOF, got %v", err)
		}
		if got == n && err != nil {
			t.Fatalf("full read returned %v", err)
		}
		if !bytes.Equal(p[:got], data[off:off+int64(got)]) {
			t.Fatalf("bytes at %d differ", off)
		}
	}
	if _, err := b.ReadAt(make([]byte, 1), int64(len(data))); err != io.EOF {
		t.Fatalf("read at size: %v, want io.EOF", err)
	}
	if n, err := b.ReadAt(nil, 5); n != 0 || err != nil {
		t.Fatalf("empty read: %d %v", n, err)
	}
	st := b.Stats()
	if st.Requests != 50 || st.Retries != 0 || st.Errors != 0 || st.BytesFetched == 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestConcurrentReads(t *testing.T) {
	f := newFakeRegistry(t)
	data, dg := f.addBlob(300000)
	c := testClient(t, nil)
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 3))
			for range 20 {
				off := r.Int64N(int64(len(data)) - 5000)
				p := make([]byte, 5000)
				if _, err := b.ReadAt(p, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, data[off:off+5000]) {
					errs <- fmt.Errorf("mismatch at %d", off)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestBlobSizeLookup(t *testing.T) {
	f := newFakeRegistry(t)
	data, dg := f.addBlob(4321)
	c := testClient(t, nil)
	b := mustBlob(t, c, f.host(), "app", dg, -1)
	if b.Size() != int64(len(data)) {
		t.Fatalf("size %d, want %d", b.Size(), len(data))
	}
	// A registry whose HEAD gives no length: the size comes from a one-byte range's Content-Range.
	f.configure(func() {
		f.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			if r.Method == http.MethodHead {
				w.Header().Set("Transfer-Encoding", "chunked")
				w.WriteHeader(http.StatusOK)
				return true
			}
			return false
		}
	})
	b = mustBlob(t, c, f.host(), "app", dg, -1)
	if b.Size() != int64(len(data)) {
		t.Fatalf("size via range %d, want %d", b.Size(), len(data))
	}
}

func TestRetryThenSuccess(t *testing.T) {
	var prefix []byte // the start of the blob: what a server that ignores the range sends first
	for _, tc := range []struct {
		name  string
		fault func(w http.ResponseWriter)
	}{
		{"503", func(w http.ResponseWriter) { http.Error(w, "busy", http.StatusServiceUnavailable) }},
		{"500", func(w http.ResponseWriter) { http.Error(w, "oops", http.StatusInternalServerError) }},
		{"429", func(w http.ResponseWriter) {
			w.Header().Set("Retry-After", "1")
			http.Error(w, "slow down", http.StatusTooManyRequests)
		}},
		{"drop mid-body", func(w http.ResponseWriter) {
			w.Header().Set("Content-Range", "bytes 100-4195/70000")
			w.Header().Set("Content-Length", "4096")
			w.WriteHeader(http.StatusPartialContent)
			_, _ = w.Write(make([]byte, 1000))
			panic(http.ErrAbortHandler)
		}},
		{"short chunked body", func(w http.ResponseWriter) {
			w.Header().Set("Content-Range", "bytes 100-4195/70000")
			w.WriteHeader(http.StatusPartialContent)
			_, _ = w.Write(make([]byte, 1000))
		}},
		{"wrong Content-Range", func(w http.ResponseWriter) {
			w.Header().Set("Content-Range", "bytes 0-4095/70000")
			w.WriteHeader(http.StatusPartialContent)
			_, _ = w.Write(make([]byte, 4096))
		}},
		{"partial 200", func(w http.ResponseWriter) {
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(prefix)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeRegistry(t)
			data, dg := f.addBlob(70000)
			prefix = data[:4096]
			f.configure(func() {
				f.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
					if n <= 2 {
						tc.fault(w)
						return true
					}
					return false
				}
			})
			c := testClient(t, nil)
			b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
			p := make([]byte, 4096)
			if _, err := b.ReadAt(p, 100); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, data[100:4196]) {
				t.Fatal("wrong bytes")
			}
			if st := b.Stats(); st.Retries != 2 || st.Requests != 3 {
				t.Fatalf("stats %+v, want 2 retries of 3 requests", st)
			}
		})
	}
}

func TestPersistentFaultsFailWithErrUnavailable(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		fault      func(w http.ResponseWriter, r *http.Request)
	}{
		{"500", "500 Internal Server Error", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "oops", http.StatusInternalServerError)
		}},
		{"wrong Content-Range", "Content-Range", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Range", "bytes 1-4096/70000")
			w.WriteHeader(http.StatusPartialContent)
			_, _ = w.Write(make([]byte, 4096))
		}},
		{"hang", "no answer within the request timeout", func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
		}},
		{"stalled body", "no answer within the request timeout", func(w http.ResponseWriter, r *http.Request) {
			// The range asked for: an attempt after a stall asks only for the bytes not received yet.
			w.Header().Set("Content-Range", strings.Replace(r.Header.Get("Range"), "=", " ", 1)+"/70000")
			w.WriteHeader(http.StatusPartialContent)
			_, _ = w.Write(make([]byte, 10))
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
		}},
		{"429 beyond the budget", "429", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Retry-After", "3600")
			http.Error(w, "slow down", http.StatusTooManyRequests)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeRegistry(t)
			data, dg := f.addBlob(70000)
			f.configure(func() {
				f.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
					tc.fault(w, r)
					return true
				}
			})
			c := testClient(t, func(o *Options) {
				o.RetryBudget = time.Second
				o.RequestTimeout = 300 * time.Millisecond
			})
			b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
			start := time.Now()
			_, err := b.ReadAt(make([]byte, 4096), 0)
			if !errors.Is(err, ErrUnavailable) {
				t.Fatalf("err = %v, want ErrUnavailable", err)
			}
			if elapsed := time.Since(start); elapsed > 10*time.Second {
				t.Fatalf("took %s with a 1s budget", elapsed)
			}
			msg := err.Error()
			t.Log(msg)
			for _, s := range []string{"registry " + f.host(), "repo app", "blob " + dg.String(), "bytes 0-4095", tc.want, "attempt"} {
				if !strings.Contains(msg, s) {
					t.Errorf("error %q does not mention %q", msg, s)
				}
			}
		})
	}
}

func TestDeadRegistryTerminates(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	host := l.Addr().String()
	l.Close() // nothing listens there now: connection refused
	c := testClient(t, func(o *Options) { o.RetryBudget = 2 * time.Second })
	b := mustBlob(t, c, host, "app", digest.FromString("x"), 100)
	start := time.Now()
	_, err = b.ReadAt(make([]byte, 10), 0)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable", err)
	}
	if elapsed := time.Since(start); elapsed > 20*time.Second {
		t.Fatalf("took %s with a 2s budget", elapsed)
	}
	if !strings.Contains(err.Error(), "registry "+host+" repo app blob sha256:") {
		t.Fatalf("error does not say what failed: %v", err)
	}
	if _, err := c.Blob(context.Background(), host, "app", digest.FromString("x"), -1); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("size lookup err = %v, want ErrUnavailable", err)
	}
	if _, _, err := c.Resolve(context.Background(), host, "app", "latest"); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("resolve err = %v, want ErrUnavailable", err)
	}
}

func TestContextCancelStopsRetries(t *testing.T) {
	f := newFakeRegistry(t)
	data, dg := f.addBlob(1000)
	f.configure(func() {
		f.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return true
		}
	})
	c := testClient(t, func(o *Options) { o.RetryBudget = time.Hour })
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err := b.ReadAtContext(ctx, make([]byte, 10), 0)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the context's error", err)
	}
}

func TestFatalStatusesFailAtOnce(t *testing.T) {
	for _, tc := range []struct {
		code int
		kind error
	}{
		{http.StatusNotFound, ErrNotFound},
		{http.StatusForbidden, ErrUnauthorized},
		{http.StatusBadRequest, nil},
		{http.StatusRequestedRangeNotSatisfiable, nil},
	} {
		f := newFakeRegistry(t)
		_, dg := f.addBlob(1000)
		f.configure(func() {
			f.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
				http.Error(w, "no", tc.code)
				return true
			}
		})
		c := testClient(t, func(o *Options) { o.RetryBudget = time.Hour })
		b := mustBlob(t, c, f.host(), "app", dg, 1000)
		_, err := b.ReadAt(make([]byte, 10), 0)
		if err == nil || (tc.kind != nil && !errors.Is(err, tc.kind)) || errors.Is(err, ErrUnavailable) {
			t.Fatalf("%d: err = %v, want %v", tc.code, err, tc.kind)
		}
		if n := f.blobRequests.Load(); n != 1 {
			t.Fatalf("%d: %d requests, want 1", tc.code, n)
		}
	}
}

func TestSizeMismatchIsNotRetried(t *testing.T) {
	f := newFakeRegistry(t)
	data, dg := f.addBlob(1000)
	c := testClient(t, func(o *Options) { o.RetryBudget = time.Hour })
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data))+5) // the caller believes a wrong size
	_, err := b.ReadAt(make([]byte, 10), 0)
	if !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("err = %v, want ErrDigestMismatch", err)
	}
}

func TestWholeBlob200IsSliced(t *testing.T) {
	f := newFakeRegistry(t)
	data, dg := f.addBlob(50000)
	f.configure(func() {
		f.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			w.Header().Set("Content-Length", fmt.Sprint(len(data)))
			_, _ = w.Write(data)
			return true
		}
	})
	c := testClient(t, nil)
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	p := make([]byte, 1000)
	if _, err := b.ReadAt(p, 30000); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, data[30000:31000]) {
		t.Fatal("wrong bytes from a 200 answer")
	}
}

// redirectTarget is a second server (a stand-in for S3/CDN) that serves the fake registry's blobs and records
// whether it ever saw an Authorization header.
type redirectTarget struct {
	srv       *httptest.Server
	requests  atomic.Int64
	sawAuth   atomic.Bool
	forbidden atomic.Bool // answer 403 (an expired signed URL)
}

func newRedirectTarget(t *testing.T, f *fakeRegistry) *redirectTarget {
	rt := &redirectTarget{}
	rt.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rt.requests.Add(1)
		if r.Header.Get("Authorization") != "" {
			rt.sawAuth.Store(true)
		}
		if rt.forbidden.Load() {
			http.Error(w, "<Error>Request has expired</Error>", http.StatusForbidden)
			return
		}
		f.serveBlobData(w, r, digest.Digest(strings.TrimPrefix(r.URL.Path, "/blobdata/")))
	}))
	t.Cleanup(rt.srv.Close)
	return rt
}

func TestRedirectToOtherHost(t *testing.T) {
	f := newFakeRegistry(t)
	f.configure(func() { f.authMode, f.user, f.pass = "bearer", "alice", "secret" })
	data, dg := f.addBlob(100000)
	rt := newRedirectTarget(t, f)
	f.configure(func() { f.redirect = &rt.srv.URL })
	c := testClient(t, func(o *Options) { o.Credentials = StaticCredentials("alice", "secret") })
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	read := func(off int64) {
		t.Helper()
		p := make([]byte, 5000)
		if _, err := b.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, data[off:off+5000]) {
			t.Fatalf("wrong bytes at %d", off)
		}
	}
	read(0)
	read(7000)
	read(20000)
	if rt.sawAuth.Load() {
		t.Fatal("the registry's Authorization header leaked to the redirect target")
	}
	if n := f.blobRequests.Load(); n != 1 {
		t.Fatalf("registry saw %d blob requests; the redirect target should be cached after the first", n)
	}
	if n := rt.requests.Load(); n != 3 {
		t.Fatalf("redirect target saw %d requests, want 3", n)
	}
	// The signed URL expires: the client goes back to the registry, which redirects again.
	rt.forbidden.Store(true)
	f.configure(func() { f.redirect = nil })
	read(30000)
	if n := f.blobRequests.Load(); n != 2 {
		t.Fatalf("registry saw %d blob requests after the cached location failed, want 2", n)
	}
}

func TestRedirectRelative(t *testing.T) {
	f := newFakeRegistry(t)
	f.configure(func() { f.authMode, f.user, f.pass = "basic", "bob", "pw" })
	data, dg := f.addBlob(10000)
	empty := ""
	f.configure(func() { f.redirect = &empty })
	c := testClient(t, func(o *Options) { o.Credentials = StaticCredentials("bob", "pw") })
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	for range 2 {
		p := make([]byte, 100)
		if _, err := b.ReadAt(p, 50); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, data[50:150]) {
			t.Fatal("wrong bytes")
		}
	}
	// Same host: nothing is cached, every read asks the registry (with its credentials).
	if n := f.blobRequests.Load(); n != 2 {
		t.Fatalf("registry saw %d blob requests, want 2", n)
	}
}

func TestBearerTokenRotation(t *testing.T) {
	f := newFakeRegistry(t)
	f.configure(func() { f.authMode, f.user, f.pass = "bearer", "alice", "pw1" })
	data, dg := f.addBlob(10000)
	var pass atomic.Value
	pass.Store("pw1")
	var asked atomic.Int64
	creds := func(ctx context.Context, host string) (string, string, error) {
		asked.Add(1)
		if host != f.host() {
			return "", "", fmt.Errorf("asked for unexpected host %q", host)
		}
		return "alice", pass.Load().(string), nil
	}
	c := testClient(t, func(o *Options) { o.Credentials = creds })
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	read := func() error {
		p := make([]byte, 100)
		_, err := b.ReadAt(p, 0)
		if err == nil && !bytes.Equal(p, data[:100]) {
			t.Fatal("wrong bytes")
		}
		return err
	}
	if err := read(); err != nil {
		t.Fatal(err)
	}
	if err := read(); err != nil {
		t.Fatal(err)
	}
	if n := f.tokenRequests.Load(); n != 1 {
		t.Fatalf("%d token requests for two reads, want 1 (cached)", n)
	}
	// Tokens revoked: the cached token gets 401, the client drops it and asks again.
	f.rotate("pw1")
	if err := read(); err != nil {
		t.Fatal(err)
	}
	if n := f.tokenRequests.Load(); n != 2 {
		t.Fatalf("%d token requests, want 2", n)
	}
	// The password changes; the CredentialFunc learns the new one without a restart.
	f.rotate("pw2")
	pass.Store("pw2")
	before := asked.Load()
	if err := read(); err != nil {
		t.Fatal(err)
	}
	if asked.Load() == before {
		t.Fatal("the CredentialFunc was not asked again after a 401")
	}
	// A wrong password is an auth error that says what to do, and is not retried.
	f.rotate("pw3")
	err := read()
	if !errors.Is(err, ErrUnauthorized) || errors.Is(err, ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnauthorized", err)
	}
	t.Log(err)
	if !strings.Contains(err.Error(), "check credentials for "+f.host()) {
		t.Fatalf("error gives no hint: %v", err)
	}
}

func TestBasicAuthRotation(t *testing.T) {
	f := newFakeRegistry(t)
	f.configure(func() { f.authMode, f.user, f.pass = "basic", "bob", "pw1" })
	data, dg := f.addBlob(10000)
	var pass atomic.Value
	pass.Store("pw1")
	c := testClient(t, func(o *Options) {
		o.Credentials = func(ctx context.Context, host string) (string, string, error) {
			return "bob", pass.Load().(string), nil
		}
		o.CredentialSource = "/etc/obd/credentials.json"
	})
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	if _, err := b.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
	f.rotate("pw2")
	pass.Store("pw2")
	if _, err := b.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
	f.rotate("pw3")
	_, err := b.ReadAt(make([]byte, 10), 0)
	if !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("err = %v, want ErrUnauthorized", err)
	}
	want := fmt.Sprintf("check credentials for %s in /etc/obd/credentials.json or run 'obd login %s'", f.host(), f.host())
	if !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q lacks hint %q", err, want)
	}
}

func TestAnonymousBearer(t *testing.T) {
	f := newFakeRegistry(t)
	f.configure(func() { f.authMode = "bearer" }) // anonymous tokens: the token endpoint accepts no credentials
	data, dg := f.addBlob(1000)
	c := testClient(t, nil)
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	if _, err := b.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
}

func TestIdentityToken(t *testing.T) {
	f := newFakeRegistry(t)
	f.configure(func() { f.authMode, f.user, f.pass, f.refresh = "bearer", "nobody", "unused", "refresh-xyz" })
	data, dg := f.addBlob(1000)
	c := testClient(t, func(o *Options) { o.Credentials = StaticCredentials(identityTokenUser, "refresh-xyz") })
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	if _, err := b.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
}

func TestMirrors(t *testing.T) {
	origin := newFakeRegistry(t)
	data, dg := origin.addBlob(20000)
	good := newFakeRegistry(t)
	good.configure(func() { good.blobs[dg] = data })
	bad := newFakeRegistry(t)
	bad.configure(func() {
		bad.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			http.Error(w, "down", http.StatusBadGateway)
			return true
		}
	})
	missing := newFakeRegistry(t) // answers 404: it does not have the blob

	c := testClient(t, func(o *Options) { o.Mirrors = []string{bad.host(), missing.host(), good.host()} })
	b := mustBlob(t, c, origin.host(), "app", dg, int64(len(data)))
	for range 3 {
		p := make([]byte, 1000)
		if _, err := b.ReadAt(p, 500); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, data[500:1500]) {
			t.Fatal("wrong bytes")
		}
	}
	if origin.blobRequests.Load() != 0 || good.blobRequests.Load() != 3 {
		t.Fatalf("origin %d, good mirror %d requests", origin.blobRequests.Load(), good.blobRequests.Load())
	}
	if bad.blobRequests.Load() != 1 || missing.blobRequests.Load() != 1 {
		t.Fatalf("failed mirrors were not skipped: bad %d, missing %d", bad.blobRequests.Load(), missing.blobRequests.Load())
	}
	// No mirror has it: the origin serves.
	c2 := testClient(t, func(o *Options) { o.Mirrors = []string{missing.host()} })
	b2 := mustBlob(t, c2, origin.host(), "app", dg, int64(len(data)))
	if _, err := b2.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
	if origin.blobRequests.Load() != 1 {
		t.Fatalf("origin saw %d requests, want 1", origin.blobRequests.Load())
	}
}

func TestFetchBlob(t *testing.T) {
	f := newFakeRegistry(t)
	data, dg := f.addBlob(300000)
	c := testClient(t, nil)
	desc := ocispec.Descriptor{Digest: dg, Size: int64(len(data))}
	rc, err := c.FetchBlob(context.Background(), f.host(), "app", desc)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("FetchBlob: %d bytes, %v", len(got), err)
	}

	// The connection drops mid-body twice; the stream resumes where it stopped.
	f.configure(func() {
		f.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			if n > 2 {
				return false
			}
			w.Header().Set("Content-Length", fmt.Sprint(len(data)))
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(data[:100000])
			panic(http.ErrAbortHandler)
		}
	})
	f.configure(func() { f.ranges = nil })
	rc, err = c.FetchBlob(context.Background(), f.host(), "app", desc)
	if err != nil {
		t.Fatal(err)
	}
	got, err = io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("FetchBlob after drops: %d bytes, %v", len(got), err)
	}
	f.configure(func() {
		if last := f.ranges[len(f.ranges)-1]; !strings.HasPrefix(last, "bytes=") || last == "bytes=0-" {
			t.Errorf("the download did not resume with a range: %q", f.ranges)
		}
	})

	// Wrong bytes: the stream fails at the end instead of returning io.EOF.
	f.configure(func() {
		f.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			bad := bytes.Clone(data)
			bad[12345] ^= 1
			_, _ = w.Write(bad)
			return true
		}
	})
	rc, err = c.FetchBlob(context.Background(), f.host(), "app", desc)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(rc)
	rc.Close()
	if !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("err = %v, want ErrDigestMismatch", err)
	}

	// Too many bytes.
	f.configure(func() {
		f.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			_, _ = w.Write(append(bytes.Clone(data), 1, 2, 3))
			return true
		}
	})
	rc, err = c.FetchBlob(context.Background(), f.host(), "app", desc)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(rc)
	rc.Close()
	if !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("err = %v, want ErrDigestMismatch", err)
	}

	// Not there.
	f.configure(func() { f.blobHook = nil })
	if _, err := c.FetchBlob(context.Background(), f.host(), "app", ocispec.Descriptor{Digest: digest.FromString("nope"), Size: 4}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
}

func TestResolve(t *testing.T) {
	f := newFakeRegistry(t)
	f.configure(func() { f.authMode, f.user, f.pass = "bearer", "u", "p" })
	manifest := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}`)
	index := []byte(`{"schemaVersion":2,"manifests":[]}`)
	docker := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{}}`)
	f.configure(func() {
		f.manifests["v1"] = fakeManifest{mediaType: ocispec.MediaTypeImageManifest, data: manifest}
		f.manifests[digest.FromBytes(manifest).String()] = fakeManifest{mediaType: ocispec.MediaTypeImageManifest, data: manifest}
		f.manifests["multi"] = fakeManifest{mediaType: "application/json", data: index, noDigest: true}
		f.manifests["docker"] = fakeManifest{mediaType: MediaTypeDockerManifest + "; charset=utf-8", data: docker}
		f.manifests["liar"] = fakeManifest{mediaType: ocispec.MediaTypeImageManifest, data: manifest}
		f.manifests[digest.FromBytes(index).String()] = fakeManifest{mediaType: ocispec.MediaTypeImageIndex, data: manifest} // wrong bytes for the digest
		f.manifests["schema1"] = fakeManifest{mediaType: "application/vnd.docker.distribution.manifest.v1+prettyjws", data: []byte(`{"schemaVersion":1,"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}`)}
	})
	c := testClient(t, func(o *Options) { o.Credentials = StaticCredentials("u", "p") })
	ctx := context.Background()
	for _, tc := range []struct {
		ref, mediaType string
		data           []byte
	}{
		{"v1", ocispec.MediaTypeImageManifest, manifest},
		{digest.FromBytes(manifest).String(), ocispec.MediaTypeImageManifest, manifest},
		{"multi", ocispec.MediaTypeImageIndex, index},
		{"docker", MediaTypeDockerManifest, docker},
	} {
		desc, b, err := c.Resolve(ctx, f.host(), "app", tc.ref)
		if err != nil {
			t.Fatalf("%s: %v", tc.ref, err)
		}
		if desc.MediaType != tc.mediaType || desc.Digest != digest.FromBytes(tc.data) || desc.Size != int64(len(tc.data)) || !bytes.Equal(b, tc.data) {
			t.Fatalf("%s: got %+v", tc.ref, desc)
		}
	}
	if _, _, err := c.Resolve(ctx, f.host(), "app", digest.FromBytes(index).String()); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("wrong bytes for a digest: err = %v", err)
	}
	if _, _, err := c.Resolve(ctx, f.host(), "app", "missing"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing tag: err = %v", err)
	}
	if _, _, err := c.Resolve(ctx, f.host(), "app", "schema1"); err == nil || !strings.Contains(err.Error(), "unsupported") {
		t.Fatalf("schema1: err = %v", err)
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Duration{
		"":                              0,
		"3":                             3 * time.Second,
		"-1":                            0,
		"soon":                          0,
		"Wed, 01 Jan 2025 00:00:10 GMT": 10 * time.Second,
		"Tue, 31 Dec 2024 00:00:10 GMT": 0,
	} {
		if got := parseRetryAfter(in, now); got != want {
			t.Errorf("parseRetryAfter(%q) = %s, want %s", in, got, want)
		}
	}
}

// Once a read of a blob has spent its retry budget, later reads fail at once (the kernel retries a failed read
// in smaller pieces, each of which would wait a whole budget again) — except one probe attempt every
// ProbeInterval, which revives the blob when the registry answers again.
func TestDeadBlobFailsFastUntilAProbeGetsThrough(t *testing.T) {
	f := newFakeRegistry(t)
	data, dg := f.addBlob(1 << 16)
	var down atomic.Bool
	down.Store(true)
	f.configure(func() {
		f.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			if down.Load() {
				http.Error(w, "down", http.StatusServiceUnavailable)
				return true
			}
			return false
		}
	})
	c := testClient(t, func(o *Options) { o.RetryBudget = time.Second })
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	buf := make([]byte, 4096)
	if _, err := b.ReadAt(buf, 0); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("first read: %v, want ErrUnavailable", err)
	}
	before := f.blobRequests.Load()
	for i := range 5 {
		_, err := b.ReadAt(buf, int64(i)*512)
		if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "failing at once") {
			t.Fatalf("read %d of a dead blob: %v, want an immediate ErrUnavailable", i, err)
		}
	}
	if n := f.blobRequests.Load() - before; n != 0 {
		t.Fatalf("reads of a dead blob sent %d requests within the probe interval", n)
	}
	time.Sleep(ProbeInterval)
	if _, err := b.ReadAt(buf, 0); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("probe of a still dead blob: %v", err)
	}
	if n := f.blobRequests.Load() - before; n != 1 {
		t.Fatalf("a probe sent %d requests, want 1 (no retries)", n)
	}
	down.Store(false)
	time.Sleep(ProbeInterval)
	if _, err := b.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, data[:len(buf)]) {
		t.Fatalf("probe after recovery: %v", err)
	}
	if _, err := b.ReadAt(buf, 8192); err != nil || !bytes.Equal(buf, data[8192:8192+len(buf)]) {
		t.Fatalf("read of a revived blob: %v", err)
	}
}

// A range read reports its progress as bytes arrive, and an attempt after a body that broke off asks only for
// the bytes not received yet.
func TestReadResumesAndReportsProgress(t *testing.T) {
	f := newFakeRegistry(t)
	data, dg := f.addBlob(70000)
	var ranges []string
	f.configure(func() {
		f.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			ranges = append(ranges, r.Header.Get("Range"))
			if n > 1 {
				return false
			}
			w.Header().Set("Content-Range", "bytes 100-4195/70000")
			w.Header().Set("Content-Length", "4096")
			w.WriteHeader(http.StatusPartialContent)
			_, _ = w.Write(data[100:1100])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		}
	})
	c := testClient(t, nil)
	b := mustBlob(t, c, f.host(), "app", dg, int64(len(data)))
	p := make([]byte, 4096)
	var seen []int
	if _, err := b.ReadAtProgress(p, 100, func(n int) { seen = append(seen, n) }); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, data[100:4196]) {
		t.Fatal("wrong bytes")
	}
	if len(ranges) != 2 || ranges[0] != "bytes=100-4195" || ranges[1] != "bytes=1100-4195" {
		t.Fatalf("ranges asked for: %q; want the whole range, then the rest after byte 1000", ranges)
	}
	if len(seen) == 0 || seen[len(seen)-1] != 4096 || !slices.IsSorted(seen) {
		t.Fatalf("progress %v: want growing counts ending at 4096", seen)
	}
}
