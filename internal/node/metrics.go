package node

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/mounter"
	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/zfile"
)

// ops is the daemon's operability: Prometheus metrics, the tracker of device reads with its audit log, and what
// the status endpoint reports. New makes it first; attach connects it to the cache and the mounter.
type ops struct {
	cfg        config.Config
	configFile string
	started    time.Time
	log        *slog.Logger

	reg   *prometheus.Registry
	reads *readTracker
	audit *os.File // the audit log file, nil when audit lines go to the daemon's log

	grpcDuration         *prometheus.HistogramVec
	grpcCalls, grpcErrs  *prometheus.CounterVec
	regDuration          *prometheus.HistogramVec
	regRequests, regErrs *prometheus.CounterVec
	regBytes             *prometheus.CounterVec

	cache   *cache.Cache     // nil until attach
	mounter *mounter.Mounter // nil until attach
	imports *importLog
}

// newOps builds the metrics and opens the audit log.
func newOps(cfg config.Config, configFile string, logger *slog.Logger) (*ops, error) {
	o := &ops{cfg: cfg, configFile: configFile, started: time.Now(), log: logger, reg: prometheus.NewRegistry(),
		imports: &importLog{path: filepath.Join(cfg.Cache.Dir, importsFile)}}
	audit := logger.With("audit", true)
	if p := cfg.Audit.Path; p != "" {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return nil, fmt.Errorf("audit log %s (audit.path): %w", p, err)
		}
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		if err != nil {
			return nil, fmt.Errorf("audit log %s (audit.path): %w", p, err)
		}
		o.audit = f
		audit = slog.New(slog.NewTextHandler(f, nil))
	}
	o.reads = newReadTracker(cfg.Audit.SlowRead(), cfg.Audit.HungRead(), audit)

	o.grpcDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "obd_grpc_request_duration_seconds",
		Help:    "Latency of the snapshots API calls containerd makes, by method.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
	}, []string{"method"})
	o.grpcCalls = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "obd_grpc_requests_total", Help: "Snapshots API calls, by method.",
	}, []string{"method"})
	o.grpcErrs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "obd_grpc_errors_total",
		Help: "Snapshots API calls that returned an error, by method and gRPC code (AlreadyExists from Prepare is how a lazy pull skips a download).",
	}, []string{"method", "code"})
	o.regDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "obd_registry_request_duration_seconds",
		Help:    "Latency of registry HTTP requests (one per attempt, including the body), by operation.",
		Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
	}, []string{"op"})
	o.regRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "obd_registry_requests_total", Help: "Registry HTTP requests (attempts), by operation and status class (2xx … 5xx, or \"error\" when no answer came).",
	}, []string{"op", "class"})
	o.regErrs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "obd_registry_errors_total", Help: "Registry HTTP requests that failed (no answer, a status other than 2xx, or a broken body), by operation and status class.",
	}, []string{"op", "class"})
	o.regBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "obd_registry_bytes_total", Help: "Body bytes received from registries, by operation.",
	}, []string{"op"})

	cs := []prometheus.Collector{
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		o.grpcDuration, o.grpcCalls, o.grpcErrs, o.regDuration, o.regRequests, o.regErrs, o.regBytes,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "obd_build_info", Help: "Always 1; the labels name the obd-snapshotter build.",
			ConstLabels: prometheus.Labels{"version": status.Version(), "go_version": status.GoVersion()},
		}, func() float64 { return 1 }),
		nodeCollector{o},
	}
	cs = append(cs, o.reads.collectors()...)
	for _, c := range cs {
		if err := o.reg.Register(c); err != nil {
			o.close()
			return nil, fmt.Errorf("metrics: %w", err)
		}
	}
	return o, nil
}

// attach connects the metrics and the status endpoint to the node's cache and mounter.
func (o *ops) attach(c *cache.Cache, m *mounter.Mounter) {
	o.cache, o.mounter = c, m
	o.reads.known = func() map[string]string {
		refs := map[string]string{}
		for _, img := range m.Images() {
			refs[img.ID] = img.ImageRef
		}
		return refs
	}
}

