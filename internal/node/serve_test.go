package node

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/testenv"
)

func TestListenRefusesLiveSocket(t *testing.T) {
	dir := testenv.SocketDir(t)
	address := filepath.Join(dir, "s.sock")
	l, err := listen(address)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := listen(address); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Errorf("listen on a served socket: %v", err)
	}
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := listen(file); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("listen on a regular file: %v", err)
	}
}
