// Package prefetch fetches what a container's start is known to read — the ranges of a recorded trace — into the
// block cache ahead of demand, with several range requests in flight, so that a cold start pays a few round trips
// instead of one per page fault.
package prefetch

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/trace"
)

// Layer is one layer of an image as the prefetcher sees it.
type Layer struct {
	// BlobRange maps bytes of the layer file (the space of trace records) to the range of the blob holding them
	// (image.Layer.BlobRange).
	BlobRange func(off, n int64) (int64, int64)
	// Cache brings blob ranges into the block cache (cache.Reader.Prefetch).
	Cache interface{ Prefetch(off, n int64) error }
}

// Options tune a prefetch.
type Options struct {
	// Concurrency is the number of range requests in flight (default DefaultConcurrency).
	Concurrency int
	// Demand, if set, returns the number of demand fetches in progress: while there are any, at most DemandShare
	// prefetch requests run (a worker waits at most MaxYield before it starts a range anyway), so that demand reads
	// get most of a narrow link while the prefetch goes on.
	Demand func() int64
	// What is what the prefetch fetches, for its Progress (default WhatTrace).
	What   string
	Logger *slog.Logger
}

// What a prefetch fetches.
const (
	WhatTrace    = "recorded start"
	WhatMetadata = "filesystem metadata"
)

const (
	// DefaultConcurrency is the default number of range requests in flight.
	DefaultConcurrency = 8
	// maxRange bounds the bytes of one prefetch request; gap is the largest hole between two ranges of a layer
	// that are still fetched as one (fetching the hole costs less than a round trip at any useful link speed).
	maxRange = 1 << 20
	gap      = 64 << 10
	// MaxYield bounds how long a worker waits for demand fetches to finish before it starts a range anyway.
	MaxYield = 200 * time.Millisecond
	// DemandShare is the number of prefetch requests in flight while demand fetches are in progress. Stopping the
	// prefetch for every demand fetch (as before) starved it at 1 Gbit/s: the app's reads overtook it, and the
	// replayed start took 4.3 s for 0.48 s of bytes. With two prefetch requests beside one demand request, TCP's
	// fair share still gives the demand read a third of a narrow link.
	DemandShare = 2
)

// Range is a blob range to fetch: what a prefetch plans from a trace.
type Range struct {
	Layer     int
	Off, Size int64
	order     int // index of the first record that needs it
}

// Plan turns trace records (reads only) into blob ranges of layers: mapped through BlobRange, merged per layer
// when they overlap or lie within gap of each other (up to maxRange), ordered by the first record that needs
// each. Records of layers that do not exist are skipped.
func Plan(layers []Layer, recs []trace.Record) []Range {
	var rs []Range
	for i, rec := range recs {
		if rec.Op != trace.Read || int(rec.Layer) >= len(layers) || rec.Count == 0 {
			continue
		}
		off, n := layers[rec.Layer].BlobRange(rec.Offset, int64(rec.Count))
		if n > 0 {
			rs = append(rs, Range{Layer: int(rec.Layer), Off: off, Size: n, order: i})
		}
	}
	slices.SortFunc(rs, func(a, b Range) int {
		return cmp.Or(cmp.Compare(a.Layer, b.Layer), cmp.Compare(a.Off, b.Off))
	})
	var merged []Range
	for _, r := range rs {
		if k := len(merged) - 1; k >= 0 {
			m := &merged[k]
			end := max(m.Off+m.Size, r.Off+r.Size)
			if m.Layer == r.Layer && r.Off <= m.Off+m.Size+gap && (end-m.Off <= maxRange || r.Off+r.Size <= m.Off+m.Size) {
				m.Size, m.order = end-m.Off, min(m.order, r.order)
				continue
			}
		}
		merged = append(merged, r)
	}
	slices.SortStableFunc(merged, func(a, b Range) int { return cmp.Compare(a.order, b.order) })
	return merged
}

// Progress is the state of a prefetch.
type Progress struct {
	What               string // WhatTrace or WhatMetadata
	Ranges, DoneRanges int
	Bytes, DoneBytes   int64
	Running            bool
	Started            time.Time
	Finished           time.Time // zero while running
	Err                string    // why it stopped early ("cache full", a fetch error, "cancelled"), or ""
}

// Job is a running prefetch.
type Job struct {
	cancel context.CancelFunc
	done   chan struct{}
	what   string

	ranges     atomic.Int64
	bytes      atomic.Int64
	doneRanges atomic.Int64
	doneBytes  atomic.Int64
	started    time.Time
	mu         sync.Mutex
	finished   time.Time
	err        error
	errOnce    sync.Once
}

