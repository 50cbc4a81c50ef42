package pull

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/client"
)

// Connect connects to containerd at address (a unix socket path, or unix://PATH), failing at once when the socket
// does not exist.
func Connect(address string) (*client.Client, error) {
	// client.New connects lazily: without this check a missing socket surfaces only 10s later, in the first call,
	// as a bare gRPC "dial ... timeout".
	if path, ok := strings.CutPrefix(address, "unix://"); ok || !strings.Contains(address, "://") {
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("connect to containerd at %s: %w (is containerd running? set --address)", address, err)
		}
	}
	c, err := client.New(address, client.WithTimeout(10*time.Second))
	if err != nil {
		return nil, fmt.Errorf("connect to containerd at %s: %w (is containerd running? set --address)", address, err)
	}
	return c, nil
}
