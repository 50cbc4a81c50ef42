package image

import (
	"bytes"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	digest "github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/cache"
)

// helloLayerBlob returns the bytes of the upstream hello-world converted layer (tar-wrapped ZFile).
func helloLayerBlob(t *testing.T) []byte {
	t.Helper()
	lay, err := OpenLayout(helloLayout)
	if err != nil {
		t.Fatal(err)
	}
	d, err := lay.Resolve(Ref{Tag: "amd64-converted"})
	if err != nil {
		t.Fatal(err)
	}
	m, _, err := lay.Manifest(d, Platform{OS: "linux", Architecture: "amd64"})
	if err != nil {
		t.Fatal(err)
	}
	layers, err := BlockLayers(m)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(lay.BlobPath(layers[len(layers)-1].BlobDigest))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// faultySource serves blob, but its first bad reads are wrong: bytes from another offset (the header says
// the right range, the body does not), or a flipped byte.
type faultySource struct {
	blob   []byte
	bad    atomic.Int64 // reads still to answer wrongly; negative: all
	shift  bool         // wrong offset instead of a flipped byte
	served atomic.Int64
}

func (f *faultySource) ReadAt(p []byte, off int64) (int, error) {
	f.served.Add(1)
	if f.bad.Load() != 0 {
		f.bad.Add(-1)
		if f.shift {
			src := (off + 4096) % int64(len(f.blob))
			n := copy(p, f.blob[src:])
			copy(p[n:], f.blob)
			return len(p), nil
		}
		copy(p, f.blob[off:])
		for i := range p {
			p[i] ^= 0x5a
		}
		return len(p), nil
	}
	return copy(p, f.blob[off:]), nil
}

func openCache(t *testing.T, dir string) *cache.Cache {
	t.Helper()
	c, err := cache.Open(cache.Options{Dir: dir, CapacityBytes: 64 << 20, BlockSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Bytes poisoned in the cache while an image is opened (a 206 with the right Content-Range but other bytes, or
// corrupted bytes) are evicted and fetched again: the open succeeds and reads right.
func TestOpenLayerBlobEvictsPoisonedOpenReads(t *testing.T) {
	blob := helloLayerBlob(t)
	want, err := OpenLayerBlob(bytes.NewReader(blob), int64(len(blob)), true)
	if err != nil {
		t.Fatal(err)
	}
	ref := make([]byte, 1<<20)
	if _, err := want.ReadAt(ref, 0); err != nil {
		t.Fatal(err)
	}
	for _, shift := range []bool{true, false} {
		src := &faultySource{blob: blob, shift: shift}
		src.bad.Store(1)
		c := openCache(t, t.TempDir())
		r := c.Reader(digest.Digest("sha256:"+strings.Repeat("ab", 32)), int64(len(blob)), src)
		f, err := OpenLayerBlob(r, int64(len(blob)), true)
		if err != nil {
			t.Fatalf("shift=%v: open with one bad fetch: %v", shift, err)
		}
		got := make([]byte, len(ref))
		if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, ref) {
			t.Fatalf("shift=%v: read after a recovered open: %v, equal %v", shift, err, bytes.Equal(got, ref))
		}
		c.Close()
	}
}

// A blob whose bytes stay bad fails to open, and what was read is not kept: once the source is right again (the
// registry fixed, or the daemon restarted) the image opens, without anyone deleting the cache by hand.
func TestOpenLayerBlobFailedOpenLeavesNoPoison(t *testing.T) {
	blob := helloLayerBlob(t)
	dir := t.TempDir()
	key := "sha256:" + strings.Repeat("cd", 32)
	src := &faultySource{blob: blob, shift: true}
	src.bad.Store(-1)
	c := openCache(t, dir)
	if _, err := OpenLayerBlob(c.Reader(digest.Digest(key), int64(len(blob)), src), int64(len(blob)), true); err == nil {
		t.Fatal("a blob whose every fetch is wrong opened")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if n := src.served.Load(); n < 1+MaxOpenReloads {
		t.Fatalf("the source was asked %d times; the open should have evicted and refetched %d times", n, MaxOpenReloads)
	}

	good := &faultySource{blob: blob}
	c = openCache(t, dir) // a restarted daemon: the same cache directory
	defer c.Close()
	f, err := OpenLayerBlob(c.Reader(digest.Digest(key), int64(len(blob)), good), int64(len(blob)), true)
	if err != nil {
		t.Fatalf("after the source recovered, the open still fails: %v", err)
	}
	if good.served.Load() == 0 {
		t.Fatal("the reopened cache served the open without asking the source")
	}
	if _, err := f.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
}

// rangeLog records the ranges read through it.
type rangeLog struct {
	r      *bytes.Reader
	mu     sync.Mutex
	ranges [][2]int64
}

func (l *rangeLog) ReadAt(p []byte, off int64) (int, error) {
	l.mu.Lock()
	l.ranges = append(l.ranges, [2]int64{off, int64(len(p))})
	l.mu.Unlock()
	return l.r.ReadAt(p, off)
}

// BlobRange names the blob bytes a read of the layer file needs: every read of the blob that a layer read makes
// lies inside it. Observe sees the layer reads.
func TestLayerBlobRange(t *testing.T) {
	blob := helloLayerBlob(t)
	log := &rangeLog{r: bytes.NewReader(blob)}
	var observed [][2]int64
	l, err := OpenLayer(log, int64(len(blob)), LayerOptions{Verify: true, Observe: func(off, n int64) {
		observed = append(observed, [2]int64{off, n})
	}})
	if err != nil {
		t.Fatal(err)
	}
	if len(observed) != 0 {
		t.Fatalf("reads made while opening were observed: %v", observed)
	}
	for _, seg := range l.File.Index()[:20] {
		off, n := int64(seg.MOffset)*512, int64(seg.Length)*512
		log.ranges = nil
		if _, err := l.File.ReadAt(make([]byte, n), int64(seg.Offset)*512); err != nil {
			t.Fatal(err)
		}
		bOff, bN := l.BlobRange(off, n)
		for _, r := range log.ranges {
			if r[0] < bOff || r[0]+r[1] > bOff+bN {
				t.Fatalf("layer bytes %d+%d: the read of blob bytes %d+%d lies outside BlobRange %d+%d", off, n, r[0], r[1], bOff, bN)
			}
		}
		if len(observed) == 0 || observed[len(observed)-1] != [2]int64{off, n} {
			t.Fatalf("layer bytes %d+%d: observed %v", off, n, observed)
		}
	}
}
