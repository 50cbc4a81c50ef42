package pull

import (
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
)

// namedImage is a client.Image that only has a name.
type namedImage struct {
	client.Image
	name string
}

func (n namedImage) Name() string { return n.name }

func TestSummary(t *testing.T) {
	r := &Result{Image: namedImage{name: "r/app:obd"}, Fetched: map[string]int64{"sha256:m": 1024, "sha256:c": 1024}, Lazy: 2, Layers: 3}
	want := "pulled r/app:obd in 1.5s: 3 layers, 2 lazy (not downloaded); fetched 2 blobs, 2.0 KiB"
	if got := r.Summary(1500 * time.Millisecond); got != want {
		t.Errorf("Summary = %q, want %q", got, want)
	}
}
