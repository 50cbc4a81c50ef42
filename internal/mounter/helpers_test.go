package mounter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/device"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/testenv"
)

// Fixtures of the repository (see testdata/upstream/README.md).
var (
	helloLayout = filepath.Join("..", "..", "testdata", "upstream", "hello-world-oci")
	// blobDigest is the overlaybd layer blob of tag amd64-converted, made by upstream's converter.
	blobDigest = digest.Digest("sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d")
	// helloLayerBlob is the gzip tar layer of tag amd64, the original hello-world image.
	helloLayerBlob = filepath.Join(helloLayout, "blobs", "sha256", "719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6")
)

func blobPath() string { return filepath.Join(helloLayout, "blobs", "sha256", blobDigest.Encoded()) }

// needSystem skips unless the test can attach and mount devices: root, /dev/fuse and loop devices.
func needSystem(t *testing.T) {
	t.Helper()
	testenv.Root(t)
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			testenv.Skip(t, p+" is missing")
		}
	}
}

// helloBinary returns the file /hello of the original hello-world layer (a gzip tar).
func helloBinary(t *testing.T) []byte { return testenv.TarGzFile(t, helloLayerBlob, "hello") }

// fakeRegistry serves one blob at /v2/<repo>/blobs/<digest> on loopback, with Range support, counting what it
// serves, and with two faults: answering 503 to everything, and corrupting one byte once.
type fakeRegistry struct {
	srv  *httptest.Server
	repo string
	dg   digest.Digest
	blob []byte

	down        atomic.Bool  // answer 503 to every request
	corruptAt   atomic.Int64 // blob offset whose byte the first response covering it flips; -1 for none
	corruptDone atomic.Bool  // the byte was flipped once

	served    atomic.Int64 // body bytes of blob responses
	requests  atomic.Int64 // blob requests answered with the blob
	unavail   atomic.Int64 // requests answered 503
	corrupted atomic.Int64 // responses that carried the flipped byte
	covering  atomic.Int64 // responses that covered corruptAt (corrupted or not)

	// hang, if set, makes requests for the repository "hang/hello" (an alias of repo) wait until it is closed;
	// hanging counts the requests that waited.
	hang    chan struct{}
	hanging atomic.Int64

	// delay, if set before the first request, holds every blob answer that long; inflight counts the requests
	// being answered and maxInflight the most at once.
	delay                 time.Duration
	inflight, maxInflight atomic.Int64

	mu     sync.Mutex
	ranges []string
}

func newFakeRegistry(t *testing.T, blob []byte) *fakeRegistry {
	t.Helper()
	f := &fakeRegistry{repo: "test/hello", dg: digest.FromBytes(blob), blob: blob}
	f.corruptAt.Store(-1)
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve)) // listens on 127.0.0.1
	t.Cleanup(f.srv.Close)
	return f
}

// host returns the registry's host:port.
func (f *fakeRegistry) host() string { return strings.TrimPrefix(f.srv.URL, "http://") }

// imageRef is a reference to an image in the registry's repository.
func (f *fakeRegistry) imageRef() string { return f.host() + "/" + f.repo + ":obd" }

// layer is the overlaybd layer of the served blob.
func (f *fakeRegistry) layer() snapshotter.Layer {
	return snapshotter.Layer{Digest: f.dg, Size: int64(len(f.blob)), ImageRef: f.imageRef()}
}

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

// Write counts p before writing it: the client may have read the bytes (and the test looked at the count)
// before Write returns.
func (w countingWriter) Write(p []byte) (int, error) {
	w.n.Add(int64(len(p)))
	n, err := w.ResponseWriter.Write(p)
	w.n.Add(int64(n - len(p)))
	return n, err
}

