package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func TestBlobsAndEvictBlob(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	a, b := newSrc(10*testBS, 21), newSrc(5*testBS+7, 22)
	ra, rb := c.Reader(a.key(), int64(len(a.data)), a), c.Reader(b.key(), int64(len(b.data)), b)
	checkRead(t, ra, a, 0, 3*testBS)
	checkRead(t, rb, b, 0, len(b.data))
	got := c.Blobs()
	if len(got) != 2 || got[0].Digest != b.key() || got[0].Blocks != 6 || got[0].TotalBlocks != 6 || got[0].CachedBytes != int64(len(b.data)) ||
		got[1].Digest != a.key() || got[1].Blocks != 3 || got[1].TotalBlocks != 10 {
		t.Fatalf("Blobs = %+v", got)
	}
	freed, err := c.EvictBlob(a.key())
	if err != nil || freed != 3*testBS {
		t.Fatalf("EvictBlob freed %d, %v", freed, err)
	}
	if used, blobs := c.Usage(); used != int64(len(b.data)) || blobs != 1 {
		t.Fatalf("usage after evicting a blob: %d bytes in %d blobs", used, blobs)
	}
	if n, err := c.EvictBlob(digest.FromString("unknown")); n != 0 || err != nil {
		t.Fatalf("evicting an unknown blob: %d, %v", n, err)
	}
}

// An export announces its size before its first byte, stops at its limit, returns the digest of what it wrote, and
// keeps its blocks from eviction until it ends.
func TestExportBlobPinsAndLimits(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	src := newSrc(6*testBS+3, 23)
	checkRead(t, c.Reader(src.key(), int64(len(src.data)), src), src, 0, len(src.data))
	var data bytes.Buffer
	var announced int64 = -1
	e, dg, err := c.ExportBlob(src.key(), &data, 4, func(n int64) error {
		announced = n
		// Evicting the blob while it is exported drops none of its blocks from under the export.
		if freed, err := c.EvictBlob(src.key()); err != nil || freed != 0 {
			t.Errorf("evicting an exported blob freed %d, %v", freed, err)
		}
		return nil
	})
	if err != nil || len(e.Blocks) != 4 || announced != 4*testBS || int64(data.Len()) != announced {
		t.Fatalf("export of 4 blocks: %+v, announced %d, wrote %d, %v", e.Blocks, announced, data.Len(), err)
	}
	if dg != digest.FromBytes(src.data[:4*testBS]) || !bytes.Equal(data.Bytes(), src.data[:4*testBS]) {
		t.Fatalf("export of 4 blocks: digest %s, bytes differ: %v", dg, !bytes.Equal(data.Bytes(), src.data[:4*testBS]))
	}
	if freed, err := c.EvictBlob(src.key()); err != nil || freed != int64(len(src.data)) {
		t.Fatalf("evicting the blob after its export freed %d, %v", freed, err)
	}
	called := false
	if e, _, err := c.ExportBlob(src.key(), &data, -1, func(int64) error { called = true; return nil }); err != nil || len(e.Blocks) != 0 || called {
		t.Fatalf("export of an evicted blob: %+v, %v, begin called %v", e, err, called)
	}
}

