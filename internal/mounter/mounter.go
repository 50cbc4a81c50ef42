// Package mounter is the node side of an overlaybd image: it opens the image's layers (local files, or registry
// blobs read lazily through the block cache), stacks them, serves the stack as a block device and mounts its
// filesystem read-only for the snapshotter to put overlayfs on.
package mounter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/device"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/keylock"
	"github.com/obdproject/obd/internal/prefetch"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/trace"
	"github.com/opencontainers/go-digest"
)

// Options configure a Mounter.
type Options struct {
	// Frontend turns a layer stack into a block device.
	Frontend device.Frontend
	// StateDir is where the frontend keeps per-device files; keep it stable across restarts.
	StateDir string
	// TurboDir, if set, holds the metadata of the attached images' TurboOCI layers (else they are held in memory);
	// New empties it.
	TurboDir string
	// Cache holds fetched blob ranges; nil reads straight from the registry.
	Cache *cache.Cache
	// Registry returns the client to use for a registry host.
	Registry func(host string) (*registry.Client, error)
	// FSType is the filesystem on an image's disk when its layers do not say (blob-fs-type); default ext4.
	FSType string
	// PrefetchConcurrency is the number of range requests in flight while a recorded start is prefetched
	// (default prefetch.DefaultConcurrency).
	PrefetchConcurrency int
	// MetadataBytes, if positive, makes the attach of an image without a recorded start prefetch its filesystem
	// metadata (inode tables, directories), up to that many bytes of blob ranges (see startMetadataPrefetch).
	MetadataBytes int64
	// Preload, when set, makes Preload open a pulled image's layers and prefetch its recorded start before a
	// container asks for the image (see snapshotter.Preloader).
	Preload bool
	// StartsDir holds what each image's last start on this node read (see LearnWindow); PredecodeBytes bounds the
	// blocks of an image's start decoded ahead of its reads. Starts are learned and decoded ahead only when both
	// are set; a recorded start is decoded ahead when PredecodeBytes is.
	StartsDir      string
	PredecodeBytes int64
	// PrimePageCache reads a start's file data and filesystem metadata into the page cache as it begins, at most
	// PredecodeBytes (see prime.go).
	PrimePageCache bool
	// Download, when Enable is set, downloads the blobs of each attached image into the cache in the background
	// (after the prefetch of its recorded start, if any, and Delay), each checked against its digest.
	Download DownloadOptions
	Logger   *slog.Logger
}

// DownloadOptions configure the background download of attached images.
type DownloadOptions struct {
	Enable            bool
	Delay             time.Duration
	MaxBytesPerSecond int64 // per image; 0: unbounded
	Concurrency       int   // range requests in flight per blob (default 1)
}

// Mounter implements snapshotter.ImageMounter.
type Mounter struct {
	opts Options
	// locks serializes the Mount and Unmount calls of each image, which wait for registries; images of different
	// ids never wait for each other.
	locks  keylock.Locks
	mu     sync.Mutex          // guards images, never held across I/O
	images map[string]*mounted // by image id
	// preloads are the preloads of images not attached yet, by image id; guarded by mu.
	preloads map[string]*preload
	track    tracker      // what Images reports; never waits for mu
	turboSeq atomic.Int64 // names the TurboDir extractions
	// predecodeSlots holds a token per start being decoded ahead (see maxPredecoding).
	predecodeSlots chan struct{}
	// attachSlots holds a token per image being decoded ahead on its attach (see decodeOnAttach).
	attachSlots chan struct{}
}

func (m *Mounter) image(id string) *mounted {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.images[id]
}

func (m *Mounter) setImage(id string, img *mounted) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if img == nil {
		delete(m.images, id)
	} else {
		m.images[id] = img
	}
}

