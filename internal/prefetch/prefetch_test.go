package prefetch

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/trace"
)

// identity maps layer bytes to the same blob bytes, as an uncompressed layer at blob offset 0 would.
func identity(off, n int64) (int64, int64) { return off, n }

// fakeCache records the ranges it is asked to prefetch and how many run at once.
type fakeCache struct {
	mu          sync.Mutex
	got         [][2]int64
	inflight    atomic.Int64
	maxInflight atomic.Int64
	delay       time.Duration
	err         error
	calls       atomic.Int64
}

func (f *fakeCache) Prefetch(off, n int64) error {
	f.calls.Add(1)
	cur := f.inflight.Add(1)
	for {
		m := f.maxInflight.Load()
		if cur <= m || f.maxInflight.CompareAndSwap(m, cur) {
			break
		}
	}
	time.Sleep(f.delay)
	f.inflight.Add(-1)
	f.mu.Lock()
	f.got = append(f.got, [2]int64{off, n})
	f.mu.Unlock()
	return f.err
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestPlanMergesAndKeepsRecordedOrder(t *testing.T) {
	layers := []Layer{{BlobRange: identity}, {BlobRange: func(off, n int64) (int64, int64) { return off + 1000, n }}}
	recs := []trace.Record{
		{Op: trace.Read, Layer: 1, Offset: 8192, Count: 4096},    // 0: layer 1
		{Op: trace.Read, Layer: 0, Offset: 0, Count: 4096},       // 1: layer 0, merges with 3
		{Op: trace.Write, Layer: 0, Offset: 1 << 30, Count: 512}, // writes are not fetched
		{Op: trace.Read, Layer: 0, Offset: 4096 + gap, Count: 4096},
		{Op: trace.Read, Layer: 0, Offset: 10 << 20, Count: 4096},   // far away: its own range
		{Op: trace.Read, Layer: 7, Offset: 0, Count: 4096},          // no such layer
		{Op: trace.Read, Layer: 0, Offset: 2 << 20, Count: 3 << 20}, // larger than maxRange: kept whole
	}
	got := Plan(layers, recs)
	want := []Range{
		{Layer: 1, Off: 9192, Size: 4096},
		{Layer: 0, Off: 0, Size: 4096 + gap + 4096},
		{Layer: 0, Off: 10 << 20, Size: 4096},
		{Layer: 0, Off: 2 << 20, Size: 3 << 20},
	}
	if len(got) != len(want) {
		t.Fatalf("plan %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i].Layer != want[i].Layer || got[i].Off != want[i].Off || got[i].Size != want[i].Size {
			t.Fatalf("range %d: %+v, want %+v (plan %+v)", i, got[i], want[i], got)
		}
	}
}

func TestStartFetchesEverythingWithBoundedConcurrency(t *testing.T) {
	fc := &fakeCache{delay: 5 * time.Millisecond}
	layers := []Layer{{BlobRange: identity, Cache: fc}}
	var recs []trace.Record
	for i := range 100 {
		recs = append(recs, trace.Record{Op: trace.Read, Offset: int64(i) * 4 << 20, Count: 4096})
	}
	j := Start(context.Background(), layers, recs, Options{Concurrency: 4, Logger: quiet()})
	j.Wait()
	p := j.Progress()
	if p.DoneRanges != 100 || p.Ranges != 100 || p.Running || p.Err != "" || p.DoneBytes != 100*4096 {
		t.Fatalf("progress %+v", p)
	}
	if m := fc.maxInflight.Load(); m > 4 || m < 2 {
		t.Fatalf("%d ranges in flight at once, want up to 4 (and some parallelism)", m)
	}
}

func TestStartStopsWhenTheCacheIsFull(t *testing.T) {
	fc := &fakeCache{err: cache.ErrFull}
	var recs []trace.Record
	for i := range 50 {
		recs = append(recs, trace.Record{Op: trace.Read, Offset: int64(i) * 4 << 20, Count: 4096})
	}
	j := Start(context.Background(), []Layer{{BlobRange: identity, Cache: fc}}, recs, Options{Concurrency: 2, Logger: quiet()})
	j.Wait()
	if p := j.Progress(); p.Err != "cache full" || p.DoneRanges != 0 {
		t.Fatalf("progress %+v", p)
	}
	if n := fc.calls.Load(); n > 4 {
		t.Fatalf("%d prefetches after the cache was full", n)
	}
}

func TestStopCancels(t *testing.T) {
	fc := &fakeCache{delay: 20 * time.Millisecond}
	var recs []trace.Record
	for i := range 1000 {
		recs = append(recs, trace.Record{Op: trace.Read, Offset: int64(i) * 4 << 20, Count: 4096})
	}
	j := Start(context.Background(), []Layer{{BlobRange: identity, Cache: fc}}, recs, Options{Concurrency: 2, Logger: quiet()})
	time.Sleep(50 * time.Millisecond)
	j.Stop()
	p := j.Progress()
	if p.Running || p.Err != "cancelled" || p.DoneRanges >= 1000 {
		t.Fatalf("progress after Stop %+v", p)
	}
	calls := fc.calls.Load()
	time.Sleep(50 * time.Millisecond)
	if fc.calls.Load() != calls {
		t.Fatal("prefetches went on after Stop returned")
	}
}

// While demand fetches are in progress, at most DemandShare prefetch requests run; without, Concurrency.
func TestSharesTheLinkWithDemand(t *testing.T) {
	fc := &fakeCache{delay: 20 * time.Millisecond}
	var demand atomic.Int64
	demand.Store(1)
	var recs []trace.Record
	for i := range 40 {
		recs = append(recs, trace.Record{Op: trace.Read, Offset: int64(i) * 4 << 20, Count: 4096})
	}
	j := Start(context.Background(), []Layer{{BlobRange: identity, Cache: fc}}, recs,
		Options{Concurrency: 8, Demand: demand.Load, Logger: quiet()})
	time.Sleep(MaxYield / 4)
	if m := fc.maxInflight.Load(); m > DemandShare || fc.calls.Load() == 0 {
		t.Fatalf("while a demand fetch ran: %d prefetches, %d at once; want some, at most %d at once", fc.calls.Load(), m, DemandShare)
	}
	demand.Store(0)
	j.Wait()
	if n := fc.calls.Load(); n != 40 {
		t.Fatalf("%d prefetches, want 40", n)
	}
	if m := fc.maxInflight.Load(); m <= DemandShare {
		t.Fatalf("without demand at most %d prefetches ran at once, want up to 8", m)
	}
}
