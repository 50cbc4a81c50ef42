package mounter

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/trace"
)

// Record a start into an empty trace file (upstream's protocol: PATH.lock while recording, PATH.ok when written),
// then replay it on a node with an empty cache: the recorded blocks are fetched right after the device is attached,
// and the same start then reads nothing from the registry.
func TestRecordAndReplayTrace(t *testing.T) {
	blob, err := os.ReadFile(blobPath())
	if err != nil {
		t.Fatal(err)
	}
	want := helloBinary(t)
	tracePath := filepath.Join(t.TempDir(), "trace")
	if err := os.WriteFile(tracePath, nil, 0o644); err != nil {
		t.Fatal(err)
	}

	t.Run("record", func(t *testing.T) {
		s := newSetup(t)
		reg := newFakeRegistry(t, blob)
		m := s.newMounter(mounterOptions{registry: reg, cache: s.openCache(16 << 10)})
		target := filepath.Join(s.root, "mnt")
		if err := m.MountTrace(context.Background(), "rec", []snapshotter.Layer{reg.layer()}, target, tracePath); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(tracePath + ".lock"); err != nil {
			t.Fatalf("no lock file while recording: %v", err)
		}
		if imgs := m.Images(); len(imgs) != 1 || imgs[0].Recording != tracePath {
			t.Fatalf("Images = %+v: want the recording shown", imgs)
		}
		if b, err := readWithin(t, filepath.Join(target, "hello"), time.Minute); err != nil || !bytes.Equal(b, want) {
			t.Fatalf("read /hello: %v", err)
		}
		// Removing the lock ends the recording, as upstream's record-trace does.
		if err := os.Remove(tracePath + ".lock"); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			if _, err := os.Stat(tracePath + ".ok"); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("no .ok file after the lock was removed")
			}
			time.Sleep(20 * time.Millisecond)
		}
		if imgs := m.Images(); len(imgs) != 1 || imgs[0].Recording != "" {
			t.Fatalf("Images = %+v: want the recording over", imgs)
		}
		if err := m.Unmount(context.Background(), "rec", target); err != nil {
			t.Fatal(err)
		}
	})
	b, err := os.ReadFile(tracePath)
	if err != nil {
		t.Fatal(err)
	}
	recs, err := trace.Decode(b)
	if err != nil || len(recs) == 0 {
		t.Fatalf("recorded trace: %d records, %v", len(recs), err)
	}
	tb, err := os.ReadFile(tracePath + trace.TimesSuffix)
	if err != nil {
		t.Fatal(err)
	}
	if tm, err := trace.DecodeTimes(tb, len(recs)); err != nil || tm.Started.IsZero() {
		t.Fatalf("times of the recorded trace: %+v, %v", tm, err)
	}

	t.Run("replay", func(t *testing.T) {
		s := newSetup(t)
		reg := newFakeRegistry(t, blob)
		// No readahead: every registry request after the prefetch would be a read the trace missed.
		m := s.newMounter(mounterOptions{registry: reg, cache: s.openCacheReadahead(16<<10, -1)})
		target := filepath.Join(s.root, "mnt")
		if err := m.MountTrace(context.Background(), "play", []snapshotter.Layer{reg.layer()}, target, tracePath); err != nil {
			t.Fatal(err)
		}
		m.mu.Lock()
		job := m.images["play"].prefetch
		m.mu.Unlock()
		if job == nil {
			t.Fatal("no prefetch for an image with a trace")
		}
		job.Wait()
		p := m.Images()[0].Prefetch
		if p == nil || p.Err != "" || p.DoneRanges != p.Ranges || p.Ranges == 0 {
			t.Fatalf("prefetch progress %+v", p)
		}
		before := reg.requests.Load()
		if b, err := readWithin(t, filepath.Join(target, "hello"), time.Minute); err != nil || !bytes.Equal(b, want) {
			t.Fatalf("read /hello: %v", err)
		}
		if n := reg.requests.Load() - before; n != 0 {
			t.Fatalf("the replayed start still made %d registry requests", n)
		}
		if err := m.Unmount(context.Background(), "play", target); err != nil {
			t.Fatal(err)
		}
	})

	// A pull's preload opens the layers and prefetches the trace before any container; the attach then takes the
	// prefetch over and reads nothing from the registry, nor does the start.
	t.Run("preload", func(t *testing.T) {
		s := newSetup(t)
		reg := newFakeRegistry(t, blob)
		m := s.newMounter(mounterOptions{registry: reg, cache: s.openCacheReadahead(16<<10, -1), preload: true})
		layers := []snapshotter.Layer{reg.layer()}
		m.Preload("pre", layers, tracePath)
		m.Preload("pre", layers, tracePath) // a second commit of the chain: nothing more
		m.mu.Lock()
		pre := m.preloads["pre"]
		m.mu.Unlock()
		if pre == nil {
			t.Fatal("no preload")
		}
		<-pre.opened
		if pre.job == nil {
			t.Fatal("the preload of an image with a trace does not prefetch it")
		}
		pre.job.Wait()
		before := reg.requests.Load()
		target := filepath.Join(s.root, "mnt")
		if err := m.MountTrace(context.Background(), "pre", layers, target, tracePath); err != nil {
			t.Fatal(err)
		}
		m.mu.Lock()
		adopted := m.images["pre"].prefetch == pre.job && len(m.preloads) == 0
		m.mu.Unlock()
		if !adopted {
			t.Fatal("the attach did not take the preload's prefetch over")
		}
		if b, err := readWithin(t, filepath.Join(target, "hello"), time.Minute); err != nil || !bytes.Equal(b, want) {
			t.Fatalf("read /hello: %v", err)
		}
		if n := reg.requests.Load() - before; n != 0 {
			t.Fatalf("attach and start after the preload made %d registry requests", n)
		}
		if err := m.Unmount(context.Background(), "pre", target); err != nil {
			t.Fatal(err)
		}

		// Removing an image that was pulled but never attached stops its preload.
		m.Preload("gone", layers, tracePath)
		if err := m.Unmount(context.Background(), "gone", filepath.Join(s.root, "never-mounted")); err != nil {
			t.Fatal(err)
		}
		m.mu.Lock()
		left := len(m.preloads)
		m.mu.Unlock()
		if left != 0 {
			t.Fatalf("%d preloads left after Unmount", left)
		}
	})
}

// A cold open fetches the end of the layer blob (its index) while it reads the header, instead of one after the
// other.
func TestColdOpenFetchesHeaderAndIndexAtOnce(t *testing.T) {
	blob, err := os.ReadFile(blobPath())
	if err != nil {
		t.Fatal(err)
	}
	if len(blob) < 256<<10 {
		t.Fatalf("the test blob has %d bytes: its header and its end are one range", len(blob))
	}
	s := newSetup(t)
	reg := newFakeRegistry(t, blob)
	reg.delay = 200 * time.Millisecond
	// No readahead: its requests would overlap the open's.
	m := s.newMounter(mounterOptions{registry: reg, cache: s.openCacheReadahead(16<<10, -1)})
	target := filepath.Join(s.root, "mnt")
	if err := m.Mount(context.Background(), "cold", []snapshotter.Layer{reg.layer()}, target); err != nil {
		t.Fatal(err)
	}
	if n := reg.maxInflight.Load(); n < 2 {
		t.Errorf("at most %d request in flight while the layer was opened; want its header and end at once", n)
	}
	if err := m.Unmount(context.Background(), "cold", target); err != nil {
		t.Fatal(err)
	}
}
