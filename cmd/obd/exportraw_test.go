package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/obdproject/obd/internal/testenv"
)

// e2fsckAllowed are the lines `e2fsck -fn` may print for a sound filesystem, plus (knownUpstreamProblem) the one
// problem that upstream's converter leaves in the hello-world image.
var e2fsckAllowed = []*regexp.Regexp{
	regexp.MustCompile(`^$`),
	regexp.MustCompile(`^e2fsck \d+\.\d+(\.\d+)? \(.*\)$`),
	regexp.MustCompile(`^Pass [1-5][A-E]?: [A-Za-z ,]+$`),
	regexp.MustCompile(`^\S+: \d+/\d+ files \([0-9.]+% non-contiguous\), \d+/\d+ blocks$`),
}

// knownUpstreamProblem is what e2fsck says about the disk of testdata/upstream/hello-world-oci:amd64-converted.
// The problem is in upstream's bytes, not in obd's reading of them: an independent decoder of the blob gives the
// identical disk. e2fsck then also prints the "still has errors" warning.
var knownUpstreamProblem = []*regexp.Regexp{
	regexp.MustCompile(`^Problem in HTREE directory inode 11: block #2 not referenced$`),
	regexp.MustCompile(`^Invalid HTREE directory inode 11 \(/lost\+found\)\.\s+Clear HTree index\? no$`),
	regexp.MustCompile(`^\S+: \*+ WARNING: Filesystem still has errors \*+$`),
}

// e2fsck runs `e2fsck -fn` on disk and fails the test on any problem other than the allowed ones. It returns
// whether one of the allowed problems was reported.
func e2fsck(t *testing.T, disk string, allowed ...*regexp.Regexp) (problems bool) {
	t.Helper()
	bin := testenv.Tools(t, "e2fsck")[0]
	out, err := exec.Command(bin, "-fn", disk).CombinedOutput()
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("e2fsck: %v", err)
		}
		code = ee.ExitCode()
	}
	for line := range strings.Lines(string(out)) {
		line = strings.TrimRight(line, "\n")
		ok := false
		for _, re := range e2fsckAllowed {
			ok = ok || re.MatchString(line)
		}
		for _, re := range allowed {
			if re.MatchString(line) {
				ok, problems = true, true
			}
		}
		if !ok {
			t.Errorf("e2fsck -fn %s reports a problem: %q", disk, line)
		}
	}
	// 0: clean. 4: errors left uncorrected (-n), allowed only with the known problem. Anything else (8: operational
	// error, …) is a failure.
	if code != 0 && !(code == 4 && problems) {
		t.Errorf("e2fsck -fn %s exited %d:\n%s", disk, code, out)
	}
	if t.Failed() {
		t.Logf("e2fsck output:\n%s", out)
	}
	return problems
}

// allocatedBytes returns the bytes of disk space allocated to path.
func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestExportRawUpstreamImage(t *testing.T) {
	debugfs := testenv.Tools(t, "debugfs")[0]
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.img")
	out := mustObd(t, "export-raw", "oci:"+helloLayout+":amd64-converted", disk)
	if !strings.Contains(out, "wrote "+disk) || !strings.Contains(out, "64.0 GiB") {
		t.Errorf("export-raw output: %q", out)
	}

	st, err := os.Stat(disk)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != 64<<30 {
		t.Errorf("disk has %d bytes, want the virtual size 64 GiB", st.Size())
	}
	// The layer holds 71507968 data bytes (inspect), most of them zeros written by mkfs; holes must stay holes.
	if a := allocatedBytes(t, disk); a > 80<<20 {
		t.Errorf("disk is not sparse: %d bytes allocated for %d of data", a, upstreamBlobInfo.LSMT.DataBytes)
	} else {
		t.Logf("export-raw: %d bytes allocated of a %d-byte disk", a, st.Size())
	}
	if names := dirNames(t, dir); len(names) != 1 {
		t.Errorf("export-raw left files beside its output: %v", names)
	}

	// The problem e2fsck reports on this image is upstream's (see knownUpstreamProblem); any other one is ours.
	if !e2fsck(t, disk, knownUpstreamProblem...) {
		t.Log("e2fsck no longer reports the known problem of upstream's image")
	}

	dumped := filepath.Join(dir, "hello")
	if dout, err := exec.Command(debugfs, "-R", "dump /hello "+dumped, disk).CombinedOutput(); err != nil {
		t.Fatalf("debugfs: %v\n%s", err, dout)
	}
	got, err := os.ReadFile(dumped)
	if err != nil {
		t.Fatalf("debugfs did not extract /hello: %v", err)
	}
	if want := helloBinary(t); !bytes.Equal(got, want) {
		t.Errorf("/hello on the exported disk: %d bytes, differs from the %d bytes of the original layer", len(got), len(want))
	}
}

func TestExportRawFailures(t *testing.T) {
	canceled, cancel := context.WithCancel(t.Context())
	cancel()
	tests := []struct {
		name    string
		ctx     context.Context
		image   string
		wantErr string
	}{
		{"missing layout", t.Context(), "oci:" + filepath.Join(t.TempDir(), "nope") + ":x", "nope"},
		{"missing tag", t.Context(), "oci:" + helloLayout + ":no-such-tag", "no-such-tag"},
		{"not overlaybd", t.Context(), "oci:" + helloLayout + ":amd64", "overlaybd"},
		{"bad reference", t.Context(), "", "empty image reference"},
		{"canceled", canceled, "oci:" + helloLayout + ":amd64-converted", "context canceled"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			disk := filepath.Join(dir, "disk.img")
			_, _, err := obdContext(tc.ctx, "export-raw", tc.image, disk)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("export-raw %q: error %v, want one saying %q", tc.image, err, tc.wantErr)
			}
			if names := dirNames(t, dir); len(names) != 0 {
				t.Errorf("a failed export-raw left files: %v", names)
			}
		})
	}
}
