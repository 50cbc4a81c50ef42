package convert

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	digest "github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/decompress"
	"github.com/obdproject/obd/internal/erofs"
	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/iocount"
	"github.com/obdproject/obd/internal/units"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/tarwrap"
	"github.com/obdproject/obd/zfile"
)

// DefaultVirtualSize is the virtual disk size of converted images (upstream's default, 64 GiB).
const DefaultVirtualSize = 64 << 30

// ImageOptions configure ConvertImage.
// DefaultZFile is the compression obd convert and obd demo write: zstd in 64 KiB blocks. Upstream's converter writes
// LZ4 in 4 KiB blocks (the zero zfile.Options); both read both. Chosen with bench/startup (medians of 3, each
// against overlayfs in the same run, 100 Mbit/s and 20 ms RTT; docs/benchmarks.md): python + scipy's blobs are
// 213 MiB instead of 361 MiB, its recorded start fetches 41.9 MiB instead of 57.5 MiB and is ready in 0.164 instead
// of 0.218 of overlayfs's time (lazy, no trace: 0.277 instead of 0.338); the gcc workload 0.290 instead of 0.352
// (lazy 0.454, 0.501). Warm starts cost the same (python 0.94× and 1.15× overlayfs warm, gcc 5.68 s and 5.46 s);
// converting takes about a quarter longer.
var DefaultZFile = zfile.Options{Algorithm: zfile.AlgoZSTD, BlockSize: 64 << 10}

type ImageOptions struct {
	// VirtualSize of the image's disk in bytes (default DefaultVirtualSize). Ignored with a base layer.
	VirtualSize int64
	// BaseLayer is the path of a base layer holding a formatted filesystem (e.g. upstream's ext4_64): a ZFile or
	// LSMT file, tar-wrapped or not. Empty formats a new filesystem in the first layer.
	BaseLayer string
	// ZFile sets the compression of layer blobs.
	ZFile zfile.Options
	// OCI writes OCI media types; otherwise Docker schema 2, like upstream's default.
	OCI bool
	// WorkDir holds scratch files (default os.TempDir()); they are removed by Result.Cleanup or on failure.
	WorkDir string
	// Progress, if set, is called as each layer moves through the stages, one call at a time. Layer i is packed
	// while layer i+1 is applied, so their reports interleave.
	Progress func(Progress)
	// DB, if set, reuses layers converted before with the same options (see DB) and records the layers converted
	// now. The result is byte-identical to a conversion without it.
	DB *DB
	// Remote, if set, lets DB reuse layers that its local store no longer holds but a registry repository does.
	Remote *RemoteBlobs
	// Referrer makes the manifest an OCI referrer of the source manifest: OCI media types, subject = the source
	// manifest's descriptor, artifactType = ArtifactTypeOverlaybd (as upstream's converter does with --referrer).
	Referrer bool
	// Turbo converts to upstream's TurboOCI v1 layout: each layer keeps its original blob (gzip or uncompressed tar),
	// which the image references, and gets a small layer holding its filesystem metadata, whose file blocks map
	// into the original's tar, and a gzip index to read the original at any offset. No file data is written. It
	// formats a new filesystem (no BaseLayer) and does not use DB.
	Turbo bool
	// FsType is the filesystem of the image's disk: FsExt4 (the default) or FsErofs, which upstream's converter
	// writes with --fstype erofs. An erofs image is read-only: containers write to an overlayfs upper directory.
	FsType string
}

// Filesystems an image can be converted to.
const (
	FsExt4  = "ext4"
	FsErofs = "erofs"
)

// ArtifactTypeOverlaybd is the artifactType of overlaybd images pushed as referrers of their source image.
const ArtifactTypeOverlaybd = image.ArtifactTypeOverlaybd

// artifactType is the artifactType of a referrer converted with opts.
func (opts ImageOptions) artifactType() string {
	if opts.Turbo {
		return image.ArtifactTypeTurboOCI
	}
	return ArtifactTypeOverlaybd
}

// RemoteBlobs gives access to layer blobs in the registry a conversion is pushed to.
type RemoteBlobs struct {
	// Host is the destination registry (host[:port]); DB locations on other registries are not used.
	Host string
	// Open gives random access to blob desc in repository repo of Host, to read a reused layer that a layer above
	// it is converted on. Only the blocks the filesystem needs are read.
	Open func(ctx context.Context, repo string, desc ocispec.Descriptor) (io.ReaderAt, error)
}

