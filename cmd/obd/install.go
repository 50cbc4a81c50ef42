package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/cacheclient"
	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/install"
	"github.com/obdproject/obd/internal/status"
)

func newInstallCmd() *cobra.Command {
	var (
		opts      install.Options
		prefix    string
		cacheFrom string
		rf        registryFlags
		wait      time.Duration
	)
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Set this node up for obd: obd.toml, containerd's proxy plugin, the systemd unit",
		Long: `install sets a node up to run overlaybd images with obd-snapshotter:

  - writes obd.toml (every setting at its default, commented out) if it is missing; an existing one is only
    checked, never overwritten;
  - registers the snapshotter in containerd's config.toml as [proxy_plugins.overlaybd] with the socket address
    from obd.toml, inserting that table and leaving the rest of the file as it is (config versions 1, 2 and 3);
    with --cri also sets disable_snapshot_annotations = false and snapshotter = "overlaybd" for containerd's
    CRI plugin (Kubernetes) and prints the kubelet flag that sends pulls through obd's CRI proxy;
  - where systemd runs, installs obd-snapshotter.service and enables and starts it;
  - with --cache-from, waits for obd-snapshotter and imports a cache snapshot ('obd cache export') into its block
    cache, every block checked, so this node starts the snapshot's images without reading their blocks from the
    registry.

It prints each change it makes and nothing when there is nothing to change, so it is safe to run again.
containerd is not restarted unless --restart-containerd is given.`,
		Example: `  obd install --dry-run    # show what would change
  obd install              # as root
  obd install --cri --restart-containerd
  obd install --cache-from registry.example.com/obd/cache:gpu-images`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			bin, err := install.SnapshotterBinary(prefix)
			if err != nil {
				return err
			}
			opts.SnapshotterBin = bin
			opts.Out = cmd.OutOrStdout()
			err = install.Run(cmd.Context(), opts)
			if errors.Is(err, fs.ErrPermission) && os.Geteuid() != 0 {
				return fmt.Errorf("%w (run obd install as root)", err)
			}
			if err != nil || cacheFrom == "" {
				return err
			}
			if opts.DryRun {
				fmt.Fprintf(cmd.OutOrStdout(), "would import the cache snapshot %s once obd-snapshotter answers\n", cacheFrom)
				return nil
			}
			cfg, _, err := config.Load(opts.ObdConfig, true)
			if err != nil {
				return err
			}
			sc := status.NewClient(cfg.Snapshotter.StatusSocket(), 10*time.Second)
			return cacheclient.WaitAndImport(cmd.Context(), sc, wait, cacheFrom, rf.client, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f := cmd.Flags()
	f.StringVar(&prefix, "prefix", "", "installation prefix of obd's binaries: the unit runs PREFIX/bin/obd-snapshotter (default: the obd-snapshotter next to this obd)")
	f.StringVar(&opts.ContainerdConfig, "containerd-config", install.DefaultContainerdConfig, "containerd's configuration file")
	f.StringVar(&opts.ObdConfig, "obd-config", config.DefaultPath, "obd's configuration file")
	f.StringVar(&opts.Systemd, "systemd", "auto", "install the systemd unit: auto (when systemd runs), yes or no")
	f.StringVar(&opts.UnitDir, "unit-dir", install.DefaultUnitDir, "directory of the systemd unit")
	f.BoolVar(&opts.CRI, "cri", false, "Kubernetes: make containerd's CRI plugin pull with obd's snapshotter and pass it image annotations")
	f.BoolVar(&opts.RestartContainerd, "restart-containerd", false, "restart containerd (through systemd) when its configuration changed")
	f.BoolVar(&opts.DryRun, "dry-run", false, "print what would change and change nothing")
	f.StringVar(&cacheFrom, "cache-from", "", "import this cache snapshot (FILE, oci:DIR[:TAG] or REGISTRY/REPO:TAG of 'obd cache export') into obd-snapshotter's cache")
	f.DurationVar(&wait, "cache-wait", 2*time.Minute, "with --cache-from: how long to wait for obd-snapshotter to answer")
	rf.register(cmd)
	return cmd
}
