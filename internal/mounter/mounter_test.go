package mounter

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/testenv"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/tarwrap"
	"github.com/obdproject/obd/zfile"
)

// cacheBlock is the cache's refill unit in these tests: small, so that what a mount fetches is close to what it
// reads (the default of 256 KiB would fetch most of this 627 KiB blob in three requests). These tests open their
// caches without readahead, whose background fetches would race the byte counts (readahead is tested in package
// cache).
const cacheBlock = 16 << 10

// hang bounds operations that must not hang; generous, as the machine is shared.
const hang = 2 * time.Minute

func readBlob(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(blobPath())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// zfileArea returns where the ZFile block records lie in the blob: [first, end).
func zfileArea(t *testing.T, blob []byte) (first, end int64) {
	t.Helper()
	r := bytes.NewReader(blob)
	m, err := tarwrap.Detect(r, int64(len(blob)))
	if err != nil {
		t.Fatal(err)
	}
	z, err := zfile.Open(bytes.NewReader(blob[m.Offset:m.Offset+m.Size]), m.Size, true)
	if err != nil {
		t.Fatal(err)
	}
	return m.Offset + zfile.SlotSize, m.Offset + z.Info().IndexOffset
}

// mountsAt counts the mounts at exactly target.
func mountsAt(t *testing.T, target string) int {
	t.Helper()
	n := 0
	for _, m := range mountsUnder(t, target) {
		if m.point == target {
			n++
		}
	}
	return n
}

func TestMountLazyFromRegistry(t *testing.T) {
	s := newSetup(t)
	blob := readBlob(t)
	reg := newFakeRegistry(t, blob)
	c := s.openCacheReadahead(cacheBlock, -1)
	m := s.newMounter(mounterOptions{registry: reg, cache: c})
	target := filepath.Join(s.root, "mnt")
	layers := []snapshotter.Layer{reg.layer()}

	if err := s.mount(m, "img1", layers, target); err != nil {
		t.Fatalf("Mount: %v", err)
	}
	if n := mountsAt(t, target); n != 1 {
		t.Fatalf("%d mounts at %s after Mount, want 1", n, target)
	}
	got, err := readWithin(t, filepath.Join(target, "hello"), hang)
	if err != nil {
		t.Fatalf("read /hello: %v", err)
	}
	if want := helloBinary(t); !bytes.Equal(got, want) {
		t.Fatalf("/hello read through the mount: %d bytes, differs from the %d bytes of the original", len(got), len(want))
	}

	served := reg.served.Load()
	ratio := float64(served) / float64(len(blob))
	t.Logf("mount + read /hello fetched %d of the blob's %d bytes (%.1f%%) in %d requests", served, len(blob), 100*ratio, reg.requests.Load())
	if served == 0 || ratio > 0.5 {
		t.Errorf("fetched %d bytes of a %d-byte blob: want a lazy fraction", served, len(blob))
	}
	st, ok := m.Stats()["img1"]
	if !ok || st.BytesFetched != served {
		t.Errorf("Stats()[img1] = %+v (present %v), want %d bytes fetched as the registry served", st, ok, served)
	}

	// Mount is idempotent: the same image at the same target is neither attached nor mounted again.
	if err := s.mount(m, "img1", layers, target); err != nil {
		t.Fatalf("second Mount: %v", err)
	}
	if n := mountsAt(t, target); n != 1 {
		t.Errorf("%d mounts at %s after a second Mount, want 1", n, target)
	}
	if again := reg.served.Load(); again != served {
		t.Errorf("a second Mount fetched %d more bytes", again-served)
	}
	if loops := loopsUnder(t, s.root); len(loops) != 1 {
		t.Errorf("loop devices %v after a second Mount, want one", loops)
	}

	// A second target of the same image shares its device; unmounting one keeps the other.
	target2 := filepath.Join(s.root, "mnt2")
	if err := s.mount(m, "img1", layers, target2); err != nil {
		t.Fatalf("Mount at a second target: %v", err)
	}
	if loops := loopsUnder(t, s.root); len(loops) != 1 {
		t.Errorf("loop devices %v with two targets, want one shared", loops)
	}
	ctx := context.Background()
	if err := m.Unmount(ctx, "img1", target2); err != nil {
		t.Fatalf("Unmount %s: %v", target2, err)
	}
	if b, err := readWithin(t, filepath.Join(target, "hello"), hang); err != nil || !bytes.Equal(b, got) {
		t.Errorf("/hello at %s after unmounting %s: %d bytes, %v", target, target2, len(b), err)
	}

	if err := m.Unmount(ctx, "img1", target); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	assertNothingLeft(t, s.root)
	if _, ok := m.Stats()["img1"]; ok {
		t.Errorf("Stats still lists img1 after its last Unmount")
	}
	// Unmount is idempotent too.
	if err := m.Unmount(ctx, "img1", target); err != nil {
		t.Errorf("second Unmount: %v", err)
	}

	// Mounting again after the unmount reads from the cache: nothing more is fetched.
	before := reg.served.Load()
	if err := s.mount(m, "img1", layers, target); err != nil {
		t.Fatalf("Mount after Unmount: %v", err)
	}
	if b, err := readWithin(t, filepath.Join(target, "hello"), hang); err != nil || !bytes.Equal(b, got) {
		t.Fatalf("/hello after remounting: %d bytes, %v", len(b), err)
	}
	if after := reg.served.Load(); after != before {
		t.Errorf("remounting fetched %d bytes again although the cache holds them", after-before)
	}
	if err := m.Unmount(ctx, "img1", target); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	assertNothingLeft(t, s.root)
}

func TestMountLocalPath(t *testing.T) {
	s := newSetup(t)
	m := s.newMounter(mounterOptions{}) // no registry: any use of one fails the test
	target := filepath.Join(s.root, "mnt")
	st, err := os.Stat(blobPath())
	if err != nil {
		t.Fatal(err)
	}
	layers := []snapshotter.Layer{{Digest: blobDigest, Size: st.Size(), LocalPath: blobPath()}}
	if err := s.mount(m, "local", layers, target); err != nil {
		t.Fatalf("Mount: %v", err)
	}
	got, err := readWithin(t, filepath.Join(target, "hello"), hang)
	if err != nil {
		t.Fatalf("read /hello: %v", err)
	}
	if !bytes.Equal(got, helloBinary(t)) {
		t.Errorf("/hello of a local layer differs from the original")
	}
	// The mount is read-only.
	if err := os.WriteFile(filepath.Join(target, "new"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("writing into the mount: %v, want EROFS", err)
	}
	if err := m.Unmount(context.Background(), "local", target); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	assertNothingLeft(t, s.root)
}

func TestMountBadLayers(t *testing.T) {
	s := newSetup(t)
	m := s.newMounter(mounterOptions{})
	notBlob := filepath.Join(s.root, "not-a-blob")
	if err := os.WriteFile(notBlob, bytes.Repeat([]byte("x"), 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		layer   snapshotter.Layer
		wantErr string
	}{
		{"no source", snapshotter.Layer{Digest: blobDigest, Size: 1}, "neither a local file nor an image reference"},
		{"missing local file", snapshotter.Layer{Digest: blobDigest, LocalPath: filepath.Join(s.root, "nope")}, "no such file"},
		{"not an overlaybd blob", snapshotter.Layer{Digest: blobDigest, LocalPath: notBlob}, "layer 0"},
		{"local image reference", snapshotter.Layer{Digest: blobDigest, ImageRef: "oci:/x:y"}, "not a registry reference"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			target := filepath.Join(s.root, "mnt-"+strings.ReplaceAll(tc.name, " ", "-"))
			err := s.mount(m, "bad", []snapshotter.Layer{tc.layer}, target)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "image bad") {
				t.Errorf("Mount: %v, want an error naming the image and saying %q", err, tc.wantErr)
			}
			assertNothingLeft(t, s.root)
		})
	}
}

// TestMountRegistryDown: a registry that answers 503 forever makes Mount or the read fail after the retry
// budget — with an error, not a hang.
func TestMountRegistryDown(t *testing.T) {
	blob := readBlob(t)
	t.Run("before mount", func(t *testing.T) {
		s := newSetup(t)
		reg := newFakeRegistry(t, blob)
		reg.down.Store(true)
		m := s.newMounter(mounterOptions{registry: reg, retryBudget: 2 * time.Second, cache: s.openCacheReadahead(cacheBlock, -1)})
		target := filepath.Join(s.root, "mnt")
		start := time.Now()
		err := s.mount(m, "down", []snapshotter.Layer{reg.layer()}, target)
		if err == nil {
			t.Fatal("Mount with the registry down succeeded")
		}
		t.Logf("Mount failed after %s: %v", time.Since(start).Round(time.Millisecond), err)
		if !errors.Is(err, registry.ErrUnavailable) || !strings.Contains(err.Error(), "503") || !strings.Contains(err.Error(), reg.host()) {
			t.Errorf("Mount error %q: want registry.ErrUnavailable naming the registry and its 503", err)
		}
		if time.Since(start) > hang {
			t.Errorf("Mount took %s to give up with a retry budget of 2s", time.Since(start))
		}
		if reg.unavail.Load() < 2 {
			t.Errorf("the registry was asked %d times: want retries", reg.unavail.Load())
		}
		assertNothingLeft(t, s.root)
	})
	t.Run("after mount", func(t *testing.T) {
		s := newSetup(t)
		reg := newFakeRegistry(t, blob)
		// No cache: every read of the device goes to the registry.
		m := s.newMounter(mounterOptions{registry: reg, retryBudget: 2 * time.Second})
		target := filepath.Join(s.root, "mnt")
		if err := s.mount(m, "down", []snapshotter.Layer{reg.layer()}, target); err != nil {
			t.Fatalf("Mount: %v", err)
		}
		reg.down.Store(true)
		start := time.Now()
		b, err := readWithin(t, filepath.Join(target, "hello"), hang)
		t.Logf("read failed after %s: %v", time.Since(start).Round(time.Millisecond), err)
		if !errors.Is(err, syscall.EIO) {
			t.Errorf("read /hello with the registry down: %d bytes, error %v; want EIO", len(b), err)
		}
		if reg.unavail.Load() == 0 {
			t.Errorf("the read did not reach the registry")
		}
		if st := m.Stats()["down"]; st.Errors == 0 {
			t.Errorf("Stats = %+v: want the failed requests counted", st)
		}
		// The range is known dead: reading it again (as the kernel does, in smaller pieces, after an EIO) fails at
		// once instead of spending another retry budget.
		asked := reg.unavail.Load()
		if _, err := readWithin(t, filepath.Join(target, "hello"), hang); !errors.Is(err, syscall.EIO) {
			t.Errorf("second read with the registry down: %v, want EIO", err)
		}
		if n := reg.unavail.Load() - asked; n > 1 {
			t.Errorf("a second read of a dead range asked the registry %d times; want at most one probe", n)
		}
		// The registry comes back: the same mount reads again once the dead blob is probed.
		reg.down.Store(false)
		time.Sleep(registry.ProbeInterval)
		b, err = readWithin(t, filepath.Join(target, "hello"), hang)
		if err != nil || !bytes.Equal(b, helloBinary(t)) {
			t.Errorf("read /hello after the registry came back: %d bytes, %v", len(b), err)
		}
		if err := m.Unmount(context.Background(), "down", target); err != nil {
			t.Fatalf("Unmount: %v", err)
		}
		assertNothingLeft(t, s.root)
	})
}

// TestMountCorruptRange: the registry corrupts one byte of a ZFile block the first time it serves it; the block's
// CRC fails, the range is fetched again (evicted from the cache, if there is one) and the reader gets correct data.
func TestMountCorruptRange(t *testing.T) {
	blob := readBlob(t)
	// The first byte of the first block record: block 0 holds the LSMT header, which every mount reads.
	first, _ := zfileArea(t, blob)
	for _, withCache := range []bool{true, false} {
		name := map[bool]string{true: "through the cache", false: "without a cache"}[withCache]
		t.Run(name, func(t *testing.T) {
			s := newSetup(t)
			reg := newFakeRegistry(t, blob)
			reg.corruptAt.Store(first)
			var c *cache.Cache
			if withCache {
				c = s.openCacheReadahead(cacheBlock, -1)
			}
			m := s.newMounter(mounterOptions{registry: reg, cache: c})
			target := filepath.Join(s.root, "mnt")
			if err := s.mount(m, "corrupt", []snapshotter.Layer{reg.layer()}, target); err != nil {
				t.Fatalf("Mount: %v", err)
			}
			got, err := readWithin(t, filepath.Join(target, "hello"), hang)
			if err != nil {
				t.Fatalf("read /hello: %v", err)
			}
			if !bytes.Equal(got, helloBinary(t)) {
				t.Errorf("/hello differs from the original")
			}
			if reg.corrupted.Load() != 1 {
				t.Fatalf("the registry served the corrupt byte %d times, want once (the fault was not injected)", reg.corrupted.Load())
			}
			if n := reg.covering.Load(); n < 2 {
				t.Errorf("the corrupted range was served %d times: want it fetched again", n)
			}
			if c != nil {
				if st := c.Stats(); st.Evictions == 0 {
					t.Errorf("cache stats %+v: want the corrupt range evicted", st)
				}
			}
			if err := m.Unmount(context.Background(), "corrupt", target); err != nil {
				t.Fatalf("Unmount: %v", err)
			}
			assertNothingLeft(t, s.root)
		})
	}
}

// TestMountCorruptCacheFile: the cache's data file is damaged on disk between two runs; the next Mounter (same
// cache directory) detects it by the ZFile CRCs, asks the registry again and reads correct data.
func TestMountCorruptCacheFile(t *testing.T) {
	s := newSetup(t)
	blob := readBlob(t)
	reg := newFakeRegistry(t, blob)
	want := helloBinary(t)
	target := filepath.Join(s.root, "mnt")
	layers := []snapshotter.Layer{reg.layer()}
	ctx := context.Background()

	c1 := s.openCacheReadahead(cacheBlock, -1)
	m1 := s.newMounter(mounterOptions{registry: reg, cache: c1})
	if err := s.mount(m1, "img", layers, target); err != nil {
		t.Fatalf("Mount: %v", err)
	}
	if got, err := readWithin(t, filepath.Join(target, "hello"), hang); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read /hello: %d bytes, %v", len(got), err)
	}
	if err := m1.Unmount(ctx, "img", target); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	cachedBytes, _ := c1.Usage()
	if err := c1.Close(); err != nil {
		t.Fatalf("closing the cache: %v", err)
	}
	if cachedBytes == 0 {
		t.Fatal("the cache holds nothing after a read")
	}

	// Damage every byte of the block records in the cache's data file (the tar and ZFile headers and the ZFile
	// index are not protected by block CRCs, so they are left alone).
	dataFile := filepath.Join(s.cacheDir, string(reg.dg.Algorithm()), reg.dg.Encoded()+".data")
	data, err := os.ReadFile(dataFile)
	if err != nil {
		t.Fatalf("the cache's data file: %v", err)
	}
	first, end := zfileArea(t, blob)
	cachedRecords := 0 // non-zero bytes of block records found in the data file: a lower bound of what is cached
	for i := first; i < end; i++ {
		if data[i] == blob[i] && blob[i] != 0 {
			cachedRecords++
		}
		data[i] = ^blob[i]
	}
	if cachedRecords == 0 {
		t.Fatal("the cache's data file holds none of the blob's block records")
	}
	if err := os.WriteFile(dataFile, data, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Logf("damaged the block records in the cache's data file (at least %d cached bytes; %d bytes cached in all)", cachedRecords, cachedBytes)

	before := reg.served.Load()
	c2 := s.openCacheReadahead(cacheBlock, -1)
	if used, _ := c2.Usage(); used != cachedBytes {
		t.Errorf("the reopened cache holds %d bytes, the closed one held %d", used, cachedBytes)
	}
	m2 := s.newMounter(mounterOptions{registry: reg, cache: c2})
	if err := s.mount(m2, "img", layers, target); err != nil {
		t.Fatalf("Mount with a damaged cache: %v", err)
	}
	got, err := readWithin(t, filepath.Join(target, "hello"), hang)
	if err != nil {
		t.Fatalf("read /hello with a damaged cache: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("/hello read with a damaged cache differs from the original")
	}
	if again := reg.served.Load() - before; again == 0 {
		t.Errorf("the registry was not asked again for the damaged ranges")
	} else {
		t.Logf("fetched %d bytes again", again)
	}
	if st := c2.Stats(); st.Evictions == 0 {
		t.Errorf("cache stats %+v: want the damaged blocks evicted", st)
	}
	if err := m2.Unmount(ctx, "img", target); err != nil {
		t.Fatalf("Unmount: %v", err)
	}
	assertNothingLeft(t, s.root)
}

// TestMountNotExt4: a valid overlaybd layer whose disk holds no filesystem attaches, but does not mount; the
// failed Mount leaves no device behind.
func TestMountNotExt4(t *testing.T) {
	s := newSetup(t)
	dir := t.TempDir()
	df, err := os.Create(filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	defer df.Close()
	xf, err := os.Create(filepath.Join(dir, "index"))
	if err != nil {
		t.Fatal(err)
	}
	defer xf.Close()
	rw, err := lsmt.CreateRW(df, xf, 64<<20, lsmt.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rw.WriteAt(bytes.Repeat([]byte("not a filesystem"), 4096), 0); err != nil {
		t.Fatal(err)
	}
	commit := filepath.Join(dir, "layer.commit")
	out, err := os.Create(commit)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lsmt.Commit(out, rw, lsmt.CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	m := s.newMounter(mounterOptions{})
	target := filepath.Join(s.root, "mnt")
	err = s.mount(m, "noext4", []snapshotter.Layer{{LocalPath: commit}}, target)
	if err == nil {
		t.Fatal("Mount of a disk without a filesystem succeeded")
	}
	if !strings.Contains(err.Error(), "image noext4") || !strings.Contains(err.Error(), target) {
		t.Errorf("Mount error %q: want it to name the image and the target", err)
	}
	assertNothingLeft(t, s.root)
}

// TestHungRegistryDelaysOnlyItsImage attaches an image while the registry of another image hangs: the mounter
// locks per image, so the hung attach does not delay it, and completes once the registry answers.
func TestHungRegistryDelaysOnlyItsImage(t *testing.T) {
	s := newSetup(t)
	blob, err := os.ReadFile(blobPath())
	if err != nil {
		t.Fatal(err)
	}
	reg := newFakeRegistry(t, blob)
	reg.hang = make(chan struct{})
	released := false
	defer func() {
		if !released {
			close(reg.hang)
		}
	}()
	// No cache: the two images share their blob, and the cache would make the second wait for the first's fetch.
	m := s.newMounter(mounterOptions{registry: reg})
	hung := reg.layer()
	hung.ImageRef = reg.host() + "/hang/hello:obd"
	errc := make(chan error, 1)
	go func() { errc <- s.mount(m, "hung", []snapshotter.Layer{hung}, filepath.Join(s.root, "hung")) }()
	for deadline := time.Now().Add(10 * time.Second); reg.hanging.Load() == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the hung image never asked its registry")
		}
	}

	target := filepath.Join(s.root, "ok")
	testenv.Within(t, 10*time.Second, "attaching an image while another image's registry hangs", func() {
		if err := s.mount(m, "ok", []snapshotter.Layer{reg.layer()}, target); err != nil {
			t.Error(err)
		}
	})
	if got, err := os.ReadFile(filepath.Join(target, "hello")); err != nil || !bytes.Equal(got, helloBinary(t)) {
		t.Fatalf("read the attached image: %v", err)
	}
	select {
	case err := <-errc:
		t.Fatalf("the hung image's attach returned before its registry answered: %v", err)
	default:
	}
	close(reg.hang)
	released = true
	if err := <-errc; err != nil {
		t.Fatalf("the hung image's attach, once its registry answered: %v", err)
	}
}