// Progress reports one step of a conversion.
type Progress struct {
	Layer, Layers int    // 0-based layer index and layer count
	Stage         string // "apply", "compress" (commit, compress, wrap), "done" (hashed), "reused", "warning"
	Bytes         int64  // uncompressed tar bytes applied (apply), blob size (done, reused)
	Elapsed       time.Duration
	Digest        digest.Digest // blob digest (done, reused)
	Detail        string        // where a reused blob came from (reused), the message (warning)
}

// String says what p reports in one line, as obd prints it ("" for an unknown stage).
func (p Progress) String() string {
	at := fmt.Sprintf("layer %d/%d: ", p.Layer+1, p.Layers)
	switch p.Stage {
	case "apply":
		return at + fmt.Sprintf("applied %s of tar in %s", units.Bytes(p.Bytes), p.Elapsed.Round(time.Millisecond))
	case "compress":
		return at + fmt.Sprintf("committed and compressed to %s in %s", units.Bytes(p.Bytes), p.Elapsed.Round(time.Millisecond))
	case "done":
		return at + fmt.Sprintf("blob %s (%s)", p.Digest, units.Bytes(p.Bytes))
	case "reused":
		return at + fmt.Sprintf("reused %s (%s, from %s)", p.Digest, units.Bytes(p.Bytes), p.Detail)
	case "warning":
		return at + "warning: " + p.Detail
	}
	return ""
}

// Result is a converted image whose blobs sit in the work directory until Cleanup.
type Result struct {
	Manifest     []byte
	ManifestDesc ocispec.Descriptor
	Config       []byte
	ConfigDesc   ocispec.Descriptor
	// Blobs are the layer blobs in manifest order.
	Blobs []Blob
	// Targets are the original layer blobs a TurboOCI image references (not in the manifest's layers, but pushed
	// with it).
	Targets []Blob
	// Timings sums the time spent per stage over all layers.
	Timings map[string]time.Duration
	dir     string
	// released is closed once the conversion's files are closed: closing the layers' deleted data files frees
	// their page cache, which takes a while, so it runs in the background (while the caller pushes, say).
	released chan struct{}
}

// Blob is a layer blob produced by a conversion.
type Blob struct {
	Desc ocispec.Descriptor
	// Path is the blob's file in the work directory, owned by the Result (it may be moved away). It is "" only for
	// a layer reused from a registry (see Repos).
	Path string
	// Reused says the layer came from ImageOptions.DB instead of being converted.
	Reused bool
	// Repos are repositories of ImageOptions.Remote.Host known to hold the blob (reused layers only): a push can
	// mount it from them.
	Repos []string
	// DiffID is the digest of the blob's uncompressed content when it is compressed (TurboOCI layers); "" means
	// the blob's own digest.
	DiffID digest.Digest
}

// Image describes the result for an image.Sink, which takes the blob files away from the work directory.
func (r *Result) Image() *image.Image {
	img := &image.Image{Manifest: r.Manifest, ManifestDesc: r.ManifestDesc, Config: r.Config, ConfigDesc: r.ConfigDesc}
	for _, b := range append(r.Targets[:len(r.Targets):len(r.Targets)], r.Blobs...) {
		img.Layers = append(img.Layers, image.Blob{Desc: b.Desc, Path: b.Path, Repos: b.Repos})
	}
	return img
}

// Cleanup removes the work files, once the conversion has released them.
func (r *Result) Cleanup() error {
	if r.released != nil {
		<-r.released
	}
	return os.RemoveAll(r.dir)
}

// converter holds the state of one ConvertImage call.
type converter struct {
	opts    ImageOptions
	src     image.Source
	dir     string
	lowers  []*lsmt.File
	mu      sync.Mutex // guards files and timings: layers are packed while the next one is applied
	files   []*os.File
	scratch []string // the layers' RW files: read as lowers and by pack until the last layer is packed
	timings map[string]time.Duration
	keyBase string // layer key prefix (with a DB)
}

