package mounter

import (
	"fmt"
	"io"
	"maps"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	digest "github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/prefetch"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/zfile"
)

// States of an image in ImageInfo.
const (
	StateAttaching = "attaching" // its layers are being opened and its device attached
	StateAttached  = "attached"  // its device serves reads
	StateFailed    = "failed"    // its last attach or first mount failed; the next Mount tries again
)

// ImageInfo describes an image the Mounter attached, is attaching, or failed to attach.
type ImageInfo struct {
	ID       string    // the image id given to Mount
	ImageRef string    // the image reference of its layers ("" when every layer is local and unnamed)
	State    string    // StateAttaching, StateAttached or StateFailed
	Since    time.Time // when it entered State
	Error    string    // for StateFailed: the error of the attach or mount
	Device   string    // the block device, when attached
	Targets  []string  // where its filesystem is mounted
	Layers   []LayerInfo
	// Prefetch is the progress of the prefetch of its recorded start, nil when there is none.
	Prefetch *prefetch.Progress
	// Predecode is what the decoding ahead of its last start did, nil when there was none.
	Predecode *PredecodeInfo
	// Prime is what the priming of the page cache with its last start did, nil when there was none.
	Prime *PrimeInfo
	// Recording is the trace file its layer reads are recorded into, "" when they are not.
	Recording string
	// Writable describes a container's writable layer on top (MountWritable), nil for a read-only image.
	Writable *WritableInfo
}

// PredecodeInfo is what the decoding ahead of an image's start did (see Mounter.Starting).
type PredecodeInfo struct {
	Blocks       int64 // ZFile blocks decoded ahead
	BlocksLoaded int64 // blocks loaded already decoded, from what the image's last start decoded (see decoded.go)
	ReadsServed  int64 // reads that took their bytes from them
	BlocksMissed int64 // blocks the image's reads did not find decoded ahead, and decoded themselves
	Running      bool  // the blocks are still being decoded
	Held         bool  // the decoded blocks are still held for the start's reads
}

// PrimeInfo is what the priming of the page cache with an image's start did (see prime.go).
type PrimeInfo struct {
	Files         int64 // files whose data was read
	FileBytes     int64 // bytes of file data read
	MetadataBytes int64 // bytes read through the block device: the filesystem's metadata
	Running       bool
	Error         string
}

// WritableInfo describes a container's writable layer.
type WritableInfo struct {
	Dir string // holds writable_data and writable_index
	// DataBytes is the space its data file takes on disk: the container's live writes.
	DataBytes int64
	// Quota is the quota it was created with (0: none).
	Quota int64
}

// LayerInfo describes one layer of an image, bottom first.
type LayerInfo struct {
	Digest digest.Digest // "" for a locally unpacked layer without blob labels
	Size   int64
	// Local reports whether the layer is read from a downloaded file (Path) rather than lazily from the registry.
	Local bool
	Path  string
	// Registry counts the layer's registry traffic since the image was attached (zero for a local layer).
	Registry registry.BlobStats
	// CacheHits and CacheMisses count the blocks the layer's reads found in the block cache or had to fetch.
	CacheHits, CacheMisses int64
	// Download is the state of the layer's background download ("" when there is none), DownloadedBytes the
	// bytes of the blob in the cache, DownloadError why it failed.
	Download        string
	DownloadedBytes int64
	DownloadError   string
}

// Images returns the images of this Mounter, sorted by id. It never waits for a Mount or Unmount in progress.
func (m *Mounter) Images() []ImageInfo { return m.track.list() }

// layerSource is where a layer's bytes come from: a local file (blob nil) or a registry blob, through the cache
// when there is one.
type layerSource struct {
	layer snapshotter.Layer
	blob  *registry.Blob
	cache *cache.Reader
}

func (s layerSource) info() LayerInfo {
	li := LayerInfo{Digest: s.layer.Digest, Size: s.layer.Size, Local: s.blob == nil, Path: s.layer.LocalPath}
	if s.blob != nil {
		li.Registry = s.blob.Stats()
	}
	if s.cache != nil {
		li.CacheHits, li.CacheMisses = s.cache.Stats()
	}
	return li
}

// maxFailed bounds the failed images remembered for Images (the oldest are forgotten first).
const maxFailed = 64

// tracker records what Images reports. It has its own lock so that a status request never waits for a mount.
type tracker struct {
	mu     sync.Mutex
	images map[string]*tracked
}

type tracked struct {
	info    ImageInfo
	sources []layerSource // when attached
	job     *prefetch.Job // when attached with a prefetch
	dl      *download     // when attached with a background download
	rec     *recording    // when attached with a recording
	upper   *upper        // when attached with a writable layer
	pre     *predecoding  // the decoding ahead of its last start
	prime   *priming      // the priming of the page cache with its last start
}

func (t *tracker) get(id string) *tracked {
	if t.images == nil {
		t.images = map[string]*tracked{}
	}
	e := t.images[id]
	if e == nil {
		e = &tracked{info: ImageInfo{ID: id}}
		t.images[id] = e
	}
	return e
}

func (t *tracker) set(e *tracked, state string) {
	if e.info.State != state {
		e.info.State, e.info.Since = state, time.Now()
	}
}

// attaching records that id's layers are being opened.
func (t *tracker) attaching(id string, layers []snapshotter.Layer) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.get(id)
	t.set(e, StateAttaching)
	e.info.Error, e.info.Device, e.info.Targets, e.sources, e.job, e.dl, e.rec, e.upper = "", "", nil, nil, nil, nil, nil, nil
	e.info.ImageRef = imageRefOf(layers)
	e.info.Layers = make([]LayerInfo, len(layers))
	for i, l := range layers {
		e.info.Layers[i] = layerSource{layer: l}.info()
	}
}

