package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	obdconfig "github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/health"
)

// errUnhealthy makes 'obd health' exit with status 1 after it printed its report (main prints errors and exits 1).
var errUnhealthy = errors.New("unhealthy")

func newHealthCmd() *cobra.Command {
	var (
		opts    health.Options
		verbose bool
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "health",
		Short: "Check that this node can run obd: kernel, obd-snapshotter, containerd, configuration, credentials, cache, devices",
		Long: `Check the node and print one line per check: OK, WARN or FAIL, and for each problem a one-line fix.

  kernel       FUSE (/dev/fuse, "fuse" in /proc/filesystems), loop devices (/dev/loop-control), ext4 and overlay
  config       obd.toml parses and its values are valid (the daemon's own loader)
  credentials  the registry credentials file parses
  snapshotter  its gRPC socket exists and accepts connections; its status endpoint answers /healthz
  containerd   its config registers [proxy_plugins.overlaybd] (type "snapshot", the same address); it answers
  cache        free space under the cache directory and how full the cache is
  cache snapshots  on a node that imported some: whether their blobs are still cached and layers of its images
  devices      the state of each image device (lazy, downloaded, failed, hung reads)

Paths come from obd.toml; every one can be overridden by a flag. The exit status is 1 when any check fails.`,
		Example: "  obd health\n  obd health -v --containerd-config /etc/containerd/config.toml",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts.ConfigExplicit = cmd.Flags().Changed("config")
			results := health.Run(cmd.Context(), opts)
			if asJSON {
				if err := printJSON(cmd.OutOrStdout(), results); err != nil {
					return err
				}
			} else {
				health.WriteText(cmd.OutOrStdout(), results, verbose)
			}
			if failed := health.Count(results, health.Fail); failed > 0 {
				return fmt.Errorf("%w: %d of %d checks failed", errUnhealthy, failed, len(results))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.BoolVarP(&verbose, "verbose", "v", false, "also print what each check looked at")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	f.StringVar(&opts.ConfigPath, "config", obdconfig.DefaultPath, "obd.toml")
	f.StringVar(&opts.ContainerdConfig, "containerd-config", health.DefaultContainerdConfig, "containerd's config.toml")
	f.StringVar(&opts.ContainerdAddress, "containerd-address", health.DefaultContainerdAddress, "containerd's gRPC socket")
	f.StringVar(&opts.SnapshotterAddress, "snapshotter-address", "", "obd-snapshotter's gRPC socket (default: snapshotter.address of obd.toml)")
	f.StringVar(&opts.StatusSocket, "socket", "", "obd-snapshotter's status socket (default: from obd.toml)")
	f.StringVar(&opts.Credentials, "credentials", "", "registry credentials file, docker config.json format (default: registry.docker_config of obd.toml, else ~/.docker/config.json)")
	f.StringVar(&opts.CacheDir, "cache-dir", "", "block cache directory (default: cache.dir of obd.toml)")
	f.Int64Var(&opts.MinFreeBytes, "min-free", health.DefaultMinFreeBytes, "warn when the cache's filesystem has fewer free bytes")
	f.StringVar(&opts.ProcFilesystems, "proc-filesystems", health.DefaultProcFilesystems, "the kernel's list of filesystems")
	f.StringVar(&opts.DevFuse, "dev-fuse", health.DefaultDevFuse, "the FUSE device")
	f.StringVar(&opts.LoopControl, "loop-control", health.DefaultLoopControl, "the loop control device")
	f.DurationVar(&opts.Timeout, "timeout", 0, "how long to wait for each daemon (default 5s)")
	return cmd
}