type mounted struct {
	dev     *device.Device
	fs      fsType // the filesystem on its disk
	targets map[string]bool
	openMu  sync.Mutex                       // guards files and blobs while the layers are opened
	reuse   map[digest.Digest]*registry.Blob // registry blobs to open the layers with (a preload's), by digest
	files   []io.Closer
	blobs   []*registry.Blob
	layers  []layerSource // per layer, bottom first: where its bytes come from (for Images)

	upper    *upper        // a container's writable layer on top, or nil (read-only)
	prefetch *prefetch.Job // the prefetch of its recorded start, or nil
	rec      *recording    // the recording of its layer reads, or nil
	download *download     // the background download of its blobs, or nil
	opened   []*image.Layer
	stack    *lsmt.Stack // the layers' stack the device serves

	// What a container's start over the image follows and learns (see beginStart): the recorded start it was
	// attached with, or the file of its learned start (""); the learning of the current start, which the reads
	// see (nil when none), and the decoding ahead of the current start (nil when none).
	replay      []trace.Record
	learnPath   string
	startLayers []trace.StartLayer
	learn       atomic.Pointer[learning]
	predecode   *predecoding
	priming     *priming       // the priming of the page cache with the current start (see prime.go), or nil
	planning    *priming       // the planning of that priming by the image's attach, or nil
	primeMu     sync.Mutex     // held while a priming plan is made: a start waits for its attach's
	primed      *primedFiles   // the file extents the image's last priming plan found (guarded by primeMu)
	keeping     sync.WaitGroup // the writes of its decoded start in flight (see keepDecoded)
}

