package main

import (
	"os"
	"testing"
)

// TestMain gives the tests their own cache dir: obd convert keeps its layer database there.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "obd-cli-test-")
	if err != nil {
		panic(err)
	}
	os.Setenv("XDG_CACHE_HOME", dir)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