// ConvertImage converts src into an overlaybd image: every layer's tar is applied to an ext4 filesystem edited in
// userspace, whose block writes land in a new LSMT layer over the layers converted before; each layer is then
// committed, compressed into a ZFile and tar-wrapped. The same input and options always give the same digests.
func ConvertImage(ctx context.Context, src image.Source, opts ImageOptions) (*Result, error) {
	if opts.VirtualSize == 0 {
		opts.VirtualSize = DefaultVirtualSize
	}
	if opts.VirtualSize%(1<<20) != 0 || opts.VirtualSize < 64<<20 {
		return nil, fmt.Errorf("virtual size %d: want a multiple of 1 MiB, at least 64 MiB", opts.VirtualSize)
	}
	if opts.Referrer {
		opts.OCI = true
	}
	if opts.Turbo {
		if opts.BaseLayer != "" {
			return nil, errors.New("a TurboOCI conversion formats its own filesystem: it takes no base layer")
		}
		opts.DB, opts.Remote = nil, nil
	}
	switch opts.FsType {
	case "", FsExt4:
		opts.FsType = FsExt4
	case FsErofs:
		if opts.Turbo || opts.BaseLayer != "" {
			return nil, errors.New("an erofs conversion formats its own filesystem and writes file data: no --turbo, no base layer")
		}
	default:
		return nil, fmt.Errorf("filesystem %q: obd converts to ext4 or erofs", opts.FsType)
	}
	m, _ := src.Manifest()
	if err := CheckLayers(m); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(opts.WorkDir, "obd-convert-")
	if err != nil {
		return nil, fmt.Errorf("work dir: %w", err)
	}
	c := &converter{opts: opts, src: src, dir: dir, timings: map[string]time.Duration{}}
	res, err := c.run(ctx)
	if err != nil {
		for _, f := range c.files {
			f.Close()
		}
		os.RemoveAll(dir)
		return nil, err
	}
	res.released = make(chan struct{})
	go func() {
		defer close(res.released)
		for _, f := range c.files {
			f.Close()
		}
	}()
	return res, nil
}

// Layer media types ConvertImage reads: tar, plain or compressed with gzip or zstd.
var layerMediaTypes = map[string]bool{
	"":                              true, // not said: the content is sniffed
	ocispec.MediaTypeImageLayer:     true,
	ocispec.MediaTypeImageLayerGzip: true,
	ocispec.MediaTypeImageLayerZstd: true,
	image.MediaTypeDockerLayer:      true,
	image.MediaTypeDockerLayerGzip:  true,
	"application/vnd.docker.image.rootfs.diff.tar.zstd": true,
}

// CheckLayers checks that every layer of m is one ConvertImage can convert, and names the first that is not.
func CheckLayers(m ocispec.Manifest) error {
	for i, l := range m.Layers {
		mt := l.MediaType
		var why string
		switch {
		case l.Annotations[image.AnnotationBlobDigest] != "":
			why = "it is already an overlaybd layer (the image was converted before)"
		case strings.Contains(mt, "nondistributable") || strings.Contains(mt, ".foreign."):
			why = fmt.Sprintf("media type %q is a foreign (non-distributable) layer, which obd does not fetch from its URLs", mt)
		case strings.HasSuffix(mt, "+encrypted"):
			why = fmt.Sprintf("media type %q is an encrypted layer: decrypt the image first", mt)
		case !layerMediaTypes[mt]:
			why = fmt.Sprintf("unsupported media type %q (obd converts tar layers: uncompressed, gzip or zstd)", mt)
		default:
			continue
		}
		return fmt.Errorf("layer %d (%s): %s", i, l.Digest, why)
	}
	return nil
}