// New returns a Mounter.
func New(opts Options) *Mounter {
	if opts.FSType == "" {
		opts.FSType = "ext4"
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.TurboDir != "" {
		// What a previous process extracted: its images are attached again from the cache.
		if err := os.RemoveAll(opts.TurboDir); err != nil {
			opts.Logger.Warn("cannot empty the TurboOCI metadata directory", "dir", opts.TurboDir, "err", err)
		}
	}
	return &Mounter{opts: opts, images: map[string]*mounted{}, preloads: map[string]*preload{},
		predecodeSlots: make(chan struct{}, maxPredecoding), attachSlots: make(chan struct{}, 1)}
}

var _ snapshotter.ImageMounter = (*Mounter)(nil)

// Mount makes the virtual disk of layers available read-only at target. It is idempotent: a mounted image is
// mounted again only if its mount went away, and an attached device is reused.
func (m *Mounter) Mount(ctx context.Context, id string, layers []snapshotter.Layer, target string) error {
	return m.MountTrace(ctx, id, layers, target, "")
}

var _ snapshotter.TraceMounter = (*Mounter)(nil)

// MountTrace is Mount with a trace file, taken when the image's device is attached (see snapshotter.TraceMounter):
// an empty file records the image's layer reads into it, a trace file is prefetched into the cache at once.
func (m *Mounter) MountTrace(ctx context.Context, id string, layers []snapshotter.Layer, target, traceFile string) error {
	defer m.locks.Lock(id)()
	img := m.image(id)
	if img == nil {
		m.track.attaching(id, layers)
		var err error
		if img, err = m.attach(ctx, id, layers, traceFile, nil); err != nil {
			m.track.failed(id, err)
			return err
		}
		m.setImage(id, img)
	}
	err := os.MkdirAll(target, 0o755)
	if err == nil {
		if err = img.dev.Mount(ctx, target, img.fs.name, append([]string{"ro"}, img.fs.opts...)); err != nil {
			err = fmt.Errorf("image %s: mount %s (%s) at %s: %w", id, img.dev.Path, img.fs.name, target, err)
		}
	}
	if err != nil {
		m.mountFailed(ctx, id, img, err)
		return err
	}
	img.targets[target] = true
	m.track.attached(id, img)
	return nil
}

// mountFailed records the failed mount of image id and, when the image is mounted nowhere, detaches its device: it
// is not kept attached for an Unmount that may never come.
func (m *Mounter) mountFailed(ctx context.Context, id string, img *mounted, err error) {
	if len(img.targets) > 0 {
		return
	}
	m.setImage(id, nil)
	img.stopPriming()
	if derr := m.opts.Frontend.Detach(context.WithoutCancel(ctx), id); derr != nil {
		m.opts.Logger.Warn("detaching an image after its mount failed", "image", id, "err", derr)
	}
	img.close()
	m.track.failed(id, err)
}

// attach opens the layers and attaches their stack as a device, read-only, or writable with wl on top; with a trace
// file it starts recording into it or prefetching it (see MountTrace).
func (m *Mounter) attach(ctx context.Context, id string, layers []snapshotter.Layer, traceFile string, wl *snapshotter.WritableLayer) (*mounted, error) {
	start := time.Now()
	fs, err := m.fsOf(layers)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", id, err)
	}
	if wl != nil && fs.name != "ext4" {
		return nil, fmt.Errorf("container layer %s: a writable layer needs an ext4 image, this one is %s (use rw_mode overlayfs)", id, fs.name)
	}
	img := &mounted{fs: fs, targets: map[string]bool{}}
	replay, record := m.readTraceFile(id, traceFile)
	pre := m.takePreload(id)
	if pre != nil {
		<-pre.opened
		// The attach reads the layers through the preload's registry blobs: its traffic counts as the image's.
		img.reuse = map[digest.Digest]*registry.Blob{}
		for _, b := range pre.img.blobs {
			img.reuse[b.Digest()] = b
		}
		if pre.job != nil && len(replay) > 0 && pre.trace == traceFile {
			img.prefetch = pre.job
		} else if pre.job != nil {
			pre.job.Stop() // the container records a trace, or names another
		}
	}
	if record {
		img.rec = newRecording(traceFile, m.opts.Logger.With("image", id))
	}
	if !record {
		img.replay, img.startLayers = replay, startLayers(layers)
		if len(replay) == 0 {
			img.learnPath = m.learnedPath(layers)
		}
	}
	var observe func(i int) func(off, n int64)
	switch {
	case img.rec != nil:
		observe = func(i int) func(off, n int64) { return func(off, n int64) { img.rec.r.Read(i, off, n) } }
	case img.learnPath != "":
		observe = func(i int) func(off, n int64) {
			return func(off, n int64) {
				if l := img.learn.Load(); l != nil {
					l.observe(i, off, n)
				}
			}
		}
	}
	opened, i, err := m.openLayers(ctx, img, layers, observe)
	if err != nil {
		img.close()
		l := layers[i]
		m.opts.Logger.Error("cannot open layer of overlaybd image", "image", id, "ref", l.ImageRef, "layer", layerName(l), "index", i, "err", err)
		return nil, fmt.Errorf("image %s: layer %d (%s): %w", id, i, layerName(l), err)
	}
	files := make([]*lsmt.File, len(layers))
	for i, ol := range opened {
		files[i] = ol.File
	}
	var rw *lsmt.RW
	if wl != nil {
		if img.upper, err = openUpper(wl.Dir, true); err != nil {
			img.close()
			return nil, fmt.Errorf("container layer %s: %w", id, err)
		}
		img.upper.quota = wl.Quota
		rw = img.upper.rw
	}
	stack, err := lsmt.NewStack(files, rw)
	if err != nil {
		img.close()
		return nil, fmt.Errorf("image %s: %w", id, err)
	}
	img.stack = stack
	var backend device.Backend = stackBackend{Stack: stack, id: id, layers: layers}
	if img.upper != nil {
		backend = writableBackend{stackBackend{Stack: stack, id: id, layers: layers}, img.upper}
	}
	img.dev, err = m.opts.Frontend.Attach(ctx, id, backend, device.AttachOptions{ReadOnly: img.upper == nil, StateDir: m.opts.StateDir})
	if err != nil {
		img.close()
		m.opts.Logger.Error("cannot attach device of overlaybd image", "image", id, "ref", imageRefOf(layers), "err", err)
		return nil, fmt.Errorf("image %s: attach device: %w", id, err)
	}
	if img.upper != nil {
		if err := prepareFS(ctx, img.dev.Path, stack, wl.Quota > 0); err != nil {
			if derr := m.opts.Frontend.Detach(context.WithoutCancel(ctx), id); derr != nil {
				m.opts.Logger.Warn("detaching a container layer after its preparation failed", "id", id, "err", derr)
			}
			img.close()
			return nil, fmt.Errorf("container layer %s on %s: %w", id, img.dev.Path, err)
		}
	}
	m.opts.Logger.Info("attached overlaybd image", "image", id, "device", img.dev.Path, "layers", len(layers), "virtual_size", stack.VirtualSize(),
		"attach_ms", time.Since(start).Milliseconds())
	switch {
	case len(replay) > 0 && img.prefetch == nil:
		img.prefetch = m.startPrefetch(context.Background(), id, img, opened, replay)
	case img.prefetch == nil && img.rec == nil && m.opts.MetadataBytes > 0 && m.opts.Cache != nil && fs.name == "ext4":
		img.prefetch = m.startMetadataPrefetch(id, img, layers, opened, stack)
	}
	img.opened = opened
	if wl != nil {
		m.beginStart(id, img) // a container's own device: attached for its start
	} else {
		m.decodeOnAttach(id, img)
	}
	// Upstream does not download while it records a trace: the trace would miss what the download brought.
	if m.opts.Download.Enable && img.rec == nil && m.opts.Cache != nil {
		img.download = m.startDownload(id, img)
	}
	return img, nil
}

