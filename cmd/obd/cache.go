package main

import (
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/client"
	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/cacheclient"
	obdconfig "github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/progress"
	"github.com/obdproject/obd/internal/pull"
	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/internal/units"
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

// client returns the cache client: the daemon's status socket, with --timeout for short calls, and containerd.
func (f *cacheFlags) client(cmd *cobra.Command) (*cacheclient.Client, error) {
	sock, err := f.df.statusSocket(cmd)
	if err != nil {
		return nil, err
	}
	return &cacheclient.Client{Status: status.NewClient(sock, f.df.timeout), Containerd: func() (*client.Client, error) { return pull.Connect(f.cf.address) }, Namespace: f.cf.namespace}, nil
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
			blobs, err := sc.Status.CacheBlobs(cmd.Context())
			if err != nil {
				return f.df.notRunningHint(err)
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), blobs)
			}
			return cacheclient.WriteBlobs(cmd.OutOrStdout(), blobs)
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
			cc, err := f.client(cmd)
			if err != nil {
				return err
			}
			res, err := cc.Evict(cmd.Context(), args)
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
			cc, err := f.client(cmd)
			if err != nil {
				return err
			}
			res, err := cc.Prune(cmd.Context())
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
			cc, err := f.client(cmd)
			if err != nil {
				return err
			}
			profilesDir := func() (string, error) {
				cfg, _, err := obdconfig.Load(f.df.config, cmd.Flags().Changed("config"))
				return cfg.ProfilesDir(), err
			}
			bar := progress.Bar(progress.Terminal(cmd.ErrOrStderr()))
			return f.df.notRunningHint(cc.Warm(cmd.Context(), cmd.OutOrStdout(), args[0], all, profileFile, profilesDir, bar))
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
			cc, err := f.client(cmd)
			if err != nil {
				return err
			}
			return f.df.notRunningHint(cc.Export(cmd.Context(), cmd.OutOrStdout(), args, to, f.rf.client))
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
			return f.df.notRunningHint(cacheclient.Import(cmd.Context(), sc.Status, args[0], f.rf.client, cmd.OutOrStdout(), cmd.ErrOrStderr()))
		},
	}
	f.register(cmd)
	f.rf.register(cmd)
	return cmd
}
