package testimage

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/obdproject/obd/internal/testenv"
)

// BuildForTest builds spec into a layout under t.TempDir() with the default .deb cache. It skips the test (fails it
// with OBD_REQUIRE_SYSTEM_TESTS=1) when apt cannot deliver the packages.
func BuildForTest(t testing.TB, spec Spec) *Image {
	t.Helper()
	im, err := Build(context.Background(), spec, filepath.Join(t.TempDir(), "oci-"+spec.Name), Options{Log: t.Logf})
	if errors.Is(err, ErrUnavailable) {
		testenv.Skip(t, err.Error())
	}
	if err != nil {
		t.Fatal(err)
	}
	return im
}