// readTraceFile reads the trace file of an image with upstream's conventions: an empty file asks for recording,
// a trace file for a prefetch; anything else is logged and ignored.
func (m *Mounter) readTraceFile(id, path string) (replay []trace.Record, record bool) {
	if path == "" {
		return nil, false
	}
	b, err := os.ReadFile(path)
	switch {
	case err != nil:
		m.opts.Logger.Warn("cannot read the image's trace file: no prefetch, no recording", "image", id, "path", path, "err", err)
		return nil, false
	case len(b) == 0:
		return nil, true
	}
	recs, err := trace.Decode(b)
	if err != nil {
		m.opts.Logger.Warn("the image's trace file is not a trace: no prefetch", "image", id, "path", path, "err", err)
		return nil, false
	}
	return recs, false
}

// startPrefetch starts prefetching recs into the cache for the layers of img (remote layers only: local ones have
// nothing to fetch).
func (m *Mounter) startPrefetch(ctx context.Context, id string, img *mounted, opened []*image.Layer, recs []trace.Record) *prefetch.Job {
	layers := m.prefetchLayers(img, opened)
	opts := prefetch.Options{Concurrency: m.opts.PrefetchConcurrency, Logger: m.opts.Logger.With("image", id)}
	if m.opts.Cache != nil {
		opts.Demand = m.opts.Cache.DemandFetches
	}
	m.opts.Logger.Info("prefetching the image's recorded start", "image", id, "records", len(recs))
	return prefetch.Start(ctx, layers, recs, opts)
}

// fsType is the filesystem on an image's disk and its mount options.
type fsType struct {
	name string
	opts []string
}

// fsOf returns the filesystem of the image of layers: the blob-fs-type label of its top layer that has one,
// "fstype[;mountopts[;mkfsopts]]" (upstream's annotation), else Options.FSType. ext4 and erofs are mounted.
func (m *Mounter) fsOf(layers []snapshotter.Layer) (fsType, error) {
	fs := fsType{name: m.opts.FSType}
	for i := len(layers) - 1; i >= 0; i-- {
		v := layers[i].FsType
		if v == "" {
			continue
		}
		parts := strings.Split(v, ";")
		fs.name = parts[0]
		if len(parts) > 1 && parts[1] != "" {
			fs.opts = strings.Split(parts[1], ",")
		}
		break
	}
	switch fs.name {
	case "ext4", "erofs":
	default:
		return fs, fmt.Errorf("filesystem %q (blob-fs-type): obd mounts ext4 and erofs images", fs.name)
	}
	for _, o := range fs.opts {
		// The image chooses them, the host mounts them: only options that change how its own bytes read (not, for
		// erofs, device= or fsid=, which would bring host devices or shared caches into the container's view).
		if !slices.Contains(safeMountOpts, o) && !strings.HasPrefix(o, "cache_strategy=") {
			return fs, fmt.Errorf("mount option %q of the image's blob-fs-type is not allowed", o)
		}
	}
	return fs, nil
}

