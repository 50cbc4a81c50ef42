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

// Warm fills the cache with an image that is not attached: the ranges of a recorded start, then the whole blob,
// checked against its digest; the image then mounts and reads with the registry gone.
func TestWarm(t *testing.T) {
	blob, err := os.ReadFile(blobPath())
	if err != nil {
		t.Fatal(err)
	}
	s := newSetup(t)
	reg := newFakeRegistry(t, blob)
	c := s.openCacheReadahead(16<<10, -1)
	m := s.newMounter(mounterOptions{registry: reg, cache: c})
	layers := []snapshotter.Layer{reg.layer()}

	recs := []trace.Record{{Op: trace.Read, Offset: 0, Count: 64 << 10}}
	res, err := m.Warm(context.Background(), layers, WarmOptions{Trace: recs})
	if err != nil || res.Bytes == 0 || res.Done != res.Bytes {
		t.Fatalf("warm with a trace: %+v, %v", res, err)
	}
	if used, _ := c.Usage(); used == 0 || used >= int64(len(blob)) {
		t.Fatalf("after warming a trace the cache holds %d of %d bytes: want a part", used, len(blob))
	}
	var last [2]int64
	res, err = m.Warm(context.Background(), layers, WarmOptions{All: true, Progress: func(d, n int64) { last = [2]int64{d, n} }})
	if err != nil || res.Verified != 1 || res.Done != int64(len(blob)) || last != [2]int64{int64(len(blob)), int64(len(blob))} {
		t.Fatalf("warm all: %+v, %v, last progress %v", res, err, last)
	}
	if len(m.Images()) != 0 {
		t.Fatalf("warm attached an image: %+v", m.Images())
	}
	// Idempotent: nothing more is fetched.
	before := reg.served.Load()
	if _, err := m.Warm(context.Background(), layers, WarmOptions{All: true}); err != nil || reg.served.Load() != before {
		t.Fatalf("second warm: %v, fetched %d bytes", err, reg.served.Load()-before)
	}

	reg.down.Store(true)
	target := filepath.Join(s.root, "mnt")
	if err := s.mount(m, "warm", layers, target); err != nil {
		t.Fatal(err)
	}
	if b, err := readWithin(t, filepath.Join(target, "hello"), time.Minute); err != nil || !bytes.Equal(b, helloBinary(t)) {
		t.Fatalf("read of a warmed image with the registry gone: %v", err)
	}
	if reg.unavail.Load() != 0 {
		t.Fatalf("%d requests went to the registry after the warm", reg.unavail.Load())
	}
}
