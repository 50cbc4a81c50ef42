// Package testenv lets tests that need system tools or root skip where those are missing — except when
// OBD_REQUIRE_SYSTEM_TESTS=1 (set by CI), where a missing requirement fails the test instead of hiding it.
package testenv

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// Required reports whether system tests are mandatory in this run.
func Required() bool { return os.Getenv("OBD_REQUIRE_SYSTEM_TESTS") == "1" }

// Skip skips the test with reason, or fails it when system tests are mandatory.
func Skip(t testing.TB, reason string) {
	t.Helper()
	if Required() {
		t.Fatalf("system test cannot run: %s (OBD_REQUIRE_SYSTEM_TESTS=1 makes this a failure)", reason)
	}
	t.Skipf("skipping: %s (set up the machine with 'make deps')", reason)
}

// Tools returns the paths of the named programs, skipping the test if any is missing.
func Tools(t testing.TB, names ...string) []string {
	t.Helper()
	paths := make([]string, len(names))
	for i, n := range names {
		p, err := exec.LookPath(n)
		if err != nil {
			// e2fsprogs installs into /sbin, which is not on every user's PATH.
			for _, dir := range []string{"/usr/sbin", "/sbin"} {
				if _, serr := os.Stat(dir + "/" + n); serr == nil {
					p, err = dir+"/"+n, nil
					break
				}
			}
		}
		if err != nil {
			Skip(t, n+" is not installed")
		}
		paths[i] = p
	}
	return paths
}

// Root skips the test unless it runs as root.
func Root(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "needs root")
	}
}

// Buffer is a bytes.Buffer safe for concurrent writers, e.g. a log that goroutines write to while a test reads it.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Registry runs Debian's docker-registry (distribution 2.8) on a free loopback port with storage in a temporary
// directory; given htpasswd file content it requires basic authentication. It returns host:port; the process is
// killed when the test ends.
func Registry(t testing.TB, htpasswd string) string {
	t.Helper()
	bin := Tools(t, "docker-registry")[0]
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	auth := ""
	if htpasswd != "" {
		p := filepath.Join(dir, "htpasswd")
		if err := os.WriteFile(p, []byte(htpasswd), 0o600); err != nil {
			t.Fatal(err)
		}
		auth = fmt.Sprintf("auth:\n  htpasswd:\n    realm: obd-test\n    path: %s\n", p)
	}
	cfg := fmt.Sprintf("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\n  maintenance:\n    uploadpurging:\n      enabled: false\n%shttp:\n  addr: %s\n",
		filepath.Join(dir, "data"), auth, addr)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	cmd := exec.Command(bin, "serve", cfgPath)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("docker-registry output:\n%s", logs.String())
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
				return addr
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("docker-registry did not come up on %s: %v\n%s", addr, err, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Fsck runs `e2fsck -fn` on the filesystem image img and fails the test unless it is clean.
func Fsck(t testing.TB, img string) {
	t.Helper()
	out, err := exec.Command(Tools(t, "e2fsck")[0], "-fn", img).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn: %v\n%s", err, out)
	}
}

// Debugfs runs one debugfs request on the filesystem image img and returns its output without the version banner.
func Debugfs(t testing.TB, img, request string) string {
	t.Helper()
	out, err := exec.Command(Tools(t, "debugfs")[0], "-R", request, img).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs -R %q: %v\n%s", request, err, out)
	}
	s := string(out)
	if first, rest, ok := strings.Cut(s, "\n"); ok && strings.HasPrefix(first, "debugfs ") {
		s = rest
	}
	return s
}

// TarGzFile returns the regular file called name (a leading "./" ignored) in the gzip'd tar archive at path,
// failing the test when it is missing or empty.
func TarGzFile(t testing.TB, path, name string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("%s: no file %s in the archive: %v", path, name, err)
		}
		if strings.TrimPrefix(h.Name, "./") != name || h.Typeflag != tar.TypeReg {
			continue
		}
		b, err := io.ReadAll(tr)
		if err != nil || len(b) == 0 {
			t.Fatalf("%s: reading %s: %d bytes, %v", path, name, len(b), err)
		}
		return b
	}
}

// ServeUnix serves h on a new unix socket at path until the test ends.
func ServeUnix(t testing.TB, path string, h http.Handler) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(l)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
}

// SocketDir returns a new private directory with a short path, for unix sockets (whose paths are limited to 108
// bytes, which t.TempDir can exceed), removed when the test ends.
func SocketDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "obd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// UnmountUnder unmounts (lazily) everything mounted at or below dir, deepest first, reporting failures as errors.
func UnmountUnder(t testing.TB, dir string) {
	t.Helper()
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Errorf("list mounts under %s: %v", dir, err)
		return
	}
	slices.SortFunc(infos, func(a, b *mountinfo.Info) int { return len(b.Mountpoint) - len(a.Mountpoint) })
	for _, m := range infos {
		if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", m.Mountpoint, err)
		}
	}
}

// WaitSocket waits until something serves the unix socket address, failing the test if the server exits first
// (an error or nil on exited) or nothing serves it within 20 s.
func WaitSocket(t testing.TB, address string, exited <-chan error) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", address); err == nil {
			c.Close()
			return
		}
		select {
		case err := <-exited:
			t.Fatalf("server of %s exited: %v", address, err)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing serves %s", address)
		}
	}
}

// Within runs f and fails the test if it does not return within d: a hang shows up as a failure instead of a stuck
// test binary (the stuck goroutine is left behind in that case only).
func Within(t testing.TB, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not return within %v", what, d)
	}
}

// BasicAuthRegistry serves a registry API root (/v2/) that accepts one user and password with basic auth, until
// the test ends, and returns its host:port.
func BasicAuthRegistry(t testing.TB, user, pass string) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v2/" {
			http.NotFound(w, r)
			return
		}
		if u, p, ok := r.BasicAuth(); !ok || u != user || p != pass {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`, http.StatusUnauthorized)
			return
		}
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}