func (f *fakeRegistry) serve(w http.ResponseWriter, r *http.Request) {
	if f.down.Load() {
		f.unavail.Add(1)
		http.Error(w, "registry is down", http.StatusServiceUnavailable)
		return
	}
	if f.hang != nil && strings.HasPrefix(r.URL.Path, "/v2/hang/hello/") {
		f.hanging.Add(1)
		select {
		case <-f.hang:
		case <-r.Context().Done():
			return
		}
		r.URL.Path = "/v2/" + f.repo + "/" + strings.TrimPrefix(r.URL.Path, "/v2/hang/hello/")
	}
	switch r.URL.Path {
	case "/v2/", "/v2":
		w.WriteHeader(http.StatusOK)
		return
	case "/v2/" + f.repo + "/blobs/" + f.dg.String():
	default:
		http.NotFound(w, r)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	f.requests.Add(1)
	n := f.inflight.Add(1)
	defer f.inflight.Add(-1)
	for m := f.maxInflight.Load(); n > m && !f.maxInflight.CompareAndSwap(m, n); m = f.maxInflight.Load() {
	}
	time.Sleep(f.delay)
	data := f.blob
	if rng := r.Header.Get("Range"); rng != "" {
		f.mu.Lock()
		f.ranges = append(f.ranges, rng)
		f.mu.Unlock()
		first, last, ok := parseRange(rng)
		if at := f.corruptAt.Load(); ok && at >= first && at <= last {
			f.covering.Add(1)
			if f.corruptDone.CompareAndSwap(false, true) {
				f.corrupted.Add(1)
				data = bytes.Clone(f.blob)
				data[at] ^= 0xff
			}
		}
	}
	w.Header().Set("Docker-Content-Digest", f.dg.String())
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeContent(countingWriter{w, &f.served}, r, "", time.Time{}, bytes.NewReader(data))
}

// parseRange parses "bytes=FIRST-LAST".
func parseRange(s string) (first, last int64, ok bool) {
	a, b, ok := strings.Cut(strings.TrimPrefix(s, "bytes="), "-")
	if !ok {
		return 0, 0, false
	}
	first, err1 := strconv.ParseInt(a, 10, 64)
	last, err2 := strconv.ParseInt(b, 10, 64)
	return first, last, err1 == nil && err2 == nil
}

// testenv.Buffer collects the logs of a test; they are printed if it fails. (Logging through t.Log is not possible:

// testLogger returns a logger whose output the test prints when it fails.
func testLogger(t *testing.T) *slog.Logger {
	t.Helper()
	lb := &testenv.Buffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs:\n%s", lb.String())
		}
	})
	return slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// setup is one test's directories and logger. Everything it mounts lives under root and is removed by cleanup.
type setup struct {
	t                        *testing.T
	root, stateDir, cacheDir string
	log                      *slog.Logger
	mu                       sync.Mutex
	mounted                  []mountedImage
}

type mountedImage struct {
	m          *Mounter
	id, target string
}

func newSetup(t *testing.T) *setup {
	t.Helper()
	needSystem(t)
	root := t.TempDir()
	s := &setup{t: t, root: root, stateDir: filepath.Join(root, "state"), cacheDir: filepath.Join(root, "cache"), log: testLogger(t)}
	// Registered after t.TempDir, so it runs before the directories are removed, also when the test failed.
	t.Cleanup(s.cleanup)
	return s
}

// mounterOptions configure newMounter.
type mounterOptions struct {
	registry       *fakeRegistry // nil: no registry (the Registry func fails the test), unless host is set
	host           string        // the registry's host:port when it is not a fakeRegistry
	retryBudget    time.Duration // 0: 10s
	requestTimeout time.Duration // 0: 5s
	refresh        func(host string) bool
	cache          *cache.Cache // nil: read straight from the registry
	download       bool         // background download, at once and unbounded
	preload        bool         // Options.Preload
	metadata       int64        // Options.MetadataBytes
	starts         string       // Options.StartsDir
	predecode      int64        // Options.PredecodeBytes
	prime          bool         // Options.PrimePageCache
}

// newMounter returns a Mounter with its own FuseLoop and a registry client for reg.
func (s *setup) newMounter(o mounterOptions) *Mounter {
	t := s.t
	t.Helper()
	if o.retryBudget == 0 {
		o.retryBudget = 10 * time.Second
	}
	if o.requestTimeout == 0 {
		o.requestTimeout = 5 * time.Second
	}
	if o.registry != nil {
		o.host = o.registry.host()
	}
	var client *registry.Client
	if o.host != "" {
		var err error
		client, err = registry.New(registry.Options{
			PlainHTTP:          true,
			Credentials:        registry.StaticCredentials("", ""),
			RetryBudget:        o.retryBudget,
			RequestTimeout:     o.requestTimeout,
			RefreshCredentials: o.refresh,
			Logger:             s.log,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { client.Close() })
	}
	return New(Options{
		Frontend:       device.NewFuseLoop(s.log),
		StateDir:       s.stateDir,
		Cache:          o.cache,
		Download:       DownloadOptions{Enable: o.download},
		Preload:        o.preload,
		MetadataBytes:  o.metadata,
		StartsDir:      o.starts,
		PredecodeBytes: o.predecode,
		PrimePageCache: o.prime,
		Registry: func(host string) (*registry.Client, error) {
			if client == nil || host != o.host {
				t.Errorf("Mounter asked for a client of registry %q", host)
				return nil, fmt.Errorf("no registry %q in this test", host)
			}
			return client, nil
		},
		Logger: s.log,
	})
}

// openCache opens the cache in the setup's cache directory with small blocks, so that lazy reads fetch little.
func (s *setup) openCache(blockSize int64) *cache.Cache {
	s.t.Helper()
	return s.openCacheReadahead(blockSize, 0)
}

// openCacheReadahead is openCache with a readahead bound (cache.Options.ReadaheadBytes; negative: none), for tests
// that count the registry requests of demand reads.
func (s *setup) openCacheReadahead(blockSize, readahead int64) *cache.Cache {
	s.t.Helper()
	c, err := cache.Open(cache.Options{Dir: s.cacheDir, CapacityBytes: 64 << 20, BlockSize: blockSize, ReadaheadBytes: readahead, Logger: s.log})
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { c.Close() })
	return c
}

