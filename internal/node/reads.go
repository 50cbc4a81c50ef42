package node

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/obdproject/obd/internal/device"
)

// readTracker follows the reads the kernel sends to the image devices: it feeds the device metrics, counts reads
// per image for the status endpoint, and writes the audit log of slow and hung reads.
type readTracker struct {
	slow, hung time.Duration
	audit      *slog.Logger
	known      func() map[string]string // device (image) id → image reference, of the devices that exist

	duration             prometheus.Histogram
	reads, bytes, errors prometheus.Counter
	slowReads            prometheus.Counter

	mu       sync.Mutex
	seq      uint64
	inflight map[uint64]*inflightRead
	images   map[string]*imageReads // by device (image) id
	total    imageReads             // all devices
}

type inflightRead struct {
	id        string
	off, n    int64
	start     time.Time
	hungNoted bool // the audit log has a line about it
}

// imageReads counts the reads of one device.
type imageReads struct {
	reads, bytes, errors, slow int64
}

func newReadTracker(slow, hung time.Duration, audit *slog.Logger) *readTracker {
	return &readTracker{
		slow: slow, hung: hung, audit: audit,
		known: func() map[string]string { return nil },
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "obd_device_read_duration_seconds",
			Help: "Latency of the reads the kernel sends to image devices (FUSE requests served from cache or registry).",
			// From a page of the block cache (~50µs) to a registry read that retries (tens of seconds).
			Buckets: prometheus.ExponentialBuckets(0.00005, 4, 11),
		}),
		reads:     prometheus.NewCounter(prometheus.CounterOpts{Name: "obd_device_reads_total", Help: "Reads the kernel sent to image devices."}),
		bytes:     prometheus.NewCounter(prometheus.CounterOpts{Name: "obd_device_read_bytes_total", Help: "Bytes the kernel asked image devices for."}),
		errors:    prometheus.NewCounter(prometheus.CounterOpts{Name: "obd_device_read_errors_total", Help: "Device reads that failed with EIO."}),
		slowReads: prometheus.NewCounter(prometheus.CounterOpts{Name: "obd_device_slow_reads_total", Help: "Device reads that took [audit] slow_read_ms or longer (each one is in the audit log)."}),
		inflight:  map[uint64]*inflightRead{},
		images:    map[string]*imageReads{},
	}
}

var _ device.ReadObserver = (*readTracker)(nil).observe

// collectors returns the tracker's metrics, including the gauges computed at scrape time.
func (t *readTracker) collectors() []prometheus.Collector {
	return []prometheus.Collector{
		t.duration, t.reads, t.bytes, t.errors, t.slowReads,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "obd_device_reads_in_flight", Help: "Device reads being served now."},
			func() float64 { n, _ := t.pending(); return float64(n) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "obd_device_hung_reads",
			Help: "Device reads in flight for [audit] hung_read_ms or longer: a registry that does not answer, or a stuck backend."},
			func() float64 { _, h := t.pending(); return float64(h) }),
	}
}

// observe is the device.ReadObserver of the daemon's FuseLoop.
func (t *readTracker) observe(id string, off, n int64) func(int, error) {
	r := &inflightRead{id: id, off: off, n: n, start: time.Now()}
	t.mu.Lock()
	t.seq++
	seq := t.seq
	t.inflight[seq] = r
	t.mu.Unlock()
	return func(_ int, err error) {
		d := time.Since(r.start)
		t.mu.Lock()
		delete(t.inflight, seq)
		im := t.images[id]
		if im == nil {
			im = &imageReads{}
			t.images[id] = im
		}
		slow := t.slow > 0 && d >= t.slow
		for _, c := range []*imageReads{im, &t.total} {
			c.reads++
			c.bytes += n
			if err != nil {
				c.errors++
			}
			if slow {
				c.slow++
			}
		}
		t.mu.Unlock()
		t.duration.Observe(d.Seconds())
		t.reads.Inc()
		t.bytes.Add(float64(n))
		if err != nil {
			t.errors.Inc()
		}
		if slow {
			t.slowReads.Inc()
			args := []any{"image", t.known()[id], "image_id", id, "offset", off, "length", n, "latency_ms", d.Milliseconds()}
			if err != nil {
				args = append(args, "err", err)
			}
			t.audit.Warn("slow device read", args...)
		}
	}
}

// pending counts the reads in flight and those of them that are hung.
func (t *readTracker) pending() (inflight, hung int) {
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, r := range t.inflight {
		if now.Sub(r.start) >= t.hung {
			hung++
		}
	}
	return len(t.inflight), hung
}

// readCounts is what the status endpoint reports about the reads of one image, or of all.
type readCounts struct {
	imageReads
	inflight, hung int64
}

// counts returns the counters per device id and for all devices.
func (t *readTracker) counts() (map[string]readCounts, readCounts) {
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]readCounts, len(t.images))
	for id, im := range t.images {
		out[id] = readCounts{imageReads: *im}
	}
	all := readCounts{imageReads: t.total}
	for _, r := range t.inflight {
		c := out[r.id]
		c.inflight++
		all.inflight++
		if now.Sub(r.start) >= t.hung {
			c.hung++
			all.hung++
		}
		out[r.id] = c
	}
	return out, all
}

// forget drops the counters of the devices that are gone.
func (t *readTracker) forget() {
	known := t.known()
	t.mu.Lock()
	defer t.mu.Unlock()
	for id := range t.images {
		if _, ok := known[id]; !ok {
			delete(t.images, id)
		}
	}
}

// watch writes an audit line for every read that becomes hung, once, and drops the counters of detached
// devices, until ctx ends. startServers owns it.
func (t *readTracker) watch(ctx context.Context) {
	tick := time.NewTicker(min(max(t.hung/4, 50*time.Millisecond), time.Second))
	defer tick.Stop()
	lastForget := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if time.Since(lastForget) > time.Minute {
			t.forget()
			lastForget = time.Now()
		}
		var hung []inflightRead
		now := time.Now()
		t.mu.Lock()
		for _, r := range t.inflight {
			if !r.hungNoted && now.Sub(r.start) >= t.hung {
				r.hungNoted = true
				hung = append(hung, *r)
			}
		}
		t.mu.Unlock()
		if len(hung) == 0 {
			continue
		}
		known := t.known()
		for _, r := range hung {
			t.audit.Error("device read hung", "image", known[r.id], "image_id", r.id, "offset", r.off, "length", r.n,
				"waiting_ms", now.Sub(r.start).Milliseconds())
		}
	}
}
