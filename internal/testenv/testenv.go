// Package testenv lets tests that need system tools or root skip where those are missing — except when
// OBD_REQUIRE_SYSTEM_TESTS=1 (set by CI), where a missing requirement fails the test instead of hiding it.
package testenv

import (
	"bytes"
	"os"
	"os/exec"
	"sync"
	"testing"
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
