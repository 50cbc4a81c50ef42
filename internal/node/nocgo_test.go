package node

import (
	"os/exec"
	"strings"
	"testing"
)

// The node daemon links no package of this module that uses cgo: the converter's C libraries (libext2fs, ISA-L,
// liblz4) stay in the converter, and obd-snapshotter stays a binary that runs anywhere Linux runs.
func TestDaemonLinksNoCgo(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{if .CgoFiles}}{{.ImportPath}}{{end}}", "../../cmd/obd-snapshotter").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, p := range strings.Fields(string(out)) {
		if strings.HasPrefix(p, "github.com/obdproject/obd/") {
			t.Errorf("obd-snapshotter imports %s, which uses cgo", p)
		}
	}
}