// attached records id's device and mounts; the caller holds the Mounter's lock, which guards img.
func (t *tracker) attached(id string, img *mounted) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.get(id)
	t.set(e, StateAttached)
	e.info.Error = ""
	e.info.Device = img.dev.Path
	e.info.Targets = slices.Sorted(maps.Keys(img.targets))
	e.sources = slices.Clone(img.layers)
	e.job, e.dl, e.rec, e.upper, e.pre, e.prime = img.prefetch, img.download, img.rec, img.upper, img.predecode, img.priming
	layers := make([]snapshotter.Layer, len(img.layers))
	for i, s := range img.layers {
		layers[i] = s.layer
	}
	e.info.ImageRef = imageRefOf(layers)
}

// failed records the error of id's attach or mount.
func (t *tracker) failed(id string, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.get(id)
	t.set(e, StateFailed)
	e.info.Error, e.info.Device, e.info.Targets, e.sources, e.job, e.dl, e.rec, e.upper, e.pre, e.prime = err.Error(), "", nil, nil, nil, nil, nil, nil, nil, nil
	var failed []*tracked
	for _, e := range t.images {
		if e.info.State == StateFailed {
			failed = append(failed, e)
		}
	}
	if len(failed) > maxFailed {
		sort.Slice(failed, func(i, j int) bool { return failed[i].info.Since.Before(failed[j].info.Since) })
		for _, e := range failed[:len(failed)-maxFailed] {
			delete(t.images, e.info.ID)
		}
	}
}

// remove forgets id (detached, or its snapshot removed).
func (t *tracker) remove(id string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.images, id)
}

func (t *tracker) list() []ImageInfo {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]ImageInfo, 0, len(t.images))
	for _, e := range t.images {
		info := e.info
		info.Targets = slices.Clone(info.Targets)
		info.Layers = slices.Clone(info.Layers)
		if e.sources != nil {
			info.Layers = make([]LayerInfo, len(e.sources))
			for i, s := range e.sources {
				info.Layers[i] = s.info()
				if e.dl != nil && i < len(e.dl.layers) && e.dl.layers[i] != nil {
					ld := e.dl.layers[i]
					info.Layers[i].Download, info.Layers[i].DownloadError = ld.get()
					info.Layers[i].DownloadedBytes = ld.present.Load()
				}
			}
		}
		if e.job != nil {
			p := e.job.Progress()
			info.Prefetch = &p
		}
		if e.pre != nil {
			info.Predecode = e.pre.info()
		}
		if e.prime != nil {
			info.Prime = e.prime.info()
		}
		if e.rec != nil && !e.rec.written() {
			info.Recording = e.rec.path
		}
		if u := e.upper; u != nil {
			info.Writable = &WritableInfo{Dir: filepath.Dir(u.data.Name()), DataBytes: u.allocated(), Quota: u.quota}
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// imageRefOf returns the image reference of an image's layers: the topmost one that has one.
func imageRefOf(layers []snapshotter.Layer) string {
	for i := len(layers) - 1; i >= 0; i-- {
		if layers[i].ImageRef != "" {
			return layers[i].ImageRef
		}
	}
	return ""
}

// layerName names a layer in messages: its blob digest, else its local file.
func layerName(l snapshotter.Layer) string {
	if l.Digest != "" {
		return l.Digest.String()
	}
	if l.LocalPath != "" {
		return l.LocalPath
	}
	return "(unnamed layer)"
}

// annotate makes the read errors of a layer's source name the layer ("layer sha256:…: cause") unless they
// already do (registry and cache errors name the blob), keeping the
// source's Evict so that the ZFile reader can still re-read a block that fails its check.
func annotate(r io.ReaderAt, l snapshotter.Layer) io.ReaderAt {
	a := annotated{r: r, name: layerName(l)}
	if ev, ok := r.(zfile.Evicter); ok {
		return evictableAnnotated{a, ev}
	}
	return a
}

type annotated struct {
	r    io.ReaderAt
	name string
}

func (a annotated) ReadAt(p []byte, off int64) (int, error) {
	n, err := a.r.ReadAt(p, off)
	if err != nil && err != io.EOF && !strings.Contains(err.Error(), a.name) {
		err = fmt.Errorf("layer %s: %w", a.name, err)
	}
	return n, err
}

type evictableAnnotated struct {
	annotated
	ev zfile.Evicter
}

func (e evictableAnnotated) Evict(off, n int64) error { return e.ev.Evict(off, n) }

// ReadAt reads the image's virtual disk. Its errors name the image and the range; when the cause does not name
// a layer (a decoding error rather than a failed fetch), they list the image's layers.
func (b stackBackend) ReadAt(p []byte, off int64) (int, error) {
	n, err := b.Stack.ReadAt(p, off)
	if err == nil || err == io.EOF {
		return n, err
	}
	msg := err.Error()
	named := false
	var names []string
	for _, l := range b.layers {
		name := layerName(l)
		names = append(names, name)
		named = named || strings.Contains(msg, name)
	}
	suffix := ""
	if !named {
		suffix = " (layers bottom first: " + strings.Join(names, ", ") + ")"
	}
	return n, fmt.Errorf("image %s%s: read %d bytes at %d: %w%s", b.id, refSuffix(imageRefOf(b.layers)), len(p), off, err, suffix)
}

func refSuffix(ref string) string {
	if ref == "" {
		return ""
	}
	return " (" + ref + ")"
}