// safeMountOpts are the mount options an image may ask for (with cache_strategy= for erofs): extended attributes
// and ACLs, and restrictions.
var safeMountOpts = []string{"user_xattr", "nouser_xattr", "acl", "noacl", "nodev", "nosuid", "noexec", "noatime", "relatime"}

// prefetchLayers returns the layers of img as a prefetch sees them.
func (m *Mounter) prefetchLayers(img *mounted, opened []*image.Layer) []prefetch.Layer {
	layers := make([]prefetch.Layer, len(opened))
	for i, ol := range opened {
		layers[i] = prefetch.Layer{BlobRange: ol.BlobRange, Cache: noPrefetch{}}
		if c := img.layers[i].cache; c != nil {
			layers[i].Cache = c
		}
	}
	return layers
}

// noPrefetch is the prefetch target of a layer without a cache (local, or no cache configured): nothing to do.
type noPrefetch struct{}

func (noPrefetch) Prefetch(int64, int64) error { return nil }

// openTail bounds the end of a layer blob fetched while the layer is opened (a 16th of the blob, at least 64 KiB):
// the ZFile trailer and jump table and the LSMT index of layers up to a few GiB.
const openTail = 512 << 10

// maxOpening bounds the layers of one image opened at once.
const maxOpening = 8

// openLayers opens the layers of an image, several at once (on a cold cache each open waits for a round trip or
// two: the layer's header, then its index), and sets img.layers. observe, if set, returns the observer of layer
// i's reads (see openLayer). On failure it returns the index of a layer that failed and its error.
func (m *Mounter) openLayers(ctx context.Context, img *mounted, layers []snapshotter.Layer, observe func(i int) func(off, n int64)) ([]*image.Layer, int, error) {
	img.layers = make([]layerSource, len(layers))
	opened := make([]*image.Layer, len(layers))
	errs := make([]error, len(layers))
	sem := make(chan struct{}, maxOpening)
	var wg sync.WaitGroup
	for i, l := range layers {
		var obs func(off, n int64)
		if observe != nil {
			obs = observe(i)
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			opened[i], errs[i] = m.openLayer(ctx, img, i, l, obs)
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			return nil, i, err
		}
	}
	return opened, 0, nil
}

// openLayer opens layer i of img: the local file when it was downloaded, else the registry blob through the
// cache. observe, if set, sees the layer's reads once it is open.
func (m *Mounter) openLayer(ctx context.Context, img *mounted, i int, l snapshotter.Layer, observe func(off, n int64)) (*image.Layer, error) {
	if l.LocalPath != "" {
		f, err := os.Open(l.LocalPath)
		if err != nil {
			return nil, err
		}
		img.openMu.Lock()
		img.files = append(img.files, f)
		img.openMu.Unlock()
		st, err := f.Stat()
		if err != nil {
			return nil, err
		}
		img.layers[i] = layerSource{layer: l}
		return image.OpenLayer(annotate(f, l), st.Size(), image.LayerOptions{Observe: observe})
	}
	if l.ImageRef == "" {
		return nil, errors.New("neither a local file nor an image reference to fetch it from (pull with 'obd pull')")
	}
	ref, err := image.ParseRef(l.ImageRef)
	if err != nil {
		return nil, err
	}
	if ref.Transport != image.TransportRegistry {
		return nil, fmt.Errorf("image reference %s is not a registry reference", l.ImageRef)
	}
	client, err := m.opts.Registry(ref.Host())
	if err != nil {
		return nil, err
	}
	if l.Target != "" {
		return m.openTurbo(ctx, img, i, l, client, ref, observe)
	}
	blob := img.reuse[l.Digest]
	if blob == nil {
		if blob, err = client.Blob(ctx, ref.Host(), ref.Repository(), l.Digest, l.Size); err != nil {
			return nil, err
		}
	}
	img.openMu.Lock()
	img.blobs = append(img.blobs, blob)
	img.openMu.Unlock()
	var r io.ReaderAt = refetcher{blob}
	src := layerSource{layer: l, blob: blob}
	if m.opts.Cache != nil {
		src.cache = m.opts.Cache.Reader(l.Digest, blob.Size(), blob)
		r = src.cache
		// Opening reads the blob's header, then its index at the end: fetch the end meanwhile, so that a cold
		// open waits for one round trip, not two.
		tail := min(openTail, max(64<<10, blob.Size()/16))
		go src.cache.Prefetch(max(0, blob.Size()-tail), tail)
	}
	img.layers[i] = src
	return image.OpenLayer(annotate(r, l), blob.Size(), image.LayerOptions{Verify: true, Observe: observe})
}

