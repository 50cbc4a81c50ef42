// Package cacheclient is the client side of 'obd cache': the overlaybd layers of the images in containerd that
// name what to warm, evict, keep or export, the recorded start to warm, the cache listing, and the import of a
// cache snapshot into the daemon (also 'obd install --cache-from').
package cacheclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/atomicfile"
	"github.com/obdproject/obd/internal/cachesnap"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/profile"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/internal/units"
)

// pulledImage is a pulled overlaybd image in containerd: its overlaybd layers, and what names its recorded start.
type pulledImage struct {
	ref     string
	blocks  []image.BlockLayer
	accel   *ocispec.Descriptor // the acceleration layer, if any
	chainID digest.Digest       // of the overlaybd layers: the key of a profile registered on the node
	store   content.Store
}

// layers reads the overlaybd layers of the pulled image ref from containerd; ctx names the namespace. The image
// reads its acceleration layer through c: keep c open while it is used.
func layers(ctx context.Context, c *client.Client, ref string) (*pulledImage, error) {
	img, err := c.GetImage(ctx, ref)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w (pull it first with 'obd pull')", ref, err)
	}
	return layersOf(ctx, c, img)
}

func layersOf(ctx context.Context, c *client.Client, img client.Image) (*pulledImage, error) {
	m, err := images.Manifest(ctx, c.ContentStore(), img.Target(), platforms.Default())
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", img.Name(), err)
	}
	blocks, err := image.BlockLayers(m)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", img.Name(), err)
	}
	im := &pulledImage{ref: img.Name(), blocks: blocks, store: c.ContentStore()}
	diffIDs, err := img.RootFS(ctx)
	if err != nil || len(diffIDs) != len(m.Layers) {
		return nil, fmt.Errorf("image %s: its config's diff_ids do not match its layers (%v)", img.Name(), err)
	}
	var blockDiffs []digest.Digest
	for i, l := range m.Layers {
		if l.Annotations[image.AnnotationAccelerationLayer] == "yes" {
			im.accel = &m.Layers[i]
			continue
		}
		blockDiffs = append(blockDiffs, diffIDs[i])
	}
	im.chainID = identity.ChainID(blockDiffs)
	return im, nil
}

// digests returns the blob digests of the image's overlaybd layers, bottom first.
func (im *pulledImage) digests() []string {
	ds := make([]string, len(im.blocks))
	for i, l := range im.blocks {
		ds[i] = l.BlobDigest.String()
	}
	return ds
}

// allLayers lists the overlaybd layer blobs of every image in every containerd namespace.
func allLayers(ctx context.Context, c *client.Client) ([]string, error) {
	nss, err := c.NamespaceService().List(ctx)
	if err != nil {
		return nil, err
	}
	var keep []string
	for _, ns := range nss {
		ctx := namespaces.WithNamespace(ctx, ns)
		imgs, err := c.ListImages(ctx)
		if err != nil {
			return nil, err
		}
		for _, img := range imgs {
			im, err := layersOf(ctx, c, img)
			if err != nil {
				continue // not an overlaybd image, or not complete
			}
			keep = append(keep, im.digests()...)
		}
	}
	return keep, nil
}

// warmRequest asks to warm the image: all of it with all, else the ranges of the trace file trace.
func (im *pulledImage) warmRequest(all bool, trace []byte) status.WarmRequest {
	req := status.WarmRequest{ImageRef: im.ref, All: all, Trace: trace}
	for _, l := range im.blocks {
		req.Layers = append(req.Layers, status.WarmLayer{Digest: l.BlobDigest.String(), Size: l.BlobSize})
	}
	return req
}

// startTrace returns the trace file of the image's recorded start: profileFile (a trace file or a profile) when
// given, else its acceleration layer (ctx names the namespace), else the profile registered on the node in the
// profiles directory profilesDir returns.
func (im *pulledImage) startTrace(ctx context.Context, profileFile string, profilesDir func() (string, error)) ([]byte, error) {
	if profileFile != "" {
		b, err := os.ReadFile(profileFile)
		if err != nil {
			return nil, err
		}
		tf, err := profile.TraceFile(b)
		if err != nil {
			return nil, fmt.Errorf("--profile %s: neither a trace file nor a profile with reads", profileFile)
		}
		return tf, nil
	}
	if im.accel != nil {
		b, err := content.ReadBlob(ctx, im.store, *im.accel)
		if err != nil {
			return nil, fmt.Errorf("acceleration layer of %s: %w", im.ref, err)
		}
		return profile.TraceOfLayer(b)
	}
	dir, err := profilesDir()
	if err != nil {
		return nil, err
	}
	path := snapshotter.ProfilePath(dir, im.chainID.String())
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s has no acceleration layer and no profile registered on this node (%s): give --profile FILE or --all", im.ref, path)
	}
	return b, nil
}

