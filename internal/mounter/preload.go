package mounter

import (
	"context"
	"time"

	"github.com/obdproject/obd/internal/prefetch"
	"github.com/obdproject/obd/internal/snapshotter"
)

var _ snapshotter.Preloader = (*Mounter)(nil)

// preload is the work Preload started for an image that is not attached yet.
type preload struct {
	cancel context.CancelFunc
	trace  string        // the trace file it was given, or ""
	opened chan struct{} // closed when the layers are opened (or failed to) and img and job are set
	img    *mounted      // what the preload opened (its registry blobs count the preload's traffic)
	job    *prefetch.Job // the prefetch of the image's recorded start, or nil
}

// stop ends the preload and waits for its requests in flight.
func (p *preload) stop() {
	p.cancel()
	<-p.opened
	if p.job != nil {
		p.job.Stop()
	}
}

// Preload opens the layers of image id in the background, which fetches their headers and indexes into the cache,
// and with a trace file (an acceleration layer's or a registered profile) starts prefetching the recorded start,
// as an attach would (see snapshotter.Preloader). It does nothing when Options.Preload is off, when the node has
// no cache, or when id is attached or preloading already (unless this call brings a trace file the running preload
// lacks: a pull commits an image's acceleration layer after its last overlaybd layer). An attach of id takes the
// prefetch over; Unmount of id stops it. A failure is only logged: the attach opens the layers again and reports
// it.
func (m *Mounter) Preload(id string, layers []snapshotter.Layer, traceFile string) {
	if !m.opts.Preload || m.opts.Cache == nil {
		return
	}
	for _, l := range layers {
		if l.LocalPath != "" {
			return // downloaded: nothing to fetch
		}
	}
	m.mu.Lock()
	old := m.preloads[id]
	if m.images[id] != nil || (old != nil && (traceFile == "" || old.trace != "")) {
		m.mu.Unlock()
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &preload{cancel: cancel, trace: traceFile, opened: make(chan struct{})}
	m.preloads[id] = p
	m.mu.Unlock()
	if old != nil {
		go old.stop()
	}
	go func() {
		defer close(p.opened)
		start := time.Now()
		replay, _ := m.readTraceFile(id, traceFile)
		if len(replay) == 0 {
			// Nothing to prefetch: open only the top layer. A pull commits the layers bottom first, and the
			// preloads of the chains below opened the others; opening them again at once would look like a
			// sequential reader to the cache and fetch ahead.
			layers = layers[len(layers)-1:]
		}
		img := &mounted{}
		p.img = img
		opened, i, err := m.openLayers(ctx, img, layers, nil)
		if err != nil {
			m.opts.Logger.Debug("preload: cannot open a layer; the attach will try again", "image", id, "index", i, "err", err)
			return
		}
		m.opts.Logger.Debug("preload: layers opened", "image", id, "layers", len(layers), "took", time.Since(start).Round(time.Millisecond))
		if len(replay) > 0 && ctx.Err() == nil {
			p.job = m.startPrefetch(ctx, id, img, opened, replay)
		}
	}()
}

// takePreload removes the preload of id from the Mounter and returns it, or nil.
func (m *Mounter) takePreload(id string) *preload {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.preloads[id]
	delete(m.preloads, id)
	return p
}
