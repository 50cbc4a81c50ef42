package main

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
)

func TestPullWithoutContainerd(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir()) // no credentials of the machine's user
	dir := t.TempDir()
	// A socket file nobody listens on any more (containerd died): the listener is closed right away.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()

	tests := []struct {
		name    string
		address string
		want    []string
	}{
		{"missing socket", filepath.Join(dir, "containerd.sock"), []string{"no such file", "is containerd running"}},
		{"missing socket as URL", "unix://" + filepath.Join(dir, "containerd.sock"), []string{"no such file", "is containerd running"}},
		{"stale socket", stale, []string{"connection refused"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, _, err := obd(t, "pull", "--address", tc.address, "127.0.0.1:1/app:v1")
			if err == nil {
				t.Fatalf("pull without containerd succeeded:\n%s", out)
			}
			sock := strings.TrimPrefix(tc.address, "unix://")
			if !strings.Contains(err.Error(), sock) {
				t.Errorf("pull error %q does not name the socket %s", err, sock)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("pull error %q, want it to say %q", err, w)
				}
			}
		})
	}
}