// warmResult says what a warm of req did (last is the daemon's last progress line), and fails when the cache
// filled up or the warm failed.
func warmResult(w io.Writer, req status.WarmRequest, last status.WarmProgress) error {
	what := "its recorded start"
	if req.All {
		what = fmt.Sprintf("all of it (%d of %d blobs verified)", last.Verified, len(req.Layers))
	}
	fmt.Fprintf(w, "warmed %s: %s: %s of %s cached\n", req.ImageRef, what, units.Bytes(last.DoneBytes), units.Bytes(last.TotalBytes))
	if last.Full {
		return fmt.Errorf("the cache is full: %s of %s did not fit (raise [cache] size_gb, or evict or prune other images)",
			units.Bytes(last.TotalBytes-last.DoneBytes), units.Bytes(last.TotalBytes))
	}
	if last.Error != "" {
		return errors.New(last.Error)
	}
	return nil
}

// exportQuery selects the blobs of images for the daemon's export (every cached blob when there is none).
func exportQuery(images []*pulledImage) url.Values {
	q := url.Values{}
	for _, im := range images {
		for _, d := range im.digests() {
			q.Add("digest", d)
		}
	}
	return q
}

// WriteBlobs writes the cached blobs as a table.
func WriteBlobs(w io.Writer, blobs []status.CacheBlob) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BLOB\tCACHED\tSIZE\tBLOCKS\tLAST USE\tIMAGES")
	for _, b := range blobs {
		images := strings.Join(b.Images, ",")
		if images == "" {
			images = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%s\t%s\n", b.Digest, units.Bytes(b.CachedBytes), units.Bytes(b.Size), b.Blocks,
			b.TotalBlocks, b.LastUse.Format(time.DateTime), images)
	}
	return tw.Flush()
}

// Import loads the snapshot at src (a file, oci:DIR[:TAG] or REGISTRY/REPO:TAG; rc gives registry clients) into
// the daemon's cache, and writes what it did to out and each blob that failed to errw. It fails when any block
// failed its check or did not fit.
func Import(ctx context.Context, sc *status.Client, src string, rc cachesnap.RegistryClient, out, errw io.Writer) error {
	r, err := cachesnap.Open(ctx, src, rc)
	if err != nil {
		return err
	}
	defer r.Close()
	res, err := sc.Import(ctx, src, r)
	if err != nil {
		return err
	}
	var imported, present, dropped int64
	var verified, full, failed int
	for _, b := range res {
		imported, present, dropped = imported+b.Imported, present+b.Present, dropped+b.Dropped
		if b.Verified {
			verified++
		}
		if b.Full {
			full++
		}
		if b.Error != "" {
			failed++
			fmt.Fprintf(errw, "blob %s: %s\n", b.Digest, b.Error)
		}
	}
	fmt.Fprintf(out, "imported %d blobs from %s: %d blocks stored, %d present already, %d dropped (bad sums); %d blobs complete and verified\n",
		len(res), src, imported, present, dropped, verified)
	switch {
	case full > 0:
		return fmt.Errorf("the cache filled up: %d blobs were not imported whole (raise [cache] size_gb)", full)
	case failed > 0 || dropped > 0:
		return fmt.Errorf("%d blobs failed their digest and %d blocks their sums: those were dropped, never served", failed, dropped)
	}
	return nil
}

// WaitAndImport waits up to wait until the daemon of sc serves its cache, then imports the snapshot at src
// (Import).
func WaitAndImport(ctx context.Context, sc *status.Client, wait time.Duration, src string, rc cachesnap.RegistryClient, out, errw io.Writer) error {
	for deadline := time.Now().Add(wait); ; time.Sleep(500 * time.Millisecond) {
		_, err := sc.CacheBlobs(ctx)
		if err == nil {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("the cache snapshot %s was not imported: %w — start obd-snapshotter, then run 'obd cache import %s'", src, err, src)
		}
	}
	return Import(ctx, sc, src, rc, out, errw)
}

// Client runs the 'obd cache' commands against the daemon's cache API, naming images through containerd.
type Client struct {
	Status *status.Client
	// Containerd connects to containerd, only when an image is named.
	Containerd func() (*client.Client, error)
	Namespace  string // containerd namespace of the images named
}

