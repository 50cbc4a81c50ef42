package demo

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "obd-snapshotter")
	_, err := Check(missing)
	want := missing + " is missing"
	if os.Geteuid() != 0 {
		want = "run it as root"
	}
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("Check(%s): %v, want %q", missing, err, want)
	}
}
