package mounter

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/obdproject/obd/internal/cache"
)

// download is the background download of an image's remote blobs into the cache, one blob after another.
type download struct {
	cancel context.CancelFunc
	done   chan struct{}
	layers []*layerDownload // per layer; nil for a layer without a cache reader (local)
}

// layerDownload is the state of one blob's download, read by Images.
type layerDownload struct {
	present atomic.Int64
	mu      sync.Mutex
	state   string // DownloadWaiting, DownloadRunning, DownloadVerified or DownloadFailed
	err     string
}

// States of a layer's background download in LayerInfo.Download.
const (
	DownloadWaiting  = "waiting"
	DownloadRunning  = "downloading"
	DownloadVerified = "verified" // complete and matching its digest: served from the local cache
	DownloadFailed   = "failed"
)

func (d *layerDownload) set(state string, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.state, d.err = state, ""
	if err != nil {
		d.err = err.Error()
	}
}

func (d *layerDownload) get() (string, string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.state, d.err
}

// startDownload starts the background download of img's remote blobs: after its prefetch (if any) and the delay,
// each blob in turn, pausing while demand reads fetch, at the configured rate.
func (m *Mounter) startDownload(id string, img *mounted) *download {
	ctx, cancel := context.WithCancel(context.Background())
	d := &download{cancel: cancel, done: make(chan struct{}), layers: make([]*layerDownload, len(img.layers))}
	for i, src := range img.layers {
		if src.cache != nil {
			d.layers[i] = &layerDownload{state: DownloadWaiting}
		}
	}
	log := m.opts.Logger.With("image", id)
	opts := m.opts.Download
	job := img.prefetch
	go func() {
		defer close(d.done)
		if job != nil {
			job.Wait()
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(opts.Delay):
		}
		for i, src := range img.layers {
			ld := d.layers[i]
			if ld == nil {
				continue
			}
			ld.set(DownloadRunning, nil)
			start := time.Now()
			err := src.cache.Download(ctx, cache.DownloadOptions{
				MaxBytesPerSecond: opts.MaxBytesPerSecond,
				Concurrency:       opts.Concurrency,
				Demand:            m.opts.Cache.DemandFetches,
				Progress:          func(p int64) { ld.present.Store(p) },
			})
			switch {
			case err == nil:
				ld.set(DownloadVerified, nil)
				log.Info("blob downloaded and verified", "blob", src.layer.Digest, "took", time.Since(start).Round(time.Millisecond))
			case errors.Is(err, context.Canceled):
				ld.set(DownloadWaiting, nil)
				return
			default:
				ld.set(DownloadFailed, err)
				log.Warn("background download of a blob failed; its reads stay lazy", "blob", src.layer.Digest, "err", err)
			}
		}
	}()
	return d
}

// stop ends the download and waits for it.
func (d *download) stop() {
	d.cancel()
	<-d.done
}