// Export the cached blocks of a partly and a fully cached blob, import them into another cache: the same blocks
// are present there, read without the source, and the complete blob is verified against its digest.
func TestExportImport(t *testing.T) {
	from := openTest(t, t.TempDir(), 1<<30, nil)
	defer from.Close()
	part, full := newSrc(20*testBS+100, 23), newSrc(4*testBS+1, 24)
	rp, rf := from.Reader(part.key(), int64(len(part.data)), part), from.Reader(full.key(), int64(len(full.data)), full)
	checkRead(t, rp, part, 3*testBS, 2*testBS)
	checkRead(t, rp, part, 20*testBS, 100)
	checkRead(t, rf, full, 0, len(full.data))

	to := openTest(t, t.TempDir(), 1<<30, nil)
	defer to.Close()
	for _, src := range []*memSrc{part, full} {
		var data bytes.Buffer
		e, _, err := from.ExportBlob(src.key(), &data, -1, nil)
		if err != nil {
			t.Fatal(err)
		}
		if int64(data.Len()) != e.DataSize() || e.Validate() != nil {
			t.Fatalf("export of %s: %d bytes for %+v", src.key(), data.Len(), e)
		}
		res, err := to.ImportBlob(context.Background(), e, &data)
		if err != nil {
			t.Fatal(err)
		}
		if res.Imported != int64(len(e.Blocks)) || res.Dropped != 0 || res.Full || res.Verified != (src == full) {
			t.Fatalf("import of %s: %+v", src.key(), res)
		}
	}
	// The imported blocks read with no source read; a block that was not exported goes to the source.
	for _, c := range []struct {
		src       *memSrc
		off, n    int
		fromCache bool
	}{{part, 3 * testBS, 2 * testBS, true}, {part, 20 * testBS, 100, true}, {full, 0, len(full.data), true}, {part, 0, 10, false}} {
		calls := c.src.calls.Load()
		checkRead(t, to.Reader(c.src.key(), int64(len(c.src.data)), c.src), c.src, int64(c.off), c.n)
		if got := c.src.calls.Load() == calls; got != c.fromCache {
			t.Errorf("read of %d+%d of %s: from the cache %v, want %v", c.off, c.n, c.src.key(), got, c.fromCache)
		}
	}
	// Importing again finds everything present.
	var data bytes.Buffer
	e, _, _ := from.ExportBlob(full.key(), &data, -1, nil)
	if res, err := to.ImportBlob(context.Background(), e, &data); err != nil || res.Present != int64(len(e.Blocks)) || res.Imported != 0 {
		t.Fatalf("second import: %+v, %v", res, err)
	}
}

// Blocks that do not match their CRCs (or sums) are dropped; a complete blob whose bytes do not match its digest is dropped
// whole; a snapshot never evicts cached blocks; bad descriptions are refused.
func TestImportRejects(t *testing.T) {
	from := openTest(t, t.TempDir(), 1<<30, nil)
	defer from.Close()
	src := newSrc(8*testBS, 25)
	checkRead(t, from.Reader(src.key(), int64(len(src.data)), src), src, 0, len(src.data))
	var data bytes.Buffer
	e, _, err := from.ExportBlob(src.key(), &data, -1, nil)
	if err != nil {
		t.Fatal(err)
	}
	good := data.Bytes()

	to := openTest(t, t.TempDir(), 1<<30, nil)
	bad := bytes.Clone(good)
	bad[2*testBS+5] ^= 1
	res, err := to.ImportBlob(context.Background(), e, bytes.NewReader(bad))
	if err != nil || res.Dropped != 1 || res.Imported != 7 || res.Verified {
		t.Fatalf("import with a damaged block: %+v, %v", res, err)
	}
	to.Close()

	// A snapshot written with sha256 sums (before CRCs) imports, and its damaged block is dropped too.
	sums := e
	sums.CRCs = nil
	for k, i := range e.Blocks {
		sums.Sums = append(sums.Sums, digest.FromBytes(good[k*testBS:min(len(good), (k+1)*testBS)]))
		if i != int64(k) {
			t.Fatal("the blob is not whole")
		}
	}
	to = openTest(t, t.TempDir(), 1<<30, nil)
	if res, err := to.ImportBlob(context.Background(), sums, bytes.NewReader(bad)); err != nil || res.Dropped != 1 || res.Imported != 7 {
		t.Fatalf("import of a snapshot with sums, a damaged block: %+v, %v", res, err)
	}
	if res, err := to.ImportBlob(context.Background(), sums, bytes.NewReader(good)); err != nil || res.Imported != 1 || !res.Verified {
		t.Fatalf("import of a snapshot with sums: %+v, %v", res, err)
	}
	to.Close()

	// CRCs that match bytes which are not the blob's: caught by the digest once complete.
	forged := e
	forged.CRCs = slices.Clone(e.CRCs)
	wrong := bytes.Clone(good)
	wrong[0] ^= 1
	forged.CRCs[0] = crc32.Checksum(wrong[:testBS], crcTable)
	to = openTest(t, t.TempDir(), 1<<30, nil)
	if _, err := to.ImportBlob(context.Background(), forged, bytes.NewReader(wrong)); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("import of a forged complete blob: %v, want ErrDigestMismatch", err)
	}
	if used, _ := to.Usage(); used != 0 {
		t.Fatalf("%d bytes of a forged blob stay cached", used)
	}
	to.Close()

	// The bound: a cache of 3 blocks takes 3 and says it is full.
	small := openTest(t, t.TempDir(), 3*testBS, nil)
	defer small.Close()
	res, err = small.ImportBlob(context.Background(), e, bytes.NewReader(good))
	if err != nil || !res.Full || res.Imported != 3 {
		t.Fatalf("import into a small cache: %+v, %v", res, err)
	}

	for _, c := range []struct {
		name string
		mod  func(*ExportedBlob)
		want string
	}{
		{"order", func(e *ExportedBlob) { e.Blocks[1], e.Blocks[2] = e.Blocks[2], e.Blocks[1] }, "out of order"},
		{"range", func(e *ExportedBlob) { e.Blocks[7] = 8 }, "out of order or range"},
		{"crcs", func(e *ExportedBlob) { e.CRCs = e.CRCs[:3] }, "3 CRCs for 8 blocks"},
		{"no crcs", func(e *ExportedBlob) { e.CRCs = nil }, "0 sums for 8 blocks"},
		{"both", func(e *ExportedBlob) { e.Sums = sums.Sums }, "both crc32c and sums"},
		{"bad sum", func(e *ExportedBlob) { e.CRCs, e.Sums = nil, slices.Clone(sums.Sums); e.Sums[2] = "md5:00" }, "block 2: bad sum"},
		{"block size", func(e *ExportedBlob) { e.BlockSize = 2 * testBS }, "out of order or range"},
		{"digest", func(e *ExportedBlob) { e.Digest = "sha256:xyz" }, "blob"},
	} {
		m := e
		m.Blocks, m.CRCs = slices.Clone(e.Blocks), slices.Clone(e.CRCs)
		c.mod(&m)
		if _, err := small.ImportBlob(context.Background(), m, bytes.NewReader(good)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error with %q", c.name, err, c.want)
		}
	}
}

