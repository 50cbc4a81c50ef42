package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
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
	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/cachesnap"
	obdconfig "github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/profile"
	"github.com/obdproject/obd/internal/progress"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/internal/units"
	"github.com/obdproject/obd/trace"
)

// cacheFlags are the flags of the obd cache commands: the daemon to ask, and containerd for image names.
type cacheFlags struct {
	df daemonFlags
	cf containerdFlags
	rf registryFlags
}

func (f *cacheFlags) register(cmd *cobra.Command) {
	f.df.register(cmd)
	f.cf.register(cmd)
}

// client returns a status client without a per-request timeout beyond --timeout for short calls.
func (f *cacheFlags) client(cmd *cobra.Command) (*status.Client, error) {
	sock, err := f.df.statusSocket(cmd)
	if err != nil {
		return nil, err
	}
	return status.NewClient(sock, f.df.timeout), nil
}

func newCacheCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cache",
		Short: "Warm, list, evict, export and import the node's block cache",
		Long: `The block cache of obd-snapshotter holds the blocks of overlaybd layer blobs that containers read. These commands
fill it ahead of time (warm), show and drop what it holds (ls, evict, prune), and move it between nodes: export takes
a consistent snapshot while the daemon serves reads, to a file, an OCI layout or a registry (an OCI artifact, one
data blob per layer blob, shared between snapshots); import loads one on another node, checking every block.`,
	}
	cmd.AddCommand(newCacheLsCmd(), newCacheEvictCmd(), newCachePruneCmd(), newCacheWarmCmd(), newCacheExportCmd(), newCacheImportCmd())
	return cmd
}

