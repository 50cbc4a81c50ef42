package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/mounter"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
)

// statusTimeout bounds the work of one status request.
const statusTimeout = 10 * time.Second

// startServers serves the status endpoint on the unix socket sc.StatusSocket() (GET /status, /healthz, /metrics)
// and, unless [metrics] address is empty, the metrics on that TCP address (GET /metrics, /healthz). It also
// starts the watch of hung device reads. stop shuts all of it down; the caller (Serve) owns it.
func (o *ops) startServers(ctx context.Context, sn *snapshotter.Snapshotter, sc config.Snapshotter) (stop func(), err error) {
	metrics := promhttp.HandlerFor(o.reg, promhttp.HandlerOpts{ErrorLog: promLogger{o}, Timeout: statusTimeout})
	healthz := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	statusMux := http.NewServeMux()
	statusMux.Handle("GET "+status.PathMetrics, metrics)
	statusMux.Handle("GET "+status.PathHealthz, healthz)
	statusMux.HandleFunc("GET "+status.PathStatus, func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), statusTimeout)
		defer cancel()
		st := o.status(ctx, sn)
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(st); err != nil {
			o.log.Debug("write status answer", "error", err)
		}
	})

	cacheAPI{o}.register(statusMux)
	// Go's profiler, for root on the node only (the socket is root's): curl --unix-socket SOCKET
	// http://obd/debug/pprof/profile?seconds=10 > cpu.pprof
	statusMux.HandleFunc("GET /debug/pprof/", pprof.Index)
	statusMux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)

	socket := sc.StatusSocket()
	sl, err := listen(socket)
	if err != nil {
		return nil, fmt.Errorf("status endpoint ([snapshotter] status_address): %w", err)
	}
	servers := []*http.Server{{Handler: statusMux, ReadHeaderTimeout: 10 * time.Second}}
	listeners := []net.Listener{sl}
	if addr := o.cfg.Metrics.Address; addr != "" {
		ml, err := net.Listen("tcp", addr)
		if err != nil {
			sl.Close()
			os.Remove(socket)
			return nil, fmt.Errorf("metrics: listen on %s: %w — set [metrics] address in %s to a free host:port, or to \"\" to serve metrics only on %s",
				addr, err, o.configFile, socket)
		}
		mux := http.NewServeMux()
		mux.Handle("GET "+status.PathMetrics, metrics)
		mux.Handle("GET "+status.PathHealthz, healthz)
		servers = append(servers, &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second})
		listeners = append(listeners, ml)
		o.log.Info("serving Prometheus metrics at /metrics", "address", ml.Addr().String())
	}
	o.log.Info("serving status endpoint (obd status, obd health)", "socket", socket)

	wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	var wg sync.WaitGroup
	for i, srv := range servers {
		wg.Go(func() {
			if err := srv.Serve(listeners[i]); err != nil && !errors.Is(err, http.ErrServerClosed) {
				o.log.Error("status or metrics server stopped", "error", err)
			}
		})
	}
	wg.Go(func() { o.reads.watch(wctx) })
	return func() {
		cancel()
		sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer scancel()
		for _, srv := range servers {
			if err := srv.Shutdown(sctx); err != nil {
				srv.Close()
			}
		}
		wg.Wait()
		if err := os.Remove(socket); err != nil && !errors.Is(err, os.ErrNotExist) {
			o.log.Warn("remove status socket", "error", err)
		}
	}, nil
}

// promLogger logs the metrics handler's errors.
type promLogger struct{ o *ops }

func (l promLogger) Println(v ...any) { l.o.log.Error("metrics: " + fmt.Sprint(v...)) }

