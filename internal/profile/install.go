package profile

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/trace"
)

// Install registers traceFile as the recorded start of the image whose overlaybd layers have chain ID chainID on a
// node whose snapshotter keeps registered profiles in dir: the snapshotter prefetches it whenever it attaches that
// image's device and the image has no acceleration layer. It returns the file written.
func Install(dir string, chainID digest.Digest, traceFile []byte) (string, error) {
	if err := chainID.Validate(); err != nil {
		return "", fmt.Errorf("install profile: chain ID %q: %w", chainID, err)
	}
	recs, err := trace.Decode(traceFile)
	if err != nil {
		return "", fmt.Errorf("install profile: %w", err)
	}
	if len(recs) == 0 {
		return "", fmt.Errorf("install profile: %w", ErrNoTrace)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("install profile: %w", err)
	}
	path := snapshotter.ProfilePath(dir, chainID.String())
	tmp := filepath.Join(dir, "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, traceFile, 0o644); err != nil {
		return "", fmt.Errorf("install profile: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("install profile: %w", err)
	}
	return path, nil
}
