// Package pull pulls images into containerd through the overlaybd snapshotter: overlaybd layers are committed as
// remote snapshots without fetching their blobs (the blocks are read lazily when containers run), other images are
// pulled and unpacked as usual.
package pull

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	dockerconfig "github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/units"
)

// Options configure Pull.
type Options struct {
	// Snapshotter is the containerd snapshotter to unpack into (default snapshotter.Name).
	Snapshotter string
	// PlainHTTP talks HTTP to the registry (always so for localhost).
	PlainHTTP bool
	// Credentials for the registry; nil reads the docker config file.
	Credentials registry.CredentialFunc
	// Resolver overrides the registry resolver (tests).
	Resolver remotes.Resolver
	// Referrers, when set, is used to look for an overlaybd image attached to the image as an OCI referrer
	// ('obd convert --referrer', see Referrer) before pulling it: when there is one, that image is pulled instead
	// (lazily) and stored under the reference asked for.
	Referrers *registry.Client
}

// Result tells what a pull did.
type Result struct {
	Image client.Image
	// Fetched lists the blobs fetched at pull time with their sizes (manifests, config, non-lazy layers).
	Fetched map[string]int64
	// Lazy counts the overlaybd layers committed without fetching.
	Lazy int
	// Layers counts all layers.
	Layers int
	// Referrer is the digest of the overlaybd referrer pulled in place of the image asked for, "" when none was.
	Referrer digest.Digest
	// Warnings say what went wrong without failing the pull.
	Warnings []string
	mu       sync.Mutex
}

// Unpacked returns the image ref when containerd has it unpacked with snapshotter, else nil.
func Unpacked(ctx context.Context, c *client.Client, ref, snapshotter string) (client.Image, error) {
	img, err := c.GetImage(ctx, ref)
	unpacked := false
	if err == nil {
		unpacked, err = img.IsUnpacked(ctx, snapshotter)
	}
	switch {
	case errdefs.IsNotFound(err):
		return nil, nil
	case err != nil:
		return nil, err
	case !unpacked:
		return nil, nil
	}
	return img, nil
}

// Summary says in one line what the pull did; elapsed is how long it took.
func (r *Result) Summary(elapsed time.Duration) string {
	var fetched int64
	for _, n := range r.Fetched {
		fetched += n
	}
	via := ""
	if r.Referrer != "" {
		via = " (its overlaybd referrer " + r.Referrer.String() + ")"
	}
	return fmt.Sprintf("pulled %s%s in %s: %d layers, %d lazy (not downloaded); fetched %d blobs, %s",
		r.Image.Name(), via, elapsed.Round(time.Millisecond), r.Layers, r.Lazy, len(r.Fetched), units.Bytes(fetched))
}

// Pull pulls ref (host[:port]/repo:tag) into containerd and unpacks it with the overlaybd snapshotter.
func Pull(ctx context.Context, c *client.Client, ref string, opts Options) (*Result, error) {
	r, err := image.ParseRef(ref)
	if err != nil {
		return nil, err
	}
	if r.Transport != image.TransportRegistry {
		return nil, fmt.Errorf("%s: pull needs a registry reference (host[:port]/repo:tag)", ref)
	}
	if opts.Snapshotter == "" {
		opts.Snapshotter = snapshotter.Name
	}
	resolver := opts.Resolver
	if resolver == nil {
		if resolver, err = newResolver(ctx, r.Host(), opts); err != nil {
			return nil, err
		}
	}
	res := &Result{Fetched: map[string]int64{}}
	pullRef := r.String()
	if opts.Referrers != nil {
		// containerd first: a pull that cannot reach it fails at once, before any registry retries.
		if _, err := c.Version(ctx); err != nil {
			return nil, fmt.Errorf("pull %s: containerd: %w", ref, err)
		}
		d, err := Referrer(ctx, opts.Referrers, r, image.DefaultPlatform())
		var le *ListError
		switch {
		case errors.As(err, &le):
			res.Warnings = append(res.Warnings, fmt.Sprintf("no overlaybd referrer looked for (pulling %s as it is): %v", ref, err))
		case err != nil:
			return nil, fmt.Errorf("pull %s: look for an overlaybd image attached to it: %w", ref, err)
		case d != nil:
			res.Referrer, pullRef = d.Digest, r.Name+"@"+d.Digest.String()
		}
	}
	rec := &recorder{Resolver: resolver, res: res}
	img, err := c.Pull(ctx, pullRef, client.WithResolver(rec), client.WithPullUnpack,
		client.WithPullSnapshotter(opts.Snapshotter), client.WithImageHandlerWrapper(LabelLayers(pullRef, res)))
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", pullRef, err)
	}
	if pullRef != r.String() {
		if img, err = rename(ctx, c, img, r.String()); err != nil {
			return nil, fmt.Errorf("pull %s: name the pulled referrer %s: %w", ref, res.Referrer, err)
		}
	}
	res.Image = img
	return res, nil
}