// BenchmarkSnapshot measures export and import of a whole 64 MiB blob (obd cache export/import of a warm image),
// against the page cache, with 64 and 256 KiB blocks.
func BenchmarkSnapshot(b *testing.B) {
	for _, bs := range []int64{64 << 10, 256 << 10} {
		b.Run(fmt.Sprintf("block=%dK", bs>>10), func(b *testing.B) { benchmarkSnapshot(b, bs) })
	}
}

func benchmarkSnapshot(b *testing.B, bs int64) {
	const size = 64 << 20
	open := func(dir string) *Cache {
		c, err := Open(Options{Dir: dir, CapacityBytes: 1 << 30, BlockSize: bs, Logger: slog.New(slog.DiscardHandler), flushInterval: time.Hour})
		if err != nil {
			b.Fatal(err)
		}
		return c
	}
	src := newSrc(size, 7)
	from := open(b.TempDir())
	defer from.Close()
	r := from.Reader(src.key(), size, src)
	if err := r.Download(context.Background(), DownloadOptions{}); err != nil {
		b.Fatal(err)
	}
	var data bytes.Buffer
	e, _, err := from.ExportBlob(src.key(), &data, -1, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("export", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			if _, _, err := from.ExportBlob(src.key(), io.Discard, -1, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("import", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			b.StopTimer()
			to := open(b.TempDir())
			b.StartTimer()
			res, err := to.ImportBlob(context.Background(), e, bytes.NewReader(data.Bytes()))
			if err != nil || !res.Verified {
				b.Fatalf("%+v %v", res, err)
			}
			b.StopTimer()
			to.Close()
			b.StartTimer()
		}
	})
}

// A cache with smaller blocks than the snapshot's imports it, and one reopened with a smaller block size keeps
// what it held.
func TestSmallerBlocks(t *testing.T) {
	open := func(dir string, bs int64) *Cache {
		c, err := Open(Options{Dir: dir, CapacityBytes: 1 << 30, BlockSize: bs, Logger: slog.New(slog.DiscardHandler), flushInterval: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	dir := t.TempDir()
	from := open(dir, 4*testBS)
	src := newSrc(10*testBS+5, 31)
	r := from.Reader(src.key(), int64(len(src.data)), src)
	checkRead(t, r, src, 0, 2*testBS)          // block 0 of 4 testBS
	checkRead(t, r, src, 8*testBS, 2*testBS+5) // block 2, short
	var data bytes.Buffer
	e, _, err := from.ExportBlob(src.key(), &data, -1, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := from.Close(); err != nil {
		t.Fatal(err)
	}

	to := open(t.TempDir(), testBS)
	defer to.Close()
	if res, err := to.ImportBlob(context.Background(), e, bytes.NewReader(data.Bytes())); err != nil || res.Imported != 2 {
		t.Fatalf("import of 4-block blocks into 1-block blocks: %+v, %v", res, err)
	}
	reopened := open(dir, testBS)
	defer reopened.Close()
	for _, c := range []*Cache{to, reopened} {
		calls := src.calls.Load()
		rr := c.Reader(src.key(), int64(len(src.data)), src)
		checkRead(t, rr, src, 0, 4*testBS)
		checkRead(t, rr, src, 8*testBS, 2*testBS+5)
		if n := src.calls.Load() - calls; n != 0 {
			t.Errorf("%d source reads of blocks held in larger blocks", n)
		}
		checkRead(t, rr, src, 4*testBS, testBS) // never cached
		if n := src.calls.Load() - calls; n != 1 {
			t.Errorf("%d source reads, want 1 for the block never cached", n)
		}
	}
	// Whole, then imported into smaller blocks that are partly there: verified by reading back.
	full := newSrc(8*testBS, 32)
	from2 := open(t.TempDir(), 4*testBS)
	defer from2.Close()
	checkRead(t, from2.Reader(full.key(), int64(len(full.data)), full), full, 0, len(full.data))
	data.Reset()
	e2, _, err := from2.ExportBlob(full.key(), &data, -1, nil)
	if err != nil {
		t.Fatal(err)
	}
	checkRead(t, to.Reader(full.key(), int64(len(full.data)), full), full, testBS, 10)
	if res, err := to.ImportBlob(context.Background(), e2, bytes.NewReader(data.Bytes())); err != nil || !res.Verified {
		t.Fatalf("import of a whole blob partly present in smaller blocks: %+v, %v", res, err)
	}
}

// A read of blocks an import is storing waits for the store, then reads them from disk; if the store failed, it
// fetches them from its source.
func TestReadWaitsForDirectStore(t *testing.T) {
	for _, stored := range []bool{true, false} {
		t.Run(fmt.Sprintf("stored=%v", stored), func(t *testing.T) {
			c := openTest(t, t.TempDir(), 1<<20, nil)
			defer c.Close()
			src := newSrc(4*testBS, 5)
			r := c.Reader(src.key(), int64(len(src.data)), src)
			own, err := r.claimFitting(0, 1, true)
			if err != nil || len(own) != 1 || !own[0].direct {
				t.Fatalf("claim: %v %+v", err, own)
			}
			p := make([]byte, 2*testBS)
			read := make(chan error, 1)
			go func() {
				_, err := r.ReadAt(p, 0)
				read <- err
			}()
			for { // until the read has pinned its blocks: it found them in flight
				r.b.mu.Lock()
				pinned := len(r.b.pins) > 0
				r.b.mu.Unlock()
				if pinned {
					break
				}
				time.Sleep(time.Millisecond)
			}
			select {
			case err := <-read:
				t.Fatalf("the read did not wait for the store: %v", err)
			case <-time.After(20 * time.Millisecond):
			}
			if stored && !r.store(own[0], src.data[:2*testBS], 0) {
				t.Fatal("store failed")
			}
			r.settle(own[0], nil)
			if err := <-read; err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, src.data[:2*testBS]) {
				t.Fatal("the read returned wrong bytes")
			}
			if calls, want := src.calls.Load(), map[bool]int64{true: 0, false: 1}[stored]; calls != want {
				t.Fatalf("%d source reads, want %d", calls, want)
			}
			// The read's own fetch (stored=false) is stored after the read has its bytes: wait for the store.
			for deadline := time.Now().Add(10 * time.Second); !r.Cached(0, 2*testBS); time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("the blocks are not cached 10 s after the read")
				}
			}
		})
	}
}
