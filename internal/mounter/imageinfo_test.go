package mounter

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	digest "github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/device"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/testenv"
	"github.com/obdproject/obd/lsmt"
)

// stHelloBlob is the overlaybd layer blob of testdata's hello-world image converted by upstream.
var (
	stHelloDigest = digest.Digest("sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d")
	stHelloBlob   = filepath.Join("..", "..", "testdata", "upstream", "hello-world-oci", "blobs", "sha256", stHelloDigest.Encoded())
)

// stLockedBuffer is a bytes.Buffer safe for the concurrent writes of loggers.
type stLockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *stLockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *stLockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// flakyReader fails every read once fail is set.
type flakyReader struct {
	r    io.ReaderAt
	fail atomic.Bool
}

func (f *flakyReader) ReadAt(p []byte, off int64) (int, error) {
	if f.fail.Load() {
		return 0, errors.New("connection reset by peer")
	}
	return f.r.ReadAt(p, off)
}

// TestReadErrorsNameImageAndLayer checks what a failed device read reports: the image, the range, and the layer
// whose source failed.
func TestReadErrorsNameImageAndLayer(t *testing.T) {
	blob, err := os.ReadFile(stHelloBlob)
	if err != nil {
		t.Fatal(err)
	}
	l := snapshotter.Layer{Digest: stHelloDigest, Size: int64(len(blob)), ImageRef: "registry.test/hello:obd"}
	src := &flakyReader{r: bytes.NewReader(blob)}
	f, err := image.OpenLayerBlob(annotate(src, l), int64(len(blob)), true)
	if err != nil {
		t.Fatal(err)
	}
	stack, err := lsmt.NewStack([]*lsmt.File{f}, nil)
	if err != nil {
		t.Fatal(err)
	}
	b := stackBackend{Stack: stack, id: "42", layers: []snapshotter.Layer{l}}
	src.fail.Store(true)
	_, err = b.ReadAt(make([]byte, 4096), 1<<20)
	if err == nil {
		t.Fatal("read of a failing layer succeeded")
	}
	for _, want := range []string{"image 42 (registry.test/hello:obd)", "read 4096 bytes at 1048576", "layer " + stHelloDigest.String(), "connection reset by peer"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if strings.Count(err.Error(), stHelloDigest.String()) != 1 {
		t.Errorf("error %q names the layer more than once", err)
	}
	// The cause stays reachable.
	if !strings.Contains(errors.Unwrap(err).Error(), "connection reset") {
		t.Errorf("unwrapped error %v", errors.Unwrap(err))
	}
}

func TestImagesStates(t *testing.T) {
	testenv.Root(t)
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			testenv.Skip(t, p+" is missing")
		}
	}
	root := t.TempDir()
	var logs stLockedBuffer
	logger := slog.New(slog.NewTextHandler(&logs, nil))
	m := New(Options{Frontend: device.NewFuseLoop(logger), StateDir: filepath.Join(root, "state"), Logger: logger})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	if imgs := m.Images(); len(imgs) != 0 {
		t.Fatalf("new mounter: %+v", imgs)
	}

	// A layer whose file is missing fails; Images says so and names the layer.
	missing := snapshotter.Layer{Digest: digest.FromString("gone"), Size: 10, LocalPath: filepath.Join(root, "gone.commit"), ImageRef: "registry.test/gone:obd"}
	if err := m.Mount(ctx, "bad", []snapshotter.Layer{missing}, filepath.Join(root, "bad")); err == nil {
		t.Fatal("mount of a missing layer succeeded")
	}
	imgs := m.Images()
	if len(imgs) != 1 || imgs[0].ID != "bad" || imgs[0].State != StateFailed || imgs[0].ImageRef != "registry.test/gone:obd" ||
		!strings.Contains(imgs[0].Error, missing.Digest.String()) || len(imgs[0].Layers) != 1 {
		t.Errorf("after a failed mount: %+v", imgs)
	}
	if !strings.Contains(logs.String(), "layer="+missing.Digest.String()) || !strings.Contains(logs.String(), "image=bad") {
		t.Errorf("log of the failed mount does not name the image and layer:\n%s", logs.String())
	}
	if err := m.Unmount(ctx, "bad", filepath.Join(root, "bad")); err != nil {
		t.Fatal(err)
	}
	if imgs := m.Images(); len(imgs) != 0 {
		t.Errorf("after Unmount of a failed image: %+v", imgs)
	}

	// A local layer mounts; Images reports the device, the mount and the layer.
	local := snapshotter.Layer{Digest: stHelloDigest, Size: 642560, LocalPath: stHelloBlob}
	target := filepath.Join(root, "mnt")
	if err := m.Mount(ctx, "hello", []snapshotter.Layer{local}, target); err != nil {
		t.Fatal(err)
	}
	defer m.Unmount(context.Background(), "hello", target)
	if _, err := os.Stat(filepath.Join(target, "hello")); err != nil {
		t.Errorf("image not mounted: %v", err)
	}
	imgs = m.Images()
	if len(imgs) != 1 || imgs[0].State != StateAttached || imgs[0].Device == "" || len(imgs[0].Targets) != 1 || imgs[0].Targets[0] != target ||
		len(imgs[0].Layers) != 1 || !imgs[0].Layers[0].Local || imgs[0].Layers[0].Digest != stHelloDigest || time.Since(imgs[0].Since) > time.Minute {
		t.Errorf("attached image: %+v", imgs)
	}
	if err := m.Unmount(ctx, "hello", target); err != nil {
		t.Fatal(err)
	}
	if imgs := m.Images(); len(imgs) != 0 {
		t.Errorf("after Unmount: %+v", imgs)
	}
}
