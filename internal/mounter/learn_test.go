package mounter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/snapshotter"
)

// TestLearnedStart: the reads of a container's start over an image are kept when the next start begins; that
// start has the ZFile blocks of the first decoded ahead, and its reads take them from the pool (with the right
// bytes, nothing fetched); what a start decoded is taken by the next one or kept on disk for it (decoded.go). A
// learned start moves to another node (KeepLearnedStart): there, with the cache emptied, only what is cached is
// decoded ahead, on the image's attach, and the reads fetch the rest as on any cold start.
func TestLearnedStart(t *testing.T) {
	needSystem(t)
	blob, err := os.ReadFile(blobPath())
	if err != nil {
		t.Fatal(err)
	}
	want := helloBinary(t)
	reg := newFakeRegistry(t, blob)
	s := newSetup(t)
	c := s.openCache(4096)
	opts := mounterOptions{registry: reg, cache: c, starts: filepath.Join(s.root, "starts"), predecode: 1 << 20}
	layers := []snapshotter.Layer{reg.layer()}
	target := filepath.Join(s.root, "mnt")
	// start begins a container's start and reads the file, from the device (the page cache dropped first).
	start := func(m *Mounter) *predecoding {
		t.Helper()
		m.Starting("img")
		p := m.image("img").predecode
		if p != nil {
			<-p.finished
		}
		name := filepath.Join(target, "hello")
		if f, err := os.Open(name); err == nil {
			_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
			f.Close()
		}
		if b, err := readWithin(t, name, time.Minute); err != nil || !bytes.Equal(b, want) {
			t.Fatalf("read %d bytes, %v (equal %v)", len(b), err, bytes.Equal(b, want))
		}
		return p
	}

	m := s.newMounter(opts)
	if err := s.mount(m, "img", layers, target); err != nil {
		t.Fatal(err)
	}
	// The first start has no start to follow: its pool only collects the blocks its reads decode.
	if p := start(m); p == nil {
		t.Fatal("the first start has no pool")
	} else if decoded, _ := p.pool.Stats(); decoded != 0 || p.pool.Loaded() != 0 || p.pool.Offered() == 0 {
		t.Fatalf("first start: %d blocks decoded ahead, %d loaded, %d kept from its reads", decoded, p.pool.Loaded(), p.pool.Offered())
	}
	if got := m.LearnedStarts(); len(got) != 1 || len(got[0].Layers) != 1 {
		t.Fatalf("LearnedStarts while the first start is learned: %+v", got)
	}
	// The first start's fetches are stored in the background: wait for them, as the seconds between two starts do.
	for stable, last := 0, int64(-1); stable < 3; time.Sleep(20 * time.Millisecond) {
		used, _ := c.Usage()
		if used == last && reg.inflight.Load() == 0 {
			stable++
		} else {
			stable, last = 0, used
		}
	}
	// waitFile waits for the decoded blocks of a start to be kept in a file other than old.
	blocksFile := decodedPath(m.learnedPath(layers))
	waitFile := func(old []byte) []byte {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if b, err := os.ReadFile(blocksFile); err == nil && !bytes.Equal(b, old) {
				return b
			} else if time.Now().After(deadline) {
				t.Fatalf("no new file of decoded blocks: %v", err)
			}
		}
	}
	// Once the first start's reads stop, what they decoded is kept. It is removed here: the second start decodes.
	waitFile(nil)
	if fi, err := os.Stat(blocksFile); err != nil {
		t.Fatal(err)
	} else if fi.Mode().Perm() != 0o600 {
		t.Fatalf("the file of decoded blocks (image content) has mode %v, want 0600", fi.Mode().Perm())
	}
	if err := os.Remove(blocksFile); err != nil {
		t.Fatal(err)
	}
	fetched := reg.requests.Load()
	p := start(m)
	if p == nil {
		t.Fatal("the second start does not decode ahead")
	}
	kept, recs, err := readStart(m.learnedPath(layers))
	if err != nil || len(recs) == 0 || len(kept.Layers) != 1 || kept.Layers[0].Digest != reg.dg {
		t.Fatalf("the kept start: layers %+v, %d records, %v", kept.Layers, len(recs), err)
	}

	decoded, hits := p.pool.Stats()
	if decoded == 0 || hits == 0 || p.pool.Missed() != 0 || p.pool.Loaded() != 0 {
		t.Fatalf("second start: %d blocks decoded ahead, %d loaded, %d reads served from them, %d blocks decoded by the reads", decoded, p.pool.Loaded(), hits, p.pool.Missed())
	}
	var info *PredecodeInfo
	for _, ii := range m.Images() {
		if ii.ID == "img" {
			info = ii.Predecode
		}
	}
	if info == nil || info.Blocks != decoded || info.ReadsServed != hits || info.BlocksMissed != 0 || info.Running || !info.Held {
		t.Fatalf("Images: predecode %+v, want %d blocks and %d reads, held", info, decoded, hits)
	}
	if n := reg.requests.Load() - fetched; n != 0 {
		t.Fatalf("the second start made %d registry requests", n)
	}

	// A start that begins while the pool of the one before is held takes its blocks; once its reads stop, the
	// blocks are kept on disk, and the next start loads them instead of decoding them.
	for i, from := range []string{"the start before", "the file"} {
		if i == 1 {
			waitFile(nil)
		}
		p = start(m)
		redecoded, hits := p.pool.Stats()
		if loaded := p.pool.Loaded(); loaded != decoded || redecoded != 0 || hits == 0 || p.pool.Missed() != 0 {
			t.Fatalf("a start with the blocks of %s: %d blocks loaded (%d decoded by the second start), %d decoded, %d reads served, %d decoded by the reads",
				from, loaded, decoded, redecoded, hits, p.pool.Missed())
		}
	}
	// A damaged file: the blocks before the damage are loaded, the others decoded; the reads get the right bytes.
	<-p.done // the pool dropped: the next start loads the file
	kb, err := os.ReadFile(blocksFile)
	if err != nil {
		t.Fatal(err)
	}
	kb[len(kb)-100] ^= 1
	if err := os.WriteFile(blocksFile, kb, 0o644); err != nil {
		t.Fatal(err)
	}
	p = start(m)
	redecoded, _ := p.pool.Stats()
	if loaded := p.pool.Loaded(); loaded != decoded-1 || redecoded != 1 || p.pool.Missed() != 0 {
		t.Fatalf("start with a damaged last block kept: %d blocks loaded, %d decoded, %d decoded by the reads; want %d, 1, 0", loaded, redecoded, p.pool.Missed(), decoded-1)
	}
	// The damaged file is written again: the next start loads every block.
	waitFile(kb)
	<-p.done
	if p = start(m); p.pool.Loaded() != decoded {
		t.Fatalf("after the rewrite: %d blocks loaded, want %d", p.pool.Loaded(), decoded)
	}
	if err := m.Unmount(context.Background(), "img", target); err != nil {
		t.Fatal(err)
	}
	// The second start is kept when the image is detached.
	if kept, _, err = readStart(m.learnedPath(layers)); err != nil {
		t.Fatal(err)
	}
	if got := m.LearnedStarts(); len(got) != 1 || !bytes.Equal(got[0].Trace, kept.Trace) {
		t.Fatalf("LearnedStarts = %d starts, want the one kept", len(got))
	}

	// An imported start whose blocks the cache holds is decoded into its file of decoded blocks, from the cache
	// alone; the image's attach loads them.
	opts.starts = filepath.Join(s.root, "starts-decoded")
	m = s.newMounter(opts)
	if err := m.KeepLearnedStart(kept); err != nil {
		t.Fatal(err)
	}
	fetched = reg.requests.Load()
	if err := m.DecodeStart(context.Background(), kept); err != nil {
		t.Fatal(err)
	}
	kb, err = os.ReadFile(decodedPath(m.learnedPath(layers)))
	if err != nil {
		t.Fatal(err)
	}
	n, err := readDecoded(bytes.NewReader(kb), []string{string(reg.dg)}, 1<<30, func(int, int64, []byte) error { return nil })
	if err != nil || n == 0 || reg.requests.Load() != fetched {
		t.Fatalf("DecodeStart kept %d blocks (%v) with %d registry requests", n, err, reg.requests.Load()-fetched)
	}
	if err := s.mount(m, "img", layers, target); err != nil {
		t.Fatal(err)
	}
	if ap := m.image("img").predecode; ap == nil {
		t.Fatal("the decoded import is not loaded on the attach")
	} else if <-ap.finished; ap.pool.Loaded() != int64(n) {
		t.Fatalf("the attach loaded %d blocks, want %d", ap.pool.Loaded(), n)
	}
	// The start takes them (with the blocks the attach's own reads decoded) and has nothing left to decode ahead.
	if p := start(m); p == nil {
		t.Fatal("the first start after the import has no pool")
	} else if d, hits := p.pool.Stats(); p.pool.Loaded() < int64(n) || d != 0 || hits == 0 {
		t.Fatalf("the first start after the import: %d blocks taken, %d decoded ahead, %d by the reads, %d reads served", p.pool.Loaded(), d, p.pool.Missed(), hits)
	}
	if err := m.Unmount(context.Background(), "img", target); err != nil {
		t.Fatal(err)
	}

	if _, err := c.EvictBlob(reg.dg); err != nil {
		t.Fatal(err)
	}
	// A start learned elsewhere (a cache snapshot's) is kept under the same name; a damaged one is refused.
	opts.starts = filepath.Join(s.root, "starts-imported")
	m = s.newMounter(opts)
	bad := kept
	bad.Trace = bad.Trace[:len(bad.Trace)-1]
	if err := m.KeepLearnedStart(bad); err == nil {
		t.Fatal("a damaged start was kept")
	}
	if err := m.KeepLearnedStart(kept); err != nil {
		t.Fatal(err)
	}
	if err := s.mount(m, "img", layers, target); err != nil {
		t.Fatal(err)
	}
	// Opening the layer fetches the end of its blob (index and some blocks): only those are decoded ahead, as soon
	// as the image is attached; the start takes them, with the blocks the attach's own reads decoded.
	ap := m.image("img").predecode
	if ap == nil {
		t.Fatal("an image with a learned start is not decoded ahead on its attach")
	}
	<-ap.finished
	onAttach, _ := ap.pool.Stats()
	if p := start(m); p == nil {
		t.Fatal("the learned start was lost with the Mounter")
	} else if cold, _ := p.pool.Stats(); p.pool.Loaded() < onAttach || onAttach+cold >= decoded {
		t.Fatalf("with an empty cache, %d blocks were decoded ahead on the attach and %d by the start (taking %d); %d with the cache full",
			onAttach, cold, p.pool.Loaded(), decoded)
	}
	if err := m.Unmount(context.Background(), "img", target); err != nil {
		t.Fatal(err)
	}
}

// A node keeps the learned starts of the maxStarts images it started last.
func TestPruneStarts(t *testing.T) {
	dir := t.TempDir()
	base := time.Now().Add(-time.Hour)
	name := func(i int) string { return filepath.Join(dir, fmt.Sprintf("%04d.json", i)) }
	for i := range maxStarts + 3 {
		if err := os.WriteFile(name(i), []byte("{}"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(name(i), base, base.Add(time.Duration(i)*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	pruneStarts(dir, slog.New(slog.DiscardHandler))
	left, _ := filepath.Glob(filepath.Join(dir, "*.json"))
	if len(left) != maxStarts {
		t.Fatalf("%d starts left, want %d", len(left), maxStarts)
	}
	for i := range 3 {
		if _, err := os.Stat(name(i)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("start %d, among the oldest, was kept: %v", i, err)
		}
	}
}