// mount mounts layers with m at a new target under root and registers its unmount for the cleanup.
func (s *setup) mount(m *Mounter, id string, layers []snapshotter.Layer, target string) error {
	s.mu.Lock()
	s.mounted = append(s.mounted, mountedImage{m, id, target})
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(s.t.Context(), 2*time.Minute)
	defer cancel()
	return m.Mount(ctx, id, layers, target)
}

// cleanup unmounts and detaches what the test mounted, first through the Mounters, then whatever is left under
// root (never anything else).
func (s *setup) cleanup() {
	t := s.t
	s.mu.Lock()
	mounted := s.mounted
	s.mu.Unlock()
	for i := len(mounted) - 1; i >= 0; i-- {
		mi := mounted[i]
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := mi.m.Unmount(ctx, mi.id, mi.target); err != nil {
			t.Errorf("cleanup: unmount %s at %s: %v", mi.id, mi.target, err)
		}
		cancel()
	}
	mounts, loops := leftUnder(t, s.root)
	if len(mounts) == 0 && len(loops) == 0 {
		return
	}
	t.Errorf("cleanup: left after unmounting: mounts %v, loop devices %v; removing them", mounts, loops)
	// Filesystems on loop devices first, then the loop devices, then the FUSE files below them.
	for _, fuse := range []bool{false, true} {
		if fuse {
			for _, l := range loops {
				clearLoop(t, l)
			}
		}
		for i := len(mounts) - 1; i >= 0; i-- {
			if strings.HasPrefix(mounts[i].fsType, "fuse") == fuse {
				if err := unix.Unmount(mounts[i].point, unix.MNT_DETACH); err != nil {
					t.Errorf("cleanup: unmount %s: %v", mounts[i].point, err)
				}
			}
		}
	}
}

// mountEntry is a mount of /proc/self/mountinfo.
type mountEntry struct{ point, fsType, source string }

// mountsUnder lists the mounts whose mount point is dir or below it, in mount order.
func mountsUnder(t *testing.T, dir string) []mountEntry {
	t.Helper()
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Fatal(err)
	}
	out := make([]mountEntry, 0, len(infos))
	for _, m := range infos {
		out = append(out, mountEntry{m.Mountpoint, m.FSType, m.Source})
	}
	return out
}

// loopsUnder lists the loop devices (/dev/loopN) whose backing file is below dir.
func loopsUnder(t *testing.T, dir string) []string {
	t.Helper()
	paths, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // detached meanwhile
		}
		backing := strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
		if strings.HasPrefix(backing, dir+"/") {
			out = append(out, "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(p))))
		}
	}
	return out
}

// leftUnder returns the mounts and loop devices that still use dir.
func leftUnder(t *testing.T, dir string) ([]mountEntry, []string) {
	t.Helper()
	return mountsUnder(t, dir), loopsUnder(t, dir)
}

// assertNothingLeft fails the test if a mount or loop device still uses dir.
func assertNothingLeft(t *testing.T, dir string) {
	t.Helper()
	if mounts, loops := leftUnder(t, dir); len(mounts) > 0 || len(loops) > 0 {
		t.Errorf("mounts %v and loop devices %v are left under %s", mounts, loops, dir)
	}
}

// clearLoop detaches the loop device at path.
func clearLoop(t *testing.T, path string) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Errorf("cleanup: %s: %v", path, err)
		return
	}
	defer unix.Close(fd)
	if err := unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		t.Errorf("cleanup: clear %s: %v", path, err)
	}
}

// readWithin reads path, failing the test if the read takes longer than limit (a hang).
func readWithin(t *testing.T, path string, limit time.Duration) ([]byte, error) {
	t.Helper()
	type result struct {
		b   []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		b, err := os.ReadFile(path)
		done <- result{b, err}
	}()
	select {
	case r := <-done:
		return r.b, r.err
	case <-time.After(limit):
		t.Fatalf("reading %s did not finish within %s", path, limit)
		return nil, nil
	}
}
