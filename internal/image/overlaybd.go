package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"sync/atomic"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/tarwrap"
	"github.com/obdproject/obd/zfile"
)

// Layer annotations of overlaybd images (they propagate to snapshot labels under the same keys).
const (
	AnnotationBlobDigest        = "containerd.io/snapshot/overlaybd/blob-digest"
	AnnotationBlobSize          = "containerd.io/snapshot/overlaybd/blob-size"
	AnnotationVersion           = "containerd.io/snapshot/overlaybd/version"
	AnnotationFsType            = "containerd.io/snapshot/overlaybd/blob-fs-type"
	AnnotationAccelerationLayer = "containerd.io/snapshot/overlaybd/acceleration-layer"
	// FormatVersion is the overlaybd version annotation obd writes.
	FormatVersion = "0.1.0"
	// TurboVersion is the version annotation of TurboOCI layers.
	TurboVersion = "0.1.0-turbo.ociv1"
	// AnnotationTurboTarget and AnnotationTurboTargetMedia name a TurboOCI layer's original layer blob, whose
	// uncompressed tar holds the files' data, and its media type.
	AnnotationTurboTarget      = "containerd.io/snapshot/overlaybd/turbo-oci/target-digest"
	AnnotationTurboTargetMedia = "containerd.io/snapshot/overlaybd/turbo-oci/target-media-type"
	// ArtifactTypeOverlaybd is the artifactType of overlaybd images pushed as referrers of their source image.
	ArtifactTypeOverlaybd = "application/vnd.containerd.overlaybd.native.v1+json"
	// ArtifactTypeTurboOCI is the artifactType of TurboOCI images pushed as referrers of their source image.
	ArtifactTypeTurboOCI = "application/vnd.containerd.overlaybd.turbo.v1+json"
)

// BlockLayer is one overlaybd layer of a manifest.
type BlockLayer struct {
	Descriptor ocispec.Descriptor
	BlobDigest digest.Digest
	BlobSize   int64
	// Target is the original layer blob of a TurboOCI layer (whose blob holds only filesystem metadata); "" for a
	// native overlaybd layer.
	Target digest.Digest
}

// ErrNotOverlaybd means a manifest's layers are not overlaybd block layers.
var ErrNotOverlaybd = errors.New("not an overlaybd image")

// BlockLayers returns the overlaybd layers of m, bottom first, leaving out an acceleration (trace) layer.
// It fails with ErrNotOverlaybd when a layer has no overlaybd annotations.
func BlockLayers(m ocispec.Manifest) ([]BlockLayer, error) {
	var out []BlockLayer
	for i, l := range m.Layers {
		if l.Annotations[AnnotationAccelerationLayer] == "yes" {
			continue
		}
		ds, ok := l.Annotations[AnnotationBlobDigest]
		if !ok {
			return nil, fmt.Errorf("layer %d (%s): no %s annotation: %w", i, l.Digest, AnnotationBlobDigest, ErrNotOverlaybd)
		}
		dg, err := digest.Parse(ds)
		if err != nil {
			return nil, fmt.Errorf("layer %d (%s): annotation %s: %w", i, l.Digest, AnnotationBlobDigest, err)
		}
		size := l.Size
		if ss, ok := l.Annotations[AnnotationBlobSize]; ok {
			size, err = strconv.ParseInt(ss, 10, 64)
			if err != nil || size < 0 {
				return nil, fmt.Errorf("layer %d (%s): annotation %s=%q is not a size", i, l.Digest, AnnotationBlobSize, ss)
			}
		}
		if dg != l.Digest || size != l.Size {
			return nil, fmt.Errorf("layer %d: annotations name blob %s (%d bytes) but the descriptor is %s (%d bytes)", i, dg, size, l.Digest, l.Size)
		}
		bl := BlockLayer{Descriptor: l, BlobDigest: dg, BlobSize: size}
		if IsTurbo(l.Annotations) {
			if bl.Target, err = turboTarget(l.Annotations); err != nil {
				return nil, fmt.Errorf("layer %d (%s): %w", i, l.Digest, err)
			}
		}
		out = append(out, bl)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("manifest has no layers: %w", ErrNotOverlaybd)
	}
	if len(out) > lsmt.MaxLayers {
		return nil, fmt.Errorf("image has %d layers; overlaybd stacks at most %d", len(out), lsmt.MaxLayers)
	}
	return out, nil
}

