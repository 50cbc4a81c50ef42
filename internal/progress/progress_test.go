package progress

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestTerminal(t *testing.T) {
	var b strings.Builder
	if Terminal(&b) != nil {
		t.Error("a strings.Builder is a terminal")
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if Terminal(f) != nil {
		t.Error("a regular file is a terminal")
	}
	if Bar(nil) != nil || Count(nil, "x") != nil {
		t.Error("callbacks without a terminal")
	}
}

func TestBar(t *testing.T) {
	var b strings.Builder
	bar := Bar(&b)
	bar(0, 0) // no total: nothing
	bar(1<<20, 4<<20)
	bar(2<<20, 4<<20) // too soon after the last: skipped
	bar(4<<20, 4<<20)
	out := b.String()
	if !strings.Contains(out, "\rdownload [#######.......................]  25% 1.0 MiB of 4.0 MiB") || strings.Contains(out, " 50%") {
		t.Errorf("bar drew %q", out)
	}
	if !strings.Contains(out, "\rdownload [##############################] 100% 4.0 MiB of 4.0 MiB") || !strings.HasSuffix(out, "\n") {
		t.Errorf("bar drew %q", out)
	}
}

func TestCount(t *testing.T) {
	var b strings.Builder
	c := Count(&b, "export")
	c(1, 2) // within the first second: skipped
	c(2<<20, 2<<20)
	if got := b.String(); got != "\rexport: 2.0 MiB of 2.0 MiB\n" {
		t.Errorf("count wrote %q", got)
	}
}
