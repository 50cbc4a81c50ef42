package ext4

import (
	"errors"
	"syscall"
	"testing"
)

func TestRealpath(t *testing.T) {
	f, _, _ := newTestFS(t, 64<<20)
	defer f.Close()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(f.Mkdir("/p", meta(0o755, 0, 0)))
	must(f.Mkdir("/p/q", meta(0o755, 0, 0)))
	must(f.Symlink("/x", "p/q", meta(0o777, 0, 0)))
	must(f.Symlink("/p/q/rel", "../z", meta(0o777, 0, 0)))
	must(f.Symlink("/abs", "/missing/dir", meta(0o777, 0, 0)))
	must(f.Symlink("/up", "../../../p", meta(0o777, 0, 0)))
	must(f.Symlink("/loop", "loop", meta(0o777, 0, 0)))
	for p, want := range map[string]string{
		"/":              "/",
		"/p/q":           "/p/q",
		"/x":             "/p/q",
		"/x/rel":         "/p/z",
		"/x/rel/a/b":     "/p/z/a/b",
		"/abs":           "/missing/dir",
		"/abs/c":         "/missing/dir/c",
		"/up/q":          "/p/q",
		"/nothing/there": "/nothing/there",
	} {
		if got, err := f.Realpath(p); got != want || err != nil {
			t.Errorf("Realpath(%s) = %q, %v; want %q", p, got, err, want)
		}
	}
	if _, err := f.Realpath("/loop/a"); !errors.Is(err, syscall.ELOOP) {
		t.Errorf("symlink loop: %v", err)
	}
}
