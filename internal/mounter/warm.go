package mounter

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/prefetch"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/trace"
)

// WarmOptions say what Warm brings into the cache.
type WarmOptions struct {
	// All fetches the layers' whole blobs, each checked against its digest; else Trace's ranges are fetched.
	All   bool
	Trace []trace.Record
	// Progress, if set, is called now and then with the bytes done and to do.
	Progress func(done, total int64)
}

// WarmResult says what Warm did.
type WarmResult struct {
	Bytes    int64 // bytes of the ranges or blobs asked for
	Done     int64 // of which are now cached
	Verified int   // blobs complete and checked against their digests (All)
}

// warmLayers is how many layers Warm downloads at once (as containerd's pull, three).
const warmLayers = 3

// ErrNoCache means the node runs without a block cache: there is nothing to warm.
var ErrNoCache = errors.New("this node has no block cache")

// Warm fills the cache with an image's blocks without attaching it: its whole blobs, or the ranges of a recorded
// start. Blocks already cached are not fetched again; nothing cached is evicted: when the image does not fit, it
// fails with an error wrapping cache.ErrFull after filling what fits.
func (m *Mounter) Warm(ctx context.Context, layers []snapshotter.Layer, opts WarmOptions) (WarmResult, error) {
	var res WarmResult
	if m.opts.Cache == nil {
		return res, ErrNoCache
	}
	img := &mounted{}
	defer img.close()
	for i, l := range layers {
		if l.LocalPath != "" {
			return res, fmt.Errorf("layer %d (%s) is a local file: nothing to warm", i, layerName(l))
		}
	}
	opened, i, err := m.openLayers(ctx, img, layers, nil)
	if err != nil {
		return res, fmt.Errorf("layer %d (%s): %w", i, layerName(layers[i]), err)
	}
	progress := opts.Progress
	if progress == nil {
		progress = func(int64, int64) {}
	}
	if !opts.All {
		pl := make([]prefetch.Layer, len(opened))
		for i, ol := range opened {
			pl[i] = prefetch.Layer{BlobRange: ol.BlobRange, Cache: img.layers[i].cache}
		}
		job := prefetch.Start(ctx, pl, opts.Trace, prefetch.Options{Concurrency: m.opts.PrefetchConcurrency,
			Demand: m.opts.Cache.DemandFetches, Logger: m.opts.Logger})
		done := make(chan struct{})
		go func() { job.Wait(); close(done) }()
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for running := true; running; {
			select {
			case <-done:
				running = false
			case <-t.C:
			}
			p := job.Progress()
			progress(p.DoneBytes, p.Bytes)
		}
		p := job.Progress()
		res.Bytes, res.Done = p.Bytes, p.DoneBytes
		switch p.Err {
		case "":
			return res, nil
		case "cache full":
			return res, fmt.Errorf("%w: the recorded start needs %d bytes, %d fitted", cache.ErrFull, p.Bytes, p.DoneBytes)
		default:
			return res, fmt.Errorf("prefetch: %s", p.Err)
		}
	}

	present := make([]atomic.Int64, len(img.layers))
	for _, s := range img.layers {
		res.Bytes += s.cache.Size() // a TurboOCI layer's is its original blob's
	}
	var mu sync.Mutex
	report := func() {
		var d int64
		for i := range present {
			d += present[i].Load()
		}
		mu.Lock()
		progress(d, res.Bytes)
		mu.Unlock()
	}
	conc := m.opts.Download.Concurrency
	if conc <= 0 {
		conc = 8
	}
	// Up to warmLayers layers at once: a layer's last requests and its digest do not leave the link idle.
	errs := make([]error, len(img.layers))
	var verified atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, warmLayers)
	for i, s := range img.layers {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			errs[i] = fmt.Errorf("layer %d (%s): %w", i, layerName(s.layer), ctx.Err())
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			err := s.cache.Download(ctx, cache.DownloadOptions{Concurrency: conc, Demand: m.opts.Cache.DemandFetches,
				Progress: func(p int64) { present[i].Store(p); report() }})
			if err != nil {
				errs[i] = fmt.Errorf("layer %d (%s): %w", i, layerName(s.layer), err)
				return
			}
			present[i].Store(s.cache.Size())
			verified.Add(1)
		})
	}
	wg.Wait()
	res.Verified = int(verified.Load())
	for i := range present {
		res.Done += present[i].Load()
	}
	report()
	return res, errors.Join(errs...)
}
