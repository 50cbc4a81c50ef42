package pull

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestConnectMissingSocket(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "containerd.sock")
	for _, addr := range []string{missing, "unix://" + missing} {
		if _, err := Connect(addr); err == nil || !strings.Contains(err.Error(), "connect to containerd at "+addr) || !strings.Contains(err.Error(), "is containerd running?") {
			t.Errorf("Connect(%s): %v", addr, err)
		}
	}
}