func newCacheLsCmd() *cobra.Command {
	var (
		f      cacheFlags
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "ls",
		Short: "List the cached blobs: cached bytes and blocks, last use, the attached images that use them",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			sc, err := f.client(cmd)
			if err != nil {
				return err
			}
			blobs, err := sc.CacheBlobs(cmd.Context())
			if err != nil {
				return f.df.notRunningHint(err)
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(blobs)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
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
		},
	}
	f.df.register(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newCacheEvictCmd() *cobra.Command {
	var f cacheFlags
	cmd := &cobra.Command{
		Use:   "evict IMAGE|BLOB...",
		Short: "Drop the cached blocks of blobs, or of an image's overlaybd layers (blocks being read stay)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var req status.EvictRequest
			for _, a := range args {
				if d, err := digest.Parse(a); err == nil {
					req.Digests = append(req.Digests, d.String())
					continue
				}
				layers, err := f.imageLayers(cmd, a)
				if err != nil {
					return err
				}
				for _, l := range layers.blocks {
					req.Digests = append(req.Digests, l.BlobDigest.String())
				}
			}
			sc, err := f.client(cmd)
			if err != nil {
				return err
			}
			res, err := sc.Evict(cmd.Context(), req)
			if err != nil {
				return f.df.notRunningHint(err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "evicted %d blobs, %s\n", res.Blobs, units.Bytes(res.FreedBytes))
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

func newCachePruneCmd() *cobra.Command {
	var f cacheFlags
	cmd := &cobra.Command{
		Use:   "prune",
		Short: "Drop the cached blobs of images that are no longer on the node (in no containerd namespace)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			keep, err := f.allLayers(cmd)
			if err != nil {
				return err
			}
			sc, err := f.client(cmd)
			if err != nil {
				return err
			}
			res, err := sc.Prune(cmd.Context(), status.PruneRequest{Keep: keep})
			if err != nil {
				return f.df.notRunningHint(err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "pruned %d blobs, %s\n", res.Blobs, units.Bytes(res.FreedBytes))
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

func newCacheWarmCmd() *cobra.Command {
	var (
		f           cacheFlags
		profileFile string
		all         bool
	)
	cmd := &cobra.Command{
		Use:   "warm IMAGE",
		Short: "Fill the cache with an image's startup blocks (its acceleration layer, --profile) or all of it (--all)",
		Long: `Fill the daemon's block cache with the blocks of a pulled overlaybd image before any container runs: the ranges
of its recorded start (its acceleration layer, a profile registered on the node, or --profile: a trace file or a
profile written by 'obd profile --out'), or with --all its whole layer blobs, each checked against its digest. What
is cached already is not fetched again; nothing cached is evicted, and it says so when the image does not fit.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if all && profileFile != "" {
				return errors.New("--all and --profile: give one")
			}
			layers, err := f.imageLayers(cmd, args[0])
			if err != nil {
				return err
			}
			req := status.WarmRequest{ImageRef: layers.ref, All: all}
			for _, l := range layers.blocks {
				req.Layers = append(req.Layers, status.WarmLayer{Digest: l.BlobDigest.String(), Size: l.BlobSize})
			}
			if !all {
				if req.Trace, err = f.startTrace(cmd, layers, profileFile); err != nil {
					return err
				}
			}
			sc, err := f.client(cmd)
			if err != nil {
				return err
			}
			bar := progress.Bar(progress.Terminal(cmd.ErrOrStderr()))
			last, err := sc.Warm(cmd.Context(), req, func(p status.WarmProgress) {
				if bar != nil && p.TotalBytes > 0 && !p.Done {
					bar(p.DoneBytes, p.TotalBytes)
				}
			})
			if err != nil {
				return f.df.notRunningHint(err)
			}
			what := "its recorded start"
			if all {
				what = fmt.Sprintf("all of it (%d of %d blobs verified)", last.Verified, len(req.Layers))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "warmed %s: %s: %s of %s cached\n", layers.ref, what, units.Bytes(last.DoneBytes), units.Bytes(last.TotalBytes))
			if last.Full {
				return fmt.Errorf("the cache is full: %s of %s did not fit (raise [cache] size_gb, or evict or prune other images)",
					units.Bytes(last.TotalBytes-last.DoneBytes), units.Bytes(last.TotalBytes))
			}
			if last.Error != "" {
				return errors.New(last.Error)
			}
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&profileFile, "profile", "", "trace file (upstream's format) or profile (JSON of 'obd profile --out') to warm")
	cmd.Flags().BoolVar(&all, "all", false, "warm the whole image")
	return cmd
}

func newCacheExportCmd() *cobra.Command {
	var (
		f  cacheFlags
		to string
	)
	cmd := &cobra.Command{
		Use:   "export [IMAGE...] --to FILE|oci:DIR[:TAG]|REGISTRY/REPO:TAG",
		Short: "Snapshot the cached blocks of images (all when none is named) while the daemon serves reads",
		Long: `Snapshot the cached blocks of the named images' overlaybd layers (of every cached blob when none is named)
while the daemon runs: no block is torn, no container stops. FILE (a path ending in .tar, or starting with / or .)
gets a tar; oci:DIR[:TAG] and registry references get an OCI artifact (docs/format.md) whose data blobs are
per layer blob, so snapshots of images sharing layers share them.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return errors.New("--to: where to write the snapshot")
			}
			q := ""
			for i, a := range args {
				layers, err := f.imageLayers(cmd, a)
				if err != nil {
					return err
				}
				for j, l := range layers.blocks {
					sep := "&"
					if i == 0 && j == 0 {
						sep = "?"
					}
					q += sep + "digest=" + l.BlobDigest.String()
				}
			}
			sc, err := f.client(cmd)
			if err != nil {
				return err
			}
			body, err := sc.Stream(cmd.Context(), "GET", status.PathCacheExport+q, nil)
			if err != nil {
				return f.df.notRunningHint(err)
			}
			defer body.Close()
			n, idx, err := cachesnap.Write(cmd.Context(), to, body, f.rf.client)
			if err != nil {
				return err
			}
			var blocks int
			for _, e := range idx.Blobs {
				blocks += len(e.Blocks)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "exported %d blobs, %d blocks, %s to %s\n", len(idx.Blobs), blocks, units.Bytes(n), to)
			return nil
		},
	}
	f.register(cmd)
	f.rf.register(cmd)
	cmd.Flags().StringVar(&to, "to", "", "FILE, oci:DIR[:TAG] or REGISTRY/REPO:TAG")
	return cmd
}

func newCacheImportCmd() *cobra.Command {
	var f cacheFlags
	cmd := &cobra.Command{
		Use:   "import FILE|oci:DIR[:TAG]|REGISTRY/REPO:TAG",
		Short: "Load a cache snapshot into the daemon's cache, checking every block; blocks that fail are dropped",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sc, err := f.client(cmd)
			if err != nil {
				return err
			}
			return f.df.notRunningHint(importSnapshot(cmd, sc, &f.rf, args[0]))
		},
	}
	f.register(cmd)
	f.rf.register(cmd)
	return cmd
}

// importSnapshot loads the snapshot at src into the daemon's cache and prints what it did; it fails when any block
// failed its check or did not fit.
func importSnapshot(cmd *cobra.Command, sc *status.Client, rf *registryFlags, src string) error {
	r, err := cachesnap.Open(cmd.Context(), src, rf.client)
	if err != nil {
		return err
	}
	defer r.Close()
	res, err := sc.Import(cmd.Context(), src, r)
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
			fmt.Fprintf(cmd.ErrOrStderr(), "blob %s: %s\n", b.Digest, b.Error)
		}
	}
	fmt.Fprintf(cmd.OutOrStdout(), "imported %d blobs from %s: %d blocks stored, %d present already, %d dropped (bad sums); %d blobs complete and verified\n",
		len(res), src, imported, present, dropped, verified)
	switch {
	case full > 0:
		return fmt.Errorf("the cache filled up: %d blobs were not imported whole (raise [cache] size_gb)", full)
	case failed > 0 || dropped > 0:
		return fmt.Errorf("%d blobs failed their digest and %d blocks their sums: those were dropped, never served", failed, dropped)
	}
	return nil
}

// imageLayers are the overlaybd layers of an image in containerd.
type imageLayers struct {
	ref     string
	blocks  []image.BlockLayer
	accel   *ocispec.Descriptor // the acceleration layer, if any
	chainID digest.Digest
	store   content.Store
}

// imageLayers reads the overlaybd layers of a pulled image from containerd.
func (f *cacheFlags) imageLayers(cmd *cobra.Command, ref string) (*imageLayers, error) {
	c, err := f.cf.connect()
	if err != nil {
		return nil, err
	}
	defer c.Close()
	ctx := namespaces.WithNamespace(cmd.Context(), f.cf.namespace)
	img, err := c.GetImage(ctx, ref)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w (pull it first with 'obd pull')", ref, err)
	}
	return layersOf(ctx, c, img)
}

func layersOf(ctx context.Context, c *client.Client, img client.Image) (*imageLayers, error) {
	m, err := images.Manifest(ctx, c.ContentStore(), img.Target(), platforms.Default())
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", img.Name(), err)
	}
	blocks, err := image.BlockLayers(m)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", img.Name(), err)
	}
	il := &imageLayers{ref: img.Name(), blocks: blocks, store: c.ContentStore()}
	diffIDs, err := img.RootFS(ctx)
	if err != nil || len(diffIDs) != len(m.Layers) {
		return nil, fmt.Errorf("image %s: its config's diff_ids do not match its layers (%v)", img.Name(), err)
	}
	var blockDiffs []digest.Digest
	for i, l := range m.Layers {
		if l.Annotations[image.AnnotationAccelerationLayer] == "yes" {
			il.accel = &m.Layers[i]
			continue
		}
		blockDiffs = append(blockDiffs, diffIDs[i])
	}
	il.chainID = identity.ChainID(blockDiffs)
	return il, nil
}

