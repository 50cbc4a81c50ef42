package health

import (
	"strings"
	"testing"
)

func TestWriteText(t *testing.T) {
	results := []Result{
		{Check: "kernel", Level: OK, Message: "fuse, loop", Details: []string{"/dev/fuse"}},
		{Check: "cache", Level: Warn, Message: "low space", Fix: "free space"},
		{Check: "snapshotter", Level: Fail, Message: "down", Fix: "start it"},
		{Check: "devices", Level: Skip, Message: "no daemon", Fix: "not shown"},
	}
	var b strings.Builder
	WriteText(&b, results, false)
	out := b.String()
	for _, want := range []string{"fix: free space", "fix: start it", "\n1 ok, 1 warnings, 1 failed, 1 skipped\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("WriteText wrote\n%s\nwithout %q", out, want)
		}
	}
	for _, unwanted := range []string{"not shown", "/dev/fuse"} {
		if strings.Contains(out, unwanted) {
			t.Errorf("WriteText wrote %q:\n%s", unwanted, out)
		}
	}
	b.Reset()
	WriteText(&b, results[:1], true)
	if out := b.String(); !strings.Contains(out, "· /dev/fuse") || !strings.HasSuffix(out, "\n1 ok, 0 warnings, 0 failed\n") {
		t.Errorf("verbose: %q", out)
	}
	if n := Count(results, Fail); n != 1 {
		t.Errorf("Count(Fail) = %d", n)
	}
}
