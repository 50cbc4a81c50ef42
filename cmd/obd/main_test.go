package main

import (
	"bytes"
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/testenv"
)

// Fixtures of the repository (see testdata/upstream/README.md).
var (
	helloLayout = filepath.Join("..", "..", "testdata", "upstream", "hello-world-oci")
	// upstreamBlob is the overlaybd layer blob of tag amd64-converted, made by upstream's converter.
	upstreamBlob = filepath.Join(helloLayout, "blobs", "sha256", "022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d")
	// helloLayerBlob is the gzip tar layer of tag amd64, the original hello-world image.
	helloLayerBlob = filepath.Join(helloLayout, "blobs", "sha256", "719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6")
)

// obd runs the obd command line in-process with args and returns what it printed on stdout and stderr.
func obd(t testing.TB, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	return obdContext(t.Context(), args...)
}

// obdContext is obd with a context of the caller's.
func obdContext(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	var out, errOut bytes.Buffer
	root := newRootCmd()
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetIn(strings.NewReader(""))
	err = root.ExecuteContext(ctx)
	return out.String(), errOut.String(), err
}

// mustObd runs obd and fails the test if it fails.
func mustObd(t testing.TB, args ...string) string {
	t.Helper()
	stdout, stderr, err := obd(t, args...)
	if err != nil {
		t.Fatalf("obd %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, stdout, stderr)
	}
	return stdout
}

// helloBinary returns the file /hello of the original hello-world layer (a gzip tar).
func helloBinary(t testing.TB) []byte { return testenv.TarGzFile(t, helloLayerBlob, "hello") }

// copyTree copies the directory src to dst, with writable copies of its files.
func copyTree(t testing.TB, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// dirNames lists the names in dir.
func dirNames(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	names := make([]string, len(ents))
	for i, e := range ents {
		names[i] = e.Name()
	}
	return names
}

// readFile reads path or fails the test.
func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