// OpenLayerBlob opens the LSMT layer inside an overlaybd blob: it unwraps the tar wrapper if present and the ZFile
// if present. verify checks ZFile block CRCs on every read (use it for data that crossed a network or a cache).
// It is OpenLayer for callers that need only the layer file.
func OpenLayerBlob(r io.ReaderAt, size int64, verify bool) (*lsmt.File, error) {
	l, err := OpenLayer(r, size, LayerOptions{Verify: verify})
	if err != nil {
		return nil, err
	}
	return l.File, nil
}

// LayerOptions tune OpenLayer.
type LayerOptions struct {
	// Verify checks ZFile block CRCs on every read (use it for data that crossed a network or a cache).
	Verify bool
	// Observe, if set, is called with every read of the layer file made once it is open (offset and length in
	// the layer file: inside the tar wrapper and the ZFile), as upstream's trace recorder sees them.
	Observe func(off, n int64)
}

// Layer is an open overlaybd layer blob.
type Layer struct {
	// File is the LSMT layer file.
	File *lsmt.File
	base int64         // offset in the blob of the layer file (ZFile or LSMT)
	z    *zfile.Reader // nil when the layer file is not compressed
	// turbo is set for a TurboOCI layer, whose ranges are those of its original's tar (see OpenTurboLayer).
	turbo *turboRanges
}

// BlobRange returns the range of the blob (offset, length) that holds the bytes [off, off+n) of the layer file:
// what to fetch ahead of reads of those bytes. It is empty when the layer file has none of them.
func (l *Layer) BlobRange(off, n int64) (int64, int64) {
	if l.turbo != nil {
		return l.turbo.blobRange(off, n)
	}
	if l.z != nil {
		off, n = l.z.CompressedRange(off, n)
	} else {
		end := min(off+n, l.File.Size())
		off = max(off, 0)
		n = max(end-off, 0)
	}
	if n == 0 {
		return 0, 0
	}
	return l.base + off, n
}

// OpenLayer opens the LSMT layer inside an overlaybd blob of size bytes held by r: it unwraps the tar wrapper if
// present and the ZFile if present.
//
// When r is a cache (a zfile.Evicter), bytes read while opening that fail a check (a bad magic, a header/trailer
// mismatch, an index CRC) may be a bad copy rather than a bad blob: the ranges read are evicted and the open is
// tried again, MaxOpenReloads times. A failing open evicts what it read in any case, so that a later attempt
// (after a fix upstream, or a daemon restart) never trusts those bytes.
func OpenLayer(r io.ReaderAt, size int64, opts LayerOptions) (*Layer, error) {
	ev, ok := r.(zfile.Evicter)
	if !ok {
		return openLayer(r, size, opts)
	}
	for try := 0; ; try++ {
		rec := &openRecorder{r: r, ev: ev}
		l, err := openLayer(rec, size, opts)
		rec.stop()
		if err == nil {
			return l, nil
		}
		if eerr := rec.evict(); eerr != nil {
			return nil, errors.Join(err, eerr)
		}
		// A read that failed is a transport error, already retried below: opening again would only wait again.
		if rec.readFailed() {
			return nil, err
		}
		if try == MaxOpenReloads {
			return nil, fmt.Errorf("%w (the same after fetching its bytes again %d times: the blob is bad, or its source serves wrong bytes)", err, MaxOpenReloads)
		}
	}
}