// Start prefetches the ranges of the trace records recs into the layers' cache in the background, in the order
// Plan gives, with Options.Concurrency requests in flight. It stops when every range is fetched, when ctx ends or
// Stop is called, when the cache is full (cache.ErrFull: the prefetch never evicts) or at the first fetch error.
func Start(ctx context.Context, layers []Layer, recs []trace.Record, opts Options) *Job {
	plan := Plan(layers, recs)
	return StartPhases(ctx, layers, func(context.Context) ([]Range, error) {
		p := plan
		plan = nil
		return p, nil
	}, opts)
}

// StartPhases is Start for ranges known only as the prefetch goes: next is called for each phase once the ranges
// of the previous one are fetched, and returns the phase's ranges (see Plan); none end the prefetch, and so does an
// error (reported as the prefetch's).
func StartPhases(ctx context.Context, layers []Layer, next func(context.Context) ([]Range, error), opts Options) *Job {
	if opts.Concurrency <= 0 {
		opts.Concurrency = DefaultConcurrency
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.What == "" {
		opts.What = WhatTrace
	}
	ctx, cancel := context.WithCancel(ctx)
	j := &Job{cancel: cancel, done: make(chan struct{}), what: opts.What, started: time.Now()}
	var inflight atomic.Int64
	go func() {
		defer close(j.done)
		for ctx.Err() == nil {
			plan, err := next(ctx)
			if err != nil {
				j.fail(err)
				break
			}
			if len(plan) == 0 {
				break
			}
			j.ranges.Add(int64(len(plan)))
			for _, r := range plan {
				j.bytes.Add(r.Size)
			}
			j.fetch(ctx, layers, plan, opts, &inflight)
		}
		if ctx.Err() != nil && j.doneRanges.Load() < j.ranges.Load() {
			j.fail(context.Canceled)
		}
		cancel()
		j.mu.Lock()
		j.finished = time.Now()
		j.mu.Unlock()
		p := j.Progress()
		l := opts.Logger.With("what", opts.What, "ranges", p.DoneRanges, "of", p.Ranges, "bytes", p.DoneBytes, "took", p.Finished.Sub(p.Started).Round(time.Millisecond))
		if p.Err != "" {
			l.Warn("prefetch stopped early", "why", p.Err)
		} else {
			l.Info("prefetch done")
		}
	}()
	return j
}

// fetch fetches plan with opts.Concurrency requests in flight; the first error cancels the job.
func (j *Job) fetch(ctx context.Context, layers []Layer, plan []Range, opts Options, inflight *atomic.Int64) {
	next := make(chan Range)
	var wg sync.WaitGroup
	for range min(opts.Concurrency, len(plan)) {
		wg.Go(func() {
			for r := range next {
				admit(ctx, opts.Demand, inflight)
				err := layers[r.Layer].Cache.Prefetch(r.Off, r.Size)
				inflight.Add(-1)
				if err != nil {
					j.fail(err)
					j.cancel()
					continue
				}
				j.doneRanges.Add(1)
				j.doneBytes.Add(r.Size)
			}
		})
	}
feed:
	for _, r := range plan {
		select {
		case next <- r:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
}

// admit waits until a worker may start a request and counts it in inflight: at once when no demand fetch is in
// progress or fewer than DemandShare prefetch requests are in flight, else when that changes, at most MaxYield.
func admit(ctx context.Context, demand func() int64, inflight *atomic.Int64) {
	deadline := time.Now().Add(MaxYield)
	for {
		n := inflight.Load()
		if demand == nil || n < DemandShare || demand() == 0 || !time.Now().Before(deadline) || ctx.Err() != nil {
			if inflight.CompareAndSwap(n, n+1) {
				return
			}
			continue
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (j *Job) fail(err error) {
	j.errOnce.Do(func() {
		j.mu.Lock()
		j.err = err
		j.mu.Unlock()
	})
}

// Stop ends the prefetch and waits for its requests in flight.
func (j *Job) Stop() {
	j.cancel()
	<-j.done
}

// Wait waits for the prefetch to end.
func (j *Job) Wait() { <-j.done }

// Progress returns the prefetch's state.
func (j *Job) Progress() Progress {
	j.mu.Lock()
	defer j.mu.Unlock()
	p := Progress{
		What:   j.what,
		Ranges: int(j.ranges.Load()), DoneRanges: int(j.doneRanges.Load()), Bytes: j.bytes.Load(), DoneBytes: j.doneBytes.Load(),
		Started: j.started, Finished: j.finished, Running: j.finished.IsZero(),
	}
	switch {
	case j.err == nil:
	case errors.Is(j.err, cache.ErrFull):
		p.Err = "cache full"
	case errors.Is(j.err, context.Canceled):
		p.Err = "cancelled"
	default:
		p.Err = j.err.Error()
	}
	return p
}