// images reads the overlaybd layers of the named images from containerd; done closes the connection they read
// their acceleration layers through.
func (c *Client) images(ctx context.Context, refs []string) (ims []*pulledImage, done func(), err error) {
	if len(refs) == 0 {
		return nil, func() {}, nil
	}
	cc, err := c.Containerd()
	if err != nil {
		return nil, nil, err
	}
	for _, ref := range refs {
		im, err := layers(namespaces.WithNamespace(ctx, c.Namespace), cc, ref)
		if err != nil {
			cc.Close()
			return nil, nil, err
		}
		ims = append(ims, im)
	}
	return ims, func() { cc.Close() }, nil
}

// Evict drops the cached blocks of blobs: each arg is a blob digest or an image whose overlaybd layers to drop.
func (c *Client) Evict(ctx context.Context, args []string) (status.EvictResult, error) {
	var req status.EvictRequest
	for _, a := range args {
		if d, err := digest.Parse(a); err == nil {
			req.Digests = append(req.Digests, d.String())
			continue
		}
		ims, done, err := c.images(ctx, []string{a})
		if err != nil {
			return status.EvictResult{}, err
		}
		done()
		req.Digests = append(req.Digests, ims[0].digests()...)
	}
	return c.Status.Evict(ctx, req)
}

// Prune drops the cached blobs of images that are in no containerd namespace.
func (c *Client) Prune(ctx context.Context) (status.EvictResult, error) {
	cc, err := c.Containerd()
	if err != nil {
		return status.EvictResult{}, err
	}
	defer cc.Close()
	keep, err := allLayers(ctx, cc)
	if err != nil {
		return status.EvictResult{}, err
	}
	return c.Status.Prune(ctx, status.PruneRequest{Keep: keep})
}

// Warm fills the cache with the blocks of the image ref: all of them with all, else the ranges of its recorded
// start (startTrace). bar, when set, sees the progress. It writes what it did to w (warmResult).
func (c *Client) Warm(ctx context.Context, w io.Writer, ref string, all bool, profileFile string, profilesDir func() (string, error), bar func(done, total int64)) error {
	ims, done, err := c.images(ctx, []string{ref})
	if err != nil {
		return err
	}
	defer done()
	var trace []byte
	if !all {
		if trace, err = ims[0].startTrace(namespaces.WithNamespace(ctx, c.Namespace), profileFile, profilesDir); err != nil {
			return err
		}
	}
	req := ims[0].warmRequest(all, trace)
	last, err := c.Status.Warm(ctx, req, func(p status.WarmProgress) {
		if bar != nil && p.TotalBytes > 0 && !p.Done {
			bar(p.DoneBytes, p.TotalBytes)
		}
	})
	if err != nil {
		return err
	}
	return warmResult(w, req, last)
}

// Export snapshots the cached blocks of the images refs (of every cached blob when there is none) to to (a file,
// oci:DIR[:TAG] or REGISTRY/REPO:TAG; rc gives registry clients), and writes what it did to w.
func (c *Client) Export(ctx context.Context, w io.Writer, refs []string, to string, rc cachesnap.RegistryClient) error {
	ims, done, err := c.images(ctx, refs)
	if err != nil {
		return err
	}
	done()
	if path, ok := cachesnap.IsFile(to); ok {
		res, err := c.exportFile(ctx, exportQuery(ims), path)
		if err == nil {
			fmt.Fprintf(w, "exported %d blobs, %d blocks, %s to %s\n", res.Blobs, res.Blocks, units.Bytes(res.DataBytes), to)
			return nil
		}
		if !errors.Is(err, status.ErrNotShared) {
			return err
		}
	}
	body, err := c.Status.Stream(ctx, "GET", status.PathCacheExport+"?"+exportQuery(ims).Encode(), nil)
	if err != nil {
		return err
	}
	defer body.Close()
	n, idx, err := cachesnap.Write(ctx, to, body, rc)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "exported %d blobs, %d blocks, %s to %s\n", len(idx.Blobs), idx.Blocks(), units.Bytes(n), to)
	return nil
}

// exportFile has the daemon write the snapshot into a new file that then replaces path; it fails with
// status.ErrNotShared when the daemon does not see the file.
func (c *Client) exportFile(ctx context.Context, query url.Values, path string) (status.ExportResult, error) {
	path, err := filepath.Abs(path)
	if err != nil {
		return status.ExportResult{}, err
	}
	var res status.ExportResult
	err = atomicfile.Replace(path, 0o644, func(f *os.File) (err error) {
		res, err = c.Status.ExportFile(ctx, query, f)
		return err
	})
	return res, err
}