func (c *converter) run(ctx context.Context) (*Result, error) {
	m, md := c.src.Manifest()
	cfgBytes, err := c.src.Config(ctx)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	var cfg map[string]json.RawMessage
	if err := json.Unmarshal(cfgBytes, &cfg); err != nil {
		return nil, fmt.Errorf("config %s: %w", m.Config.Digest, err)
	}
	var rootfs ocispec.RootFS
	if err := json.Unmarshal(cfg["rootfs"], &rootfs); err != nil {
		return nil, fmt.Errorf("config %s: rootfs: %w", m.Config.Digest, err)
	}
	if len(rootfs.DiffIDs) != len(m.Layers) {
		return nil, fmt.Errorf("config %s lists %d diff_ids but the manifest has %d layers", m.Config.Digest, len(rootfs.DiffIDs), len(m.Layers))
	}
	if len(m.Layers) == 0 {
		return nil, errors.New("image has no layers")
	}
	res := &Result{dir: c.dir, Timings: c.timings}
	parentUUID := ""
	var baseBlob digest.Digest
	if c.opts.BaseLayer != "" {
		base, err := c.addBaseLayer()
		if err != nil {
			return nil, err
		}
		res.Blobs = append(res.Blobs, base)
		parentUUID = c.lowers[0].Header().UUID
		baseBlob = base.Desc.Digest
	}
	n := len(m.Layers)
	chains := make([]digest.Digest, n)
	keys := make([][]byte, n)
	if c.opts.DB != nil {
		c.keyBase = keyPrefix(c.opts.VirtualSize, baseBlob, c.opts.ZFile, c.opts.FsType)
	}
	for i := range chains {
		chains[i] = identity.ChainID(rootfs.DiffIDs[:i+1])
		keys[i] = layerKey(c.keyBase, chains[i])
	}
	plan := c.plan(ctx, keys)
	// Layer i is compressed and wrapped while layer i+1 is applied: the two use different cores.
	blobs := make([]Blob, n)
	packing, pctx := errgroup.WithContext(ctx)
	packing.SetLimit(1)
	for i := range m.Layers {
		uuid := chainUUID(chains[i])
		if r := plan[i]; r != nil {
			blobs[i] = r.blob
			if r.lower != nil {
				c.lowers = append(c.lowers, r.lower)
			}
			c.progress(Progress{Layer: i, Layers: n, Stage: "reused", Bytes: r.blob.Desc.Size, Digest: r.blob.Desc.Digest, Detail: r.from})
			parentUUID = uuid
			continue
		}
		layer, err := c.applyLayer(pctx, i, n, rootfs.DiffIDs[i], uuid, parentUUID)
		if err != nil {
			if perr := packing.Wait(); perr != nil {
				return nil, perr // the cause: packing a lower layer failed and cancelled this one
			}
			return nil, fmt.Errorf("layer %d (%s): %w", i, m.Layers[i].Digest, err)
		}
		parentUUID = uuid
		rec := layerRecord{UUID: uuid, Chain: chains[i]}
		if layer.turbo != nil {
			res.Targets = append(res.Targets, layer.turbo.blob)
		}
		packing.Go(func() error {
			b, err := c.pack(layer)
			if err != nil {
				return fmt.Errorf("layer %d (%s): %w", i, m.Layers[i].Digest, err)
			}
			blobs[i] = b
			if c.opts.DB != nil {
				rec.Blob, rec.Size, rec.Created = b.Desc.Digest, b.Desc.Size, time.Now().UTC()
				if err := c.opts.DB.add(keys[i], rec, b.Path); err != nil {
					c.warn(i, n, fmt.Sprintf("not kept in the conversion database: %v", err))
				}
			}
			return nil
		})
	}
	if err := packing.Wait(); err != nil {
		return nil, err
	}
	for _, name := range c.scratch {
		os.Remove(name)
	}
	res.Blobs = append(res.Blobs, blobs...)
	return res, c.writeMetadata(res, cfg, m, md)
}

// reuse is a layer taken from the DB.
type reuse struct {
	blob  Blob
	lower *lsmt.File // the layer, when a layer above it is converted
	from  string
}

// plan decides which layers to take from the DB. A reused layer below a layer that is converted must be readable
// (from the local store, or from the registry through Remote); one that is not is converted again.
func (c *converter) plan(ctx context.Context, keys [][]byte) []*reuse {
	n := len(keys)
	plan := make([]*reuse, n)
	if c.opts.DB == nil {
		return plan
	}
	start := time.Now()
	defer func() { c.timings["reuse"] += time.Since(start) }()
	hits, err := c.opts.DB.lookup(keys)
	if err != nil {
		c.warn(0, n, fmt.Sprintf("converting every layer: %v", err))
		return plan
	}
	for i, h := range hits {
		if h == nil {
			continue
		}
		desc := c.layerDesc(h.layer.Blob, h.layer.Size)
		var repos []string // where the destination registry has it: pushes mount it from there
		if c.opts.Remote != nil {
			for _, loc := range h.blob.Repos {
				if repo, ok := strings.CutPrefix(loc, c.opts.Remote.Host+"/"); ok {
					repos = append(repos, repo)
				}
			}
		}
		if h.blob.Local {
			// A name of its own: the file may share its inode with the store, so nothing may write into it.
			path := filepath.Join(c.dir, fmt.Sprintf("layer%03d.reused.blob", i))
			err := c.opts.DB.take(h.layer.Blob, h.layer.Size, path)
			if err == nil {
				plan[i] = &reuse{blob: Blob{Desc: desc, Path: path, Reused: true, Repos: repos}, from: "local store"}
				continue
			}
			c.warn(i, n, err.Error())
		}
		if len(repos) > 0 {
			plan[i] = &reuse{blob: Blob{Desc: desc, Reused: true, Repos: repos}, from: c.opts.Remote.Host + "/" + repos[0]}
		}
	}
	last := -1 // the topmost layer to convert
	for i, r := range plan {
		if r == nil {
			last = i
		}
	}
	for i := 0; i < last; i++ {
		r := plan[i]
		if r == nil {
			continue
		}
		lower, err := c.openReused(ctx, r.blob)
		if err != nil {
			c.warn(i, n, fmt.Sprintf("cannot read reused layer %s (%v): converting it again", r.blob.Desc.Digest, err))
			if r.blob.Path != "" {
				os.Remove(r.blob.Path)
			}
			plan[i] = nil
			continue
		}
		r.lower = lower
	}
	return plan
}