// openTurbo opens TurboOCI layer i of img: its metadata blob is fetched whole (it is small: no file data) and
// checked against its digest; its original blob is read lazily through the cache, which is also what a background
// download fills and verifies, and a trace's prefetch fetches ahead. Its trace records (observe) are ranges of the
// original's uncompressed tar.
func (m *Mounter) openTurbo(ctx context.Context, img *mounted, i int, l snapshotter.Layer, client *registry.Client, ref image.Ref, observe func(off, n int64)) (*image.Layer, error) {
	mb, err := client.Blob(ctx, ref.Host(), ref.Repository(), l.Digest, l.Size)
	if err != nil {
		return nil, err
	}
	var mr io.ReaderAt = refetcher{mb}
	if m.opts.Cache != nil {
		mr = m.opts.Cache.Reader(l.Digest, mb.Size(), mb)
	}
	// The blob is read whole and checked against its digest at its end; bad bytes are evicted from the cache.
	blob := &digestReader{r: io.NewSectionReader(mr, 0, mb.Size()), v: l.Digest.Verifier(), want: l.Digest, evict: func() {
		if ev, ok := mr.(interface{ Evict(off, n int64) error }); ok {
			ev.Evict(0, mb.Size())
		}
	}}
	var tm *image.TurboMeta
	if m.opts.TurboDir != "" {
		// On disk, not in memory: a large layer's gzip index is tens of megabytes. Removed when the image is detached.
		dir := filepath.Join(m.opts.TurboDir, fmt.Sprintf("%d-%s", m.turboSeq.Add(1), l.Digest.Encoded()))
		tm, err = image.ExtractTurboMeta(blob, dir)
	} else {
		tm, err = image.ReadTurboMeta(blob)
	}
	if err != nil {
		return nil, fmt.Errorf("TurboOCI metadata blob %s: %w", l.Digest, err)
	}
	img.openMu.Lock()
	img.files = append(img.files, tm)
	img.openMu.Unlock()
	size, known, err := tm.TargetSize()
	if err != nil {
		return nil, err
	}
	if !known {
		size = -1 // an uncompressed original: asked from the registry
	}
	tb := img.reuse[l.Target]
	if tb == nil {
		if tb, err = client.Blob(ctx, ref.Host(), ref.Repository(), l.Target, size); err != nil {
			return nil, fmt.Errorf("TurboOCI original blob: %w", err)
		}
	}
	img.openMu.Lock()
	img.blobs = append(img.blobs, mb, tb)
	img.openMu.Unlock()
	var r io.ReaderAt = refetcher{tb}
	src := layerSource{layer: l, blob: tb}
	if m.opts.Cache != nil {
		src.cache = m.opts.Cache.Reader(l.Target, tb.Size(), tb)
		r = src.cache
	}
	img.layers[i] = src
	return image.OpenTurboLayer(tm, r, tb.Size(), observe)
}

// digestReader reads a blob and fails at its end when the bytes do not match its digest (evicting them).
type digestReader struct {
	r     io.Reader
	v     digest.Verifier
	want  digest.Digest
	evict func()
}