// rename stores img under name instead of its own name.
func rename(ctx context.Context, c *client.Client, img client.Image, name string) (client.Image, error) {
	is := c.ImageService()
	meta := img.Metadata()
	old := meta.Name
	meta.Name = name
	_, err := is.Create(ctx, meta)
	if errdefs.IsAlreadyExists(err) {
		_, err = is.Update(ctx, meta)
	}
	if err != nil {
		return nil, err
	}
	if err := is.Delete(ctx, old); err != nil && !errdefs.IsNotFound(err) {
		return nil, err
	}
	return client.NewImage(c, meta), nil
}

func newResolver(ctx context.Context, host string, opts Options) (remotes.Resolver, error) {
	creds := opts.Credentials
	if creds == nil {
		var err error
		if creds, err = registry.LoadDockerConfig(registry.DefaultDockerConfigPath()); err != nil {
			return nil, err
		}
	}
	scheme := "https"
	if opts.PlainHTTP || registry.IsLocalhost(host) {
		scheme = "http"
	}
	hosts := dockerconfig.ConfigureHosts(ctx, dockerconfig.HostOptions{
		DefaultScheme: scheme,
		Credentials: func(h string) (string, string, error) {
			return creds(ctx, h)
		},
	})
	return docker.NewResolver(docker.ResolverOptions{Hosts: hosts}), nil
}

// LabelLayers adds to the layers of every manifest the annotations the snapshotter needs as labels (containerd's
// unpacker passes `containerd.io/snapshot/` annotations on): the image reference to fetch blobs from lazily. It
// counts layers into res when res is set.
func LabelLayers(ref string, res *Result) func(images.Handler) images.Handler {
	return func(h images.Handler) images.Handler {
		return images.HandlerFunc(func(ctx context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
			children, err := h.Handle(ctx, desc)
			if err != nil || !images.IsManifestType(desc.MediaType) {
				return children, err
			}
			for i := range children {
				if !images.IsLayerType(children[i].MediaType) {
					continue
				}
				a := maps.Clone(children[i].Annotations)
				if a == nil {
					a = map[string]string{}
				}
				a[snapshotter.LabelImageRef] = ref
				a[snapshotter.LabelCRILayerDigest] = children[i].Digest.String()
				a[snapshotter.LabelCRIImageLayers] = layersFrom(children[i:])
				_, overlaybd := a[image.AnnotationBlobDigest]
				children[i].Annotations = a
				if res != nil {
					res.count(overlaybd)
				}
			}
			return children, nil
		})
	}
}

// maxLabel bounds a label's key and value together (containerd's labels.Validate).
const maxLabel = 4096

// layersFrom returns the digests of the layers of descs, comma-separated, as many as LabelCRIImageLayers holds (as
// the CRI plugin writes it).
func layersFrom(descs []ocispec.Descriptor) string {
	var b strings.Builder
	for _, d := range descs {
		if !images.IsLayerType(d.MediaType) {
			continue
		}
		item := d.Digest.String()
		if b.Len() > 0 {
			item = "," + item
		}
		if len(snapshotter.LabelCRIImageLayers)+b.Len()+len(item) > maxLabel {
			break
		}
		b.WriteString(item)
	}
	return b.String()
}

func (r *Result) count(lazy bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.Layers++
	if lazy {
		r.Lazy++
	}
}

// recorder notes every blob fetched from the registry during the pull.
type recorder struct {
	remotes.Resolver
	res *Result
}

func (r *recorder) Fetcher(ctx context.Context, ref string) (remotes.Fetcher, error) {
	f, err := r.Resolver.Fetcher(ctx, ref)
	if err != nil {
		return nil, err
	}
	return remotes.FetcherFunc(func(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
		r.res.mu.Lock()
		r.res.Fetched[desc.Digest.String()] = desc.Size
		r.res.mu.Unlock()
		return f.Fetch(ctx, desc)
	}), nil
}