// MaxOpenReloads bounds how often OpenLayer evicts what it read and opens a cached blob again.
const MaxOpenReloads = 2

func openLayer(r io.ReaderAt, size int64, opts LayerOptions) (*Layer, error) {
	sr, err := tarwrap.Open(r, size)
	if err != nil {
		return nil, err
	}
	_, base, _ := sr.Outer()
	l := &Layer{base: base}
	var layer io.ReaderAt = sr
	if ev, ok := r.(zfile.Evicter); ok {
		layer = evictSection{sr, ev, base}
	}
	lsize := sr.Size()
	isZ, err := zfile.IsZFile(sr)
	if err != nil {
		return nil, err
	}
	if isZ {
		z, err := zfile.Open(layer, sr.Size(), opts.Verify)
		if err != nil {
			return nil, err
		}
		layer, lsize, l.z = z, z.Size(), z
	}
	var obs *observed
	if opts.Observe != nil {
		obs = &observed{r: layer, fn: opts.Observe}
		layer = obs
	}
	if l.File, err = lsmt.Open(layer, lsize); err != nil {
		return nil, err
	}
	if obs != nil {
		obs.open.Store(true)
	}
	return l, nil
}

// observed reports the reads made through it, once open is set.
type observed struct {
	r    io.ReaderAt
	fn   func(off, n int64)
	open atomic.Bool
}

func (o *observed) ReadAt(p []byte, off int64) (int, error) {
	if o.open.Load() {
		o.fn(off, int64(len(p)))
	}
	return o.r.ReadAt(p, off)
}

// openRecorder notes the ranges read through it until stop, so that they can be evicted when the open fails.
type openRecorder struct {
	r       io.ReaderAt
	ev      zfile.Evicter
	stopped atomic.Bool // the layer is open: its reads pass straight through
	mu      sync.Mutex
	failed  bool
	ranges  [][2]int64
}

func (o *openRecorder) ReadAt(p []byte, off int64) (int, error) {
	n, err := o.r.ReadAt(p, off)
	if o.stopped.Load() {
		return n, err
	}
	o.mu.Lock()
	o.ranges = append(o.ranges, [2]int64{off, int64(len(p))})
	if err != nil && err != io.EOF {
		o.failed = true
	}
	o.mu.Unlock()
	return n, err
}

func (o *openRecorder) Evict(off, n int64) error { return o.ev.Evict(off, n) }

func (o *openRecorder) stop() { o.stopped.Store(true) }

func (o *openRecorder) readFailed() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.failed
}

// evict drops every range read while opening from the cache.
func (o *openRecorder) evict() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	var errs error
	for _, rg := range o.ranges {
		errs = errors.Join(errs, o.ev.Evict(rg[0], rg[1]))
	}
	o.ranges = nil
	return errs
}

// evictSection passes evictions of a cache under a tar-wrapped blob through to the cache, at the member's offset.
type evictSection struct {
	*io.SectionReader
	ev   zfile.Evicter
	base int64
}

func (s evictSection) Evict(off, n int64) error { return s.ev.Evict(s.base+off, n) }

// Predecode decodes the ZFile blocks that hold the bytes [off, off+n) of the layer file into p (see
// zfile.Reader.Predecode); a layer file that is not compressed has nothing to decode.
func (l *Layer) Predecode(ctx context.Context, p *zfile.Predecoded, off, n int64) error {
	if l.z == nil {
		return nil
	}
	return l.z.Predecode(ctx, p, off, n)
}

// ZFile returns the layer file's ZFile reader, nil when the layer file is not compressed (or is TurboOCI's).
func (l *Layer) ZFile() *zfile.Reader { return l.z }

// UsePredecoded makes the layer's reads take their ZFile blocks from p when it holds them (nil: no longer).
func (l *Layer) UsePredecoded(p *zfile.Predecoded) {
	if l.z != nil {
		l.z.UsePredecoded(p)
	}
}