func (d *digestReader) Read(p []byte) (int, error) {
	n, err := d.r.Read(p)
	d.v.Write(p[:n])
	if err == io.EOF && !d.v.Verified() {
		d.evict()
		return n, fmt.Errorf("blob does not match its digest %s", d.want)
	}
	return n, err
}

// Unmount unmounts target and, when the image has no mount left, detaches its device.
func (m *Mounter) Unmount(ctx context.Context, id string, target string) error {
	defer m.locks.Lock(id)()
	if pre := m.takePreload(id); pre != nil {
		pre.stop()
	}
	img := m.image(id)
	if img != nil {
		img.stopPriming() // it holds files of the filesystem open, and its plan reads the device
	}
	if target != "" {
		if err := device.Unmount(target); err != nil {
			return fmt.Errorf("image %s: %w", id, err)
		}
	}
	if img == nil {
		// Not attached by this process (e.g. before a restart): detach whatever the frontend still has.
		m.track.remove(id)
		return m.opts.Frontend.Detach(ctx, id)
	}
	delete(img.targets, target)
	if len(img.targets) > 0 {
		m.track.attached(id, img)
		return nil
	}
	m.setImage(id, nil)
	m.track.remove(id)
	err := m.opts.Frontend.Detach(ctx, id)
	if cerr := img.close(); cerr != nil {
		m.opts.Logger.Error("detached a container layer that did not close cleanly", "id", id, "err", cerr)
		err = errors.Join(err, cerr)
	}
	m.opts.Logger.Info("detached overlaybd image", "image", id)
	return err
}

// Stats reports per image the bytes fetched from registries.
func (m *Mounter) Stats() map[string]registry.BlobStats {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]registry.BlobStats{}
	for id, img := range m.images {
		var s registry.BlobStats
		for _, b := range img.blobs {
			bs := b.Stats()
			s.Requests += bs.Requests
			s.BytesFetched += bs.BytesFetched
			s.Retries += bs.Retries
			s.Errors += bs.Errors
		}
		out[id] = s
	}
	return out
}

// stopPriming stops the priming of the page cache with the image's start, and its planning; it may be called again.
func (img *mounted) stopPriming() {
	ps := []*priming{img.priming, img.planning}
	for _, p := range ps {
		if p != nil {
			p.cancel() // both first: a start's priming may wait for the plan its attach is making
		}
	}
	for _, p := range ps {
		if p != nil {
			p.stop()
		}
	}
}

// close stops the image's download and prefetch, writes its recorded trace and closes its files; it returns the
// error of closing a writable layer (whose writes are then not all durable).
func (img *mounted) close() error {
	if img.download != nil {
		img.download.stop()
	}
	if img.prefetch != nil {
		img.prefetch.Stop()
	}
	if img.rec != nil {
		img.rec.finish()
	}
	img.stopPriming()
	if img.predecode != nil {
		img.predecode.stop()
	}
	img.keeping.Wait() // the decoded start being written: it does not outlive the image
	if l := img.learn.Load(); l != nil {
		l.finish()
	}
	var err error
	if img.upper != nil {
		if err = img.upper.close(); err != nil {
			err = fmt.Errorf("close writable layer %s: %w", img.upper.data.Name(), err)
		}
	}
	for _, f := range img.files {
		f.Close()
	}
	return err
}

// stackBackend serves a layer stack to a device frontend; its read errors name the image (see ReadAt).
type stackBackend struct {
	*lsmt.Stack
	id     string
	layers []snapshotter.Layer
}

func (b stackBackend) Size() int64 { return b.VirtualSize() }

// refetcher lets a ZFile block that fails its check be read again from the registry when there is no cache (the
// ZFile reader re-reads only through an Evicter): a corruption in transit then costs a retry, not an EIO.
type refetcher struct{ *registry.Blob }

// Evict does nothing: nothing is kept, so the next read fetches the range again.
func (refetcher) Evict(off, n int64) error { return nil }