// openReused opens a reused layer blob as an LSMT layer to convert the layers above on.
func (c *converter) openReused(ctx context.Context, b Blob) (*lsmt.File, error) {
	if b.Path != "" {
		f, err := os.Open(b.Path)
		if err != nil {
			return nil, err
		}
		c.files = append(c.files, f)
		return image.OpenLayerBlob(f, b.Desc.Size, false) // its digest was checked
	}
	var errs []error
	for _, repo := range b.Repos {
		r, err := c.opts.Remote.Open(ctx, repo, b.Desc)
		if err == nil {
			var l *lsmt.File
			if l, err = image.OpenLayerBlob(r, b.Desc.Size, true); err == nil {
				return l, nil
			}
		}
		errs = append(errs, fmt.Errorf("%s: %w", repo, err))
	}
	return nil, errors.Join(errs...)
}

func (c *converter) warn(i, n int, msg string) {
	c.progress(Progress{Layer: i, Layers: n, Stage: "warning", Detail: msg})
}

// progress reports p, one call at a time.
func (c *converter) progress(p Progress) {
	if c.opts.Progress != nil {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.opts.Progress(p)
	}
}

// chainUUID formats the first 32 hex digits of a chain ID as a UUID, as upstream's converter names layers.
func chainUUID(chain digest.Digest) string {
	h := chain.Encoded()
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

func (c *converter) openFile(name string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(c.dir, name), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.files = append(c.files, f)
	c.mu.Unlock()
	return f, nil
}

// addBaseLayer stacks the base layer at the bottom and returns its tar-wrapped blob.
func (c *converter) addBaseLayer() (Blob, error) {
	in, err := os.Open(c.opts.BaseLayer)
	if err != nil {
		return Blob{}, fmt.Errorf("base layer: %w", err)
	}
	c.files = append(c.files, in)
	st, err := in.Stat()
	if err != nil {
		return Blob{}, fmt.Errorf("base layer: %w", err)
	}
	f, err := image.OpenLayerBlob(in, st.Size(), true)
	if err != nil {
		return Blob{}, fmt.Errorf("base layer %s: %w", c.opts.BaseLayer, err)
	}
	if f.VirtualSize() == 0 {
		return Blob{}, fmt.Errorf("base layer %s: its virtual disk size is 0, so it holds no filesystem: give a formatted base layer (e.g. upstream's ext4_64), or none", c.opts.BaseLayer)
	}
	c.lowers = append(c.lowers, f)
	if _, err := tarwrap.Detect(in, st.Size()); err == nil {
		return c.storeBlob("base", in, st.Size(), false)
	}
	return c.storeBlob("base", in, st.Size(), true)
}

// storeBlob writes payload as a layer blob in the work dir, tar-wrapped if wrap is set, and describes it.
func (c *converter) storeBlob(name string, payload io.ReaderAt, size int64, wrap bool) (Blob, error) {
	out, err := c.openFile(name + ".blob")
	if err != nil {
		return Blob{}, err
	}
	h := sha256.New()
	w, r := io.MultiWriter(out, h), io.NewSectionReader(payload, 0, size)
	var n int64
	if wrap {
		n, err = tarwrap.Write(w, r, size, tarwrap.DefaultMode)
	} else {
		n, err = io.Copy(w, r)
	}
	if err != nil {
		return Blob{}, fmt.Errorf("layer blob: %w", err)
	}
	return Blob{Desc: c.layerDesc(digest.NewDigest(digest.SHA256, h), n), Path: out.Name()}, nil
}

func (c *converter) layerDesc(d digest.Digest, size int64) ocispec.Descriptor {
	mt := image.MediaTypeDockerLayer
	if c.opts.OCI {
		mt = ocispec.MediaTypeImageLayer
	}
	desc := ocispec.Descriptor{MediaType: mt, Digest: d, Size: size, Annotations: map[string]string{
		image.AnnotationBlobDigest: d.String(),
		image.AnnotationBlobSize:   strconv.FormatInt(size, 10),
		image.AnnotationVersion:    image.FormatVersion,
	}}
	if c.opts.FsType == FsErofs {
		desc.Annotations[image.AnnotationFsType] = FsErofs
	}
	return desc
}

func (c *converter) stage(p Progress, start time.Time) {
	p.Elapsed = time.Since(start)
	c.mu.Lock()
	c.timings[p.Stage] += p.Elapsed
	c.mu.Unlock()
	c.progress(p)
}

// stackDevice presents a layer stack as the block device ext4 edits.
type stackDevice struct{ *lsmt.Stack }

func (d stackDevice) Size() int64 { return d.VirtualSize() }

// WriteAt writes p at off. LSMT layers take whole sectors; libext2fs sometimes writes a few bytes (a superblock
// field), which become a read-modify-write of the sectors around them.
func (d stackDevice) WriteAt(p []byte, off int64) (int, error) {
	const sector = lsmt.SectorSize
	if off%sector == 0 && len(p)%sector == 0 {
		return d.Stack.WriteAt(p, off)
	}
	start, end := off/sector*sector, (off+int64(len(p))+sector-1)/sector*sector
	buf := make([]byte, end-start)
	if _, err := d.Stack.ReadAt(buf, start); err != nil && err != io.EOF {
		return 0, err
	}
	copy(buf[off-start:], p)
	if _, err := d.Stack.WriteAt(buf, start); err != nil {
		return 0, err
	}
	return len(p), nil
}

// frozen is a layer applied and frozen (stacked under the next layer as it is), waiting to be packed into its blob.
type frozen struct {
	i, n             int
	name             string
	rw               *lsmt.RW
	uuid, parentUUID string
	turbo            *turboTarget // a TurboOCI layer's original
}

// applyLayer applies layer i over the layers below it and freezes it: it becomes the next lower as it is, read from
// its RW data file, while pack commits and compresses it.
func (c *converter) applyLayer(ctx context.Context, i, n int, diffID digest.Digest, uuid, parentUUID string) (frozen, error) {
	name := fmt.Sprintf("layer%03d", i)
	data, err := c.openFile(name + ".data")
	if err != nil {
		return frozen{}, err
	}
	index, err := c.openFile(name + ".index")
	if err != nil {
		return frozen{}, err
	}
	c.scratch = append(c.scratch, data.Name(), index.Name())
	vsize := int64(0)
	if len(c.lowers) == 0 {
		vsize = c.opts.VirtualSize
	}
	wb, err := newWriteBehind(data)
	if err != nil {
		return frozen{}, err
	}
	defer wb.Close() // on errors; a second Close does nothing
	rw, err := lsmt.CreateRW(wb, index, vsize, lsmt.CreateOptions{UUID: uuid, ParentUUID: parentUUID, Warp: c.opts.Turbo})
	if err != nil {
		return frozen{}, err
	}
	stack, err := lsmt.NewStack(c.lowers, rw)
	if err != nil {
		return frozen{}, err
	}
	dev := stackDevice{stack}

	start := time.Now()
	var applied int64
	var turbo *turboTarget
	if c.opts.FsType == FsErofs {
		applied, err = c.applyErofs(ctx, dev, i, diffID)
	} else {
		applied, turbo, err = c.applyExt4(ctx, dev, rw, i, diffID)
	}
	if cerr := wb.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("write layer data: %w", cerr)
	}
	if err != nil {
		return frozen{}, err
	}
	lower, err := rw.Freeze()
	if err != nil {
		return frozen{}, err
	}
	c.lowers = append(c.lowers, lower)
	c.stage(Progress{Layer: i, Layers: n, Stage: "apply", Bytes: applied}, start)
	return frozen{i: i, n: n, name: name, rw: rw, uuid: uuid, parentUUID: parentUUID, turbo: turbo}, nil
}