// status gathers the document of GET /status.
func (o *ops) status(ctx context.Context, sn *snapshotter.Snapshotter) status.Status {
	cfg := o.cfg
	st := status.Status{
		Version:       status.Version(),
		GoVersion:     status.GoVersion(),
		PID:           os.Getpid(),
		Started:       o.started,
		UptimeSeconds: time.Since(o.started).Seconds(),
		Config: status.Config{
			File: o.configFile, Root: cfg.Snapshotter.Root, Address: cfg.Snapshotter.Address,
			StatusAddress: cfg.Snapshotter.StatusSocket(), MetricsAddress: cfg.Metrics.Address,
			CacheDir: cfg.Cache.Dir, CacheSizeGB: cfg.Cache.SizeGB, BlockSizeKB: cfg.Cache.BlockSizeKB,
			RetryBudget: cfg.Registry.RetryBudget, DockerConfig: dockerConfigPath(cfg.Registry),
			PlainHTTP: cfg.Registry.PlainHTTP, Insecure: cfg.Registry.Insecure, Mirrors: cfg.Registry.Mirrors,
			SlowReadMS: cfg.Audit.SlowReadMS, HungReadMS: cfg.Audit.HungReadMS, AuditPath: cfg.Audit.Path,
		},
		Cache:  status.Cache{Dir: cfg.Cache.Dir, CapacityBytes: cfg.Cache.SizeGB << 30},
		Images: []status.Image{},
	}
	if c := o.cache; c != nil {
		s := c.Stats()
		st.Cache.UsedBytes, st.Cache.Blobs = c.Usage()
		st.Cache.Hits, st.Cache.Misses, st.Cache.Evictions = s.Hits, s.Misses, s.Evictions
		st.Cache.FetchedBytes, st.Cache.StoreFailures = s.BytesFetched, s.StoreFailures
		if r := status.HitRatio(s.Hits, s.Misses); r != nil {
			st.Cache.HitRatio = *r
		}
		imports, err := o.importsStatus(ctx, sn)
		if err != nil {
			st.Warnings = append(st.Warnings, fmt.Sprintf("cannot read the cache's import log: %v", err))
		}
		st.Cache.Imports = imports
	}
	o.reads.forget()
	perImage, all := o.reads.counts()
	st.Reads = status.Reads{Total: all.reads, Errors: all.errors, Slow: all.slow, InFlight: all.inflight, Hung: all.hung}

	var attached []mounter.ImageInfo
	if o.mounter != nil {
		attached = o.mounter.Images()
	}
	byID := map[string]mounter.ImageInfo{}
	for _, img := range attached {
		byID[img.ID] = img
	}
	seen := map[string]bool{}
	images, err := sn.Status(ctx)
	if err != nil {
		st.Warnings = append(st.Warnings, fmt.Sprintf("cannot list the snapshots that containers use: %v", err))
	}
	for _, is := range images {
		img := status.Image{ID: is.Parent, ImageRef: is.ImageRef, Mode: is.Mode, Reason: is.Reason, State: status.StateNone,
			Snapshots: is.Snapshots}
		if is.MountID != "" {
			img.ID, img.State = is.MountID, status.StateNotAttached
			for _, l := range is.Layers {
				img.Layers = append(img.Layers, statusLayer(mounter.LayerInfo{Digest: l.Digest, Size: l.Size, Local: l.LocalPath != "", Path: l.LocalPath}))
			}
			if mi, ok := byID[is.MountID]; ok {
				fillFromMounter(&img, mi)
				seen[mi.ID] = true
			}
			fillReads(&img, perImage[img.ID])
		}
		for _, w := range is.Writable {
			sw := status.Writable{Snapshot: w.Key, Mode: w.Mode, State: status.StateNotAttached, DataBytes: w.Bytes, Quota: w.Quota}
			if mi, ok := byID[w.MountID]; ok {
				sw.State, sw.Device = mi.State, mi.Device
				if len(mi.Targets) > 0 {
					sw.Mountpoint = mi.Targets[0]
				}
				if mi.Writable != nil {
					sw.DataBytes = mi.Writable.DataBytes
				}
				seen[mi.ID] = true
			}
			img.Writable = append(img.Writable, sw)
		}
		st.Images = append(st.Images, img)
	}
	for _, mi := range attached {
		if seen[mi.ID] {
			continue
		}
		img := status.Image{ID: mi.ID, ImageRef: mi.ImageRef, Mode: layersMode(mi.Layers)}
		img.Reason = modeReason(img.Mode) + "; no container uses it now: its device stays attached until the image is removed"
		fillFromMounter(&img, mi)
		fillReads(&img, perImage[mi.ID])
		st.Images = append(st.Images, img)
	}
	return st
}

// modeReason explains a mode of an image the snapshotter lists no container for.
func modeReason(mode string) string {
	switch mode {
	case status.ModeLocal:
		return "every overlaybd layer was downloaded"
	case status.ModeMixed:
		return "some overlaybd layers were downloaded, the others are read from the registry on demand"
	}
	return "overlaybd layers are read from the registry on demand and kept in the block cache"
}

// fillFromMounter copies the device state and layer counters of an attached image.
func fillFromMounter(img *status.Image, mi mounter.ImageInfo) {
	img.State = mi.State
	since := mi.Since
	img.Since = &since
	img.Error, img.Device, img.Mountpoints = mi.Error, mi.Device, mi.Targets
	if img.ImageRef == "" {
		img.ImageRef = mi.ImageRef
	}
	if len(mi.Layers) > 0 {
		img.Layers = img.Layers[:0]
	}
	for _, l := range mi.Layers {
		img.Layers = append(img.Layers, statusLayer(l))
		img.BytesFetched += l.Registry.BytesFetched
		img.RegistryRequests += l.Registry.Requests
		img.RegistryErrors += l.Registry.Errors
		img.CacheHits += l.CacheHits
		img.CacheMisses += l.CacheMisses
	}
	img.CacheHitRatio = status.HitRatio(img.CacheHits, img.CacheMisses)
	img.Recording = mi.Recording
	if p := mi.Predecode; p != nil {
		img.Predecode = &status.Predecode{Blocks: p.Blocks, BlocksLoaded: p.BlocksLoaded, ReadsServed: p.ReadsServed, BlocksMissed: p.BlocksMissed, Running: p.Running, Held: p.Held}
	}
	if p := mi.Prime; p != nil {
		img.Prime = &status.Prime{Files: p.Files, FileBytes: p.FileBytes, MetadataBytes: p.MetadataBytes, Running: p.Running, Error: p.Error}
	}
	if p := mi.Prefetch; p != nil {
		end := p.Finished
		if p.Running {
			end = time.Now()
		}
		img.Prefetch = &status.Prefetch{What: p.What, Ranges: p.Ranges, DoneRanges: p.DoneRanges, Bytes: p.Bytes, DoneBytes: p.DoneBytes,
			Running: p.Running, Seconds: end.Sub(p.Started).Seconds(), Error: p.Err}
	}
}

func fillReads(img *status.Image, c readCounts) {
	img.Reads, img.ReadBytes, img.ReadErrors = c.reads, c.bytes, c.errors
	img.ReadsInFlight, img.HungReads = c.inflight, c.hung
}

func statusLayer(l mounter.LayerInfo) status.Layer {
	sl := status.Layer{Digest: l.Digest.String(), Size: l.Size, Source: "remote", BytesFetched: l.Registry.BytesFetched,
		CacheHits: l.CacheHits, CacheMisses: l.CacheMisses, Download: l.Download, DownloadedBytes: l.DownloadedBytes,
		DownloadError: l.DownloadError}
	if l.Local {
		sl.Source, sl.Path = "local", l.Path
	}
	return sl
}