func (o *ops) close() error {
	if o.audit != nil {
		return o.audit.Close()
	}
	return nil
}

// observeRegistry is the registry clients' Options.Observer.
func (o *ops) observeRegistry(op string, code int, n int64, d time.Duration, err error) {
	class := "error"
	if code > 0 {
		class = strconv.Itoa(code/100) + "xx"
	}
	o.regRequests.WithLabelValues(op, class).Inc()
	o.regDuration.WithLabelValues(op).Observe(d.Seconds())
	if n > 0 {
		o.regBytes.WithLabelValues(op).Add(float64(n))
	}
	if err != nil || code < 200 || code > 299 {
		o.regErrs.WithLabelValues(op, class).Inc()
	}
}

// unaryInterceptor measures the snapshots API calls and logs the failed ones (their errors name the snapshot,
// the image and the cause).
func (o *ops) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := handler(ctx, req)
	method := path.Base(info.FullMethod)
	o.grpcDuration.WithLabelValues(method).Observe(time.Since(start).Seconds())
	o.grpcCalls.WithLabelValues(method).Inc()
	if err != nil {
		code := grpcstatus.Code(err)
		o.grpcErrs.WithLabelValues(method, code.String()).Inc()
		args := []any{"method", method, "code", code.String(), "error", err}
		switch code {
		case codes.AlreadyExists, codes.NotFound: // the protocol's normal answers (lazy pull, existence checks)
			o.log.DebugContext(ctx, "snapshots API call answered with an error", args...)
		default:
			o.log.WarnContext(ctx, "snapshots API call failed", args...)
		}
	}
	return resp, err
}

// nodeCollector reads the cache's and the mounter's state at scrape time.
type nodeCollector struct{ o *ops }

var (
	descCacheHits      = prometheus.NewDesc("obd_cache_hits_total", "Blocks served from the block cache.", nil, nil)
	descCacheMisses    = prometheus.NewDesc("obd_cache_misses_total", "Blocks not in the block cache: fetched from registries (or waited for while another read fetched them).", nil, nil)
	descCacheEvictions = prometheus.NewDesc("obd_cache_evictions_total", "Blocks dropped from the block cache for capacity or because they failed a checksum.", nil, nil)
	descCacheEvicted   = prometheus.NewDesc("obd_cache_evicted_bytes_total", "Bytes dropped from the block cache.", nil, nil)
	descCacheFetched   = prometheus.NewDesc("obd_cache_fetched_bytes_total", "Bytes the block cache read from registries.", nil, nil)
	descCacheStoreFail = prometheus.NewDesc("obd_cache_store_failures_total", "Fetched runs that could not be stored in the block cache (disk errors, capacity held by reads).", nil, nil)
	descCacheUsed      = prometheus.NewDesc("obd_cache_used_bytes", "Bytes of blocks held by the block cache.", nil, nil)
	descCacheCapacity  = prometheus.NewDesc("obd_cache_capacity_bytes", "The block cache's bound ([cache] size_gb).", nil, nil)
	descCacheBlobs     = prometheus.NewDesc("obd_cache_blobs", "Blobs with blocks in the block cache.", nil, nil)
	descCachePrefetch  = prometheus.NewDesc("obd_cache_prefetched_blocks_total", "Blocks fetched ahead of demand: by the prefetch of a recorded start (kind prefetch) or by readahead (kind readahead).", []string{"kind"}, nil)
	descCacheAheadHits = prometheus.NewDesc("obd_cache_prefetch_hits_total", "Reads of blocks that prefetch or readahead brought, counted once per block.", nil, nil)
	descPredecoded     = prometheus.NewDesc("obd_predecoded_blocks_total", "ZFile blocks decoded ahead of a start's reads (the image's recorded or learned start).", nil, nil)
	descPredecodeHits  = prometheus.NewDesc("obd_predecode_hits_total", "Device reads that took their bytes from blocks decoded ahead.", nil, nil)
	descPrimed         = prometheus.NewDesc("obd_primed_bytes_total", "Bytes of starts read into the page cache ahead of the containers' reads, by kind (file data, or filesystem metadata through the block device).", []string{"kind"}, nil)
	descImages         = prometheus.NewDesc("obd_images", "Overlaybd images of the device service, by state (attaching, attached, failed) and mode (lazy, local, mixed).", []string{"state", "mode"}, nil)
	descImageFetched   = prometheus.NewDesc("obd_image_registry_bytes", "Bytes fetched from registries for each attached image (reference and mount id) since it was attached.", []string{"image", "id"}, nil)
)