// applyExt4 applies layer i to the ext4 filesystem on dev, formatting it first for the first layer.
func (c *converter) applyExt4(ctx context.Context, dev stackDevice, rw *lsmt.RW, i int, diffID digest.Digest) (int64, *turboTarget, error) {
	if len(c.lowers) == 0 {
		// Everything mkfs writes is derived from the first layer, so equal inputs give equal filesystems.
		fsUUID := chainUUID(digest.FromString("obd mkfs " + diffID.String()))
		if err := ext4.Mkfs(ctx, dev, ext4.MkfsOptions{UUID: fsUUID, TempDir: c.dir}); err != nil {
			return 0, nil, err
		}
	}
	fsys, err := ext4.Open(dev, true)
	if err != nil {
		return 0, nil, err
	}
	var applied int64
	var turbo *turboTarget
	if c.opts.Turbo {
		applied, turbo, err = c.applyTurbo(ctx, fsys, rw, i, diffID)
	} else {
		applied, err = c.apply(ctx, fsys, i, diffID)
	}
	if cerr := fsys.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("flush filesystem: %w", cerr)
	}
	return applied, turbo, err
}

// applyErofs applies layer i to the erofs image on dev: a new image for the first layer, else the image of the
// layers below with this layer's blocks appended.
func (c *converter) applyErofs(ctx context.Context, dev stackDevice, i int, diffID digest.Digest) (int64, error) {
	var b *erofs.Builder
	var err error
	if len(c.lowers) == 0 {
		// Derived from the first layer, so equal inputs give equal images.
		sum := sha256.Sum256([]byte("obd mkfs.erofs " + diffID.String()))
		b, err = erofs.Create(dev, [16]byte(sum[:16]))
	} else {
		b, err = erofs.Open(dev)
	}
	if err != nil {
		return 0, err
	}
	applied, err := c.applyStream(ctx, i, diffID, func(r io.Reader) error {
		_, err := ApplyErofs(ctx, b, r, ApplyOptions{})
		return err
	})
	if err != nil {
		return applied, err
	}
	if err := b.Close(); err != nil {
		return applied, fmt.Errorf("write erofs metadata: %w", err)
	}
	return applied, nil
}