// allLayers lists the overlaybd layer blobs of every image in every containerd namespace.
func (f *cacheFlags) allLayers(cmd *cobra.Command) ([]string, error) {
	c, err := f.cf.connect()
	if err != nil {
		return nil, err
	}
	defer c.Close()
	nss, err := c.NamespaceService().List(cmd.Context())
	if err != nil {
		return nil, err
	}
	var keep []string
	for _, ns := range nss {
		ctx := namespaces.WithNamespace(cmd.Context(), ns)
		imgs, err := c.ListImages(ctx)
		if err != nil {
			return nil, err
		}
		for _, img := range imgs {
			il, err := layersOf(ctx, c, img)
			if err != nil {
				continue // not an overlaybd image, or not complete
			}
			for _, l := range il.blocks {
				keep = append(keep, l.BlobDigest.String())
			}
		}
	}
	return keep, nil
}

// startTrace returns the trace to warm: --profile, the image's acceleration layer, or its registered profile.
func (f *cacheFlags) startTrace(cmd *cobra.Command, il *imageLayers, profileFile string) ([]byte, error) {
	if profileFile != "" {
		b, err := os.ReadFile(profileFile)
		if err != nil {
			return nil, err
		}
		if _, err := trace.Decode(b); err == nil {
			return b, nil
		}
		var p profile.Profile
		if err := json.Unmarshal(b, &p); err != nil || len(p.Reads) == 0 {
			return nil, fmt.Errorf("--profile %s: neither a trace file nor a profile with reads", profileFile)
		}
		recs := make([]trace.Record, len(p.Reads))
		for i, r := range p.Reads {
			recs[i] = trace.Record{Op: trace.Read, Layer: r.Layer, Count: r.Length, Offset: r.Offset}
		}
		var buf bytes.Buffer
		err = trace.Encode(&buf, recs)
		return buf.Bytes(), err
	}
	if il.accel != nil {
		ctx := namespaces.WithNamespace(cmd.Context(), f.cf.namespace)
		b, err := content.ReadBlob(ctx, il.store, *il.accel)
		if err != nil {
			return nil, fmt.Errorf("acceleration layer of %s: %w", il.ref, err)
		}
		return profile.TraceOfLayer(b)
	}
	cfg, _, err := obdconfig.Load(f.df.config, cmd.Flags().Changed("config"))
	if err != nil {
		return nil, err
	}
	path := snapshotter.ProfilePath(cfg.ProfilesDir(), il.chainID.String())
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s has no acceleration layer and no profile registered on this node (%s): give --profile FILE or --all", il.ref, path)
	}
	return b, nil
}