func (c nodeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descCacheHits, descCacheMisses, descCacheEvictions, descCacheEvicted, descCacheFetched,
		descCacheStoreFail, descCacheUsed, descCacheCapacity, descCacheBlobs, descCachePrefetch, descCacheAheadHits, descPredecoded, descPredecodeHits, descPrimed, descImages, descImageFetched} {
		ch <- d
	}
}

func (c nodeCollector) Collect(ch chan<- prometheus.Metric) {
	if cc := c.o.cache; cc != nil {
		s := cc.Stats()
		used, blobs := cc.Usage()
		for _, m := range []struct {
			d *prometheus.Desc
			t prometheus.ValueType
			v int64
		}{
			{descCacheHits, prometheus.CounterValue, s.Hits},
			{descCacheMisses, prometheus.CounterValue, s.Misses},
			{descCacheEvictions, prometheus.CounterValue, s.Evictions},
			{descCacheEvicted, prometheus.CounterValue, s.EvictedBytes},
			{descCacheFetched, prometheus.CounterValue, s.BytesFetched},
			{descCacheStoreFail, prometheus.CounterValue, s.StoreFailures},
			{descCacheUsed, prometheus.GaugeValue, used},
			{descCacheCapacity, prometheus.GaugeValue, c.o.cfg.Cache.SizeGB << 30},
			{descCacheBlobs, prometheus.GaugeValue, int64(blobs)},
			{descCacheAheadHits, prometheus.CounterValue, s.PrefetchHits},
		} {
			ch <- prometheus.MustNewConstMetric(m.d, m.t, float64(m.v))
		}
		ch <- prometheus.MustNewConstMetric(descCachePrefetch, prometheus.CounterValue, float64(s.Prefetched), "prefetch")
		ch <- prometheus.MustNewConstMetric(descCachePrefetch, prometheus.CounterValue, float64(s.ReadAhead), "readahead")
	}
	if m := c.o.mounter; m != nil {
		decoded, hits := zfile.PredecodedTotals()
		ch <- prometheus.MustNewConstMetric(descPredecoded, prometheus.CounterValue, float64(decoded))
		ch <- prometheus.MustNewConstMetric(descPredecodeHits, prometheus.CounterValue, float64(hits))
		files, meta := mounter.PrimedTotals()
		ch <- prometheus.MustNewConstMetric(descPrimed, prometheus.CounterValue, float64(files), "file")
		ch <- prometheus.MustNewConstMetric(descPrimed, prometheus.CounterValue, float64(meta), "metadata")
		type key struct{ state, mode string }
		counts := map[key]int{}
		for _, img := range m.Images() {
			counts[key{img.State, layersMode(img.Layers)}]++
			if img.State == mounter.StateAttached {
				var n int64
				for _, l := range img.Layers {
					n += l.Registry.BytesFetched
				}
				ch <- prometheus.MustNewConstMetric(descImageFetched, prometheus.GaugeValue, float64(n), img.ImageRef, img.ID)
			}
		}
		for k, n := range counts {
			ch <- prometheus.MustNewConstMetric(descImages, prometheus.GaugeValue, float64(n), k.state, k.mode)
		}
	}
}

// layersMode says whether an image's layers are all lazy, all local, or both.
func layersMode(layers []mounter.LayerInfo) string {
	local := 0
	for _, l := range layers {
		if l.Local {
			local++
		}
	}
	switch {
	case local == 0:
		return status.ModeLazy
	case local == len(layers):
		return status.ModeLocal
	}
	return status.ModeMixed
}