// pack commits a frozen layer straight into a ZFile compressor writing into the layer's blob file, wrapped in tar
// in place (WriteLayer), and hashes the blob.
func (c *converter) pack(l frozen) (Blob, error) {
	if l.turbo != nil {
		return c.packTurbo(l)
	}
	start := time.Now()
	out, err := c.openFile(l.name + ".blob")
	if err != nil {
		return Blob{}, err
	}
	committed, err := lsmt.NewCommitReader(l.rw, lsmt.CommitOptions{UUID: l.uuid, ParentUUID: l.parentUUID})
	if err != nil {
		return Blob{}, fmt.Errorf("commit: %w", err)
	}
	zsize, err := WriteLayer(out, committed, true, true, c.opts.ZFile)
	if err != nil {
		return Blob{}, fmt.Errorf("commit and compress: %w", err)
	}
	c.stage(Progress{Layer: l.i, Layers: l.n, Stage: "compress", Bytes: zsize}, start)

	start = time.Now()
	size := tarwrap.WrappedSize(zsize)
	h := sha256.New()
	if _, err := io.CopyBuffer(h, io.NewSectionReader(out, 0, size), make([]byte, 1<<20)); err != nil {
		return Blob{}, fmt.Errorf("layer blob: %w", err)
	}
	blob := Blob{Desc: c.layerDesc(digest.NewDigest(digest.SHA256, h), size), Path: out.Name()}
	c.stage(Progress{Layer: l.i, Layers: l.n, Stage: "done", Bytes: size, Digest: blob.Desc.Digest}, start)
	return blob, nil
}

// apply streams layer i into fsys (ext4).
func (c *converter) apply(ctx context.Context, fsys *ext4.FS, i int, diffID digest.Digest) (int64, error) {
	return c.applyStream(ctx, i, diffID, func(r io.Reader) error {
		_, err := Apply(ctx, fsys, r, ApplyOptions{})
		return err
	})
}

// applyStream streams the uncompressed tar of layer i into apply and checks that its bytes match the config's
// diff_id.
func (c *converter) applyStream(ctx context.Context, i int, diffID digest.Digest, apply func(io.Reader) error) (int64, error) {
	rc, err := c.src.OpenLayer(ctx, i)
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	tarStream, comp, err := decompress.Layer(rc)
	if err != nil {
		return 0, err
	}
	defer tarStream.Close()
	h := sha256.New()
	counted := &iocount.Writer{W: h}
	// Decompression and hashing run ahead in their own goroutine, overlapping with the tar → filesystem work.
	ahead := newReadAhead(io.TeeReader(blobReader{tarStream, comp}, counted), 1<<20, 4)
	err = apply(ahead)
	if err == nil {
		// Read to the end: trailing tar padding counts for the diff_id, and the blob's digest is checked at EOF.
		_, err = io.Copy(io.Discard, ahead)
	}
	ahead.Close()
	if err != nil {
		return 0, err
	}
	if got := digest.NewDigest(digest.SHA256, h); got != diffID {
		return counted.N, fmt.Errorf("uncompressed content has digest %s, but the config's diff_id is %s", got, diffID)
	}
	return counted.N, nil
}

// readAhead reads r in its own goroutine, up to depth chunks ahead of its reader, so that producing a stream
// (decompressing, hashing) overlaps with consuming it.
type readAhead struct {
	full, free chan []byte
	done       chan struct{}
	exited     chan struct{}
	buf        []byte // the chunk being read, whole
	cur        []byte // its unread part
	err        error  // the producer's final error, valid once full is closed
}

func newReadAhead(r io.Reader, size, depth int) *readAhead {
	ra := &readAhead{full: make(chan []byte, depth), free: make(chan []byte, depth+1), done: make(chan struct{}), exited: make(chan struct{})}
	for range depth + 1 {
		ra.free <- make([]byte, size)
	}
	go func() {
		defer close(ra.exited)
		defer close(ra.full)
		for {
			var b []byte
			select {
			case b = <-ra.free:
			case <-ra.done:
				return
			}
			// Not io.ReadFull: it would turn r's own io.ErrUnexpectedEOF (a truncated gzip stream) into a short
			// chunk before a clean end.
			n := 0
			var err error
			for n < cap(b) && err == nil {
				var k int
				k, err = r.Read(b[n:cap(b)])
				n += k
			}
			if n > 0 {
				select {
				case ra.full <- b[:n]:
				case <-ra.done:
					return
				}
			}
			if err != nil {
				ra.err = err
				return
			}
		}
	}()
	return ra
}

func (ra *readAhead) Read(p []byte) (int, error) {
	for len(ra.cur) == 0 {
		b, ok := <-ra.full
		if !ok {
			return 0, ra.err
		}
		ra.buf, ra.cur = b, b
	}
	n := copy(p, ra.cur)
	ra.cur = ra.cur[n:]
	if len(ra.cur) == 0 {
		ra.free <- ra.buf
	}
	return n, nil
}

// Close stops the producer and waits until it has returned.
func (ra *readAhead) Close() {
	close(ra.done)
	<-ra.exited
}

// blobReader reads the uncompressed content of a layer blob, saying in its errors that they come from the blob.
type blobReader struct {
	r    io.Reader
	comp decompress.Compression
}

func (b blobReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	switch {
	case err == nil || err == io.EOF:
	case errors.Is(err, io.ErrUnexpectedEOF):
		err = fmt.Errorf("layer blob (compression: %s) is truncated: its stream ends early: %w", b.comp, err)
	default:
		err = fmt.Errorf("reading layer blob (compression: %s): %w", b.comp, err)
	}
	return n, err
}

// writeMetadata builds the converted config (diff_ids = blob digests, as overlaybd layers are uncompressed tars)
// and manifest.
func (c *converter) writeMetadata(res *Result, cfg map[string]json.RawMessage, src ocispec.Manifest, srcDesc ocispec.Descriptor) error {
	var rootfs ocispec.RootFS
	json.Unmarshal(cfg["rootfs"], &rootfs)
	rootfs.DiffIDs = nil
	for _, b := range res.Blobs {
		d := b.Desc.Digest
		if b.DiffID != "" {
			d = b.DiffID
		}
		rootfs.DiffIDs = append(rootfs.DiffIDs, d)
	}
	rb, err := json.Marshal(rootfs)
	if err != nil {
		return err
	}
	cfg["rootfs"] = rb
	if res.Config, err = json.Marshal(cfg); err != nil {
		return err
	}
	cfgType, manType := image.MediaTypeDockerConfig, image.MediaTypeDockerManifest
	if c.opts.OCI {
		cfgType, manType = ocispec.MediaTypeImageConfig, ocispec.MediaTypeImageManifest
	}
	res.ConfigDesc = ocispec.Descriptor{MediaType: cfgType, Digest: digest.FromBytes(res.Config), Size: int64(len(res.Config))}
	man := ocispec.Manifest{MediaType: manType, Config: res.ConfigDesc, Annotations: src.Annotations}
	man.SchemaVersion = 2
	if c.opts.Referrer {
		man.ArtifactType = c.opts.artifactType()
		man.Subject = &ocispec.Descriptor{MediaType: srcDesc.MediaType, Digest: srcDesc.Digest, Size: srcDesc.Size}
	}
	for _, b := range res.Blobs {
		man.Layers = append(man.Layers, b.Desc)
	}
	if res.Manifest, err = json.MarshalIndent(man, "", "  "); err != nil {
		return err
	}
	res.ManifestDesc = ocispec.Descriptor{MediaType: manType, Digest: digest.FromBytes(res.Manifest), Size: int64(len(res.Manifest))}
	return nil
}
