// Command obd-snapshotter is obd's node daemon: the containerd snapshotter "overlaybd", served as a proxy plugin
// on a unix socket. Normal images behave as with containerd's overlayfs snapshotter; overlaybd images are pulled
// lazily and mounted as one read-only device filesystem per image. The daemon itself is internal/node; this
// command reads its flags and obd.toml and serves it.
//
// containerd configuration (config.toml):
//
//	[proxy_plugins.overlaybd]
//	  type = "snapshot"
//	  address = "/run/obd/snapshotter.sock"
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/device"
	"github.com/obdproject/obd/internal/node"
)

func main() {
	device.RunHolderIfAsked()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "obd-snapshotter:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	var configPath, root, address, logLevel string
	cmd := &cobra.Command{
		Use:   "obd-snapshotter",
		Short: "obd-snapshotter serves the containerd snapshotter \"overlaybd\" on a unix socket",
		Long: `obd-snapshotter is a containerd proxy snapshotter. Normal images behave as with containerd's overlayfs
snapshotter; overlaybd images are pulled lazily and mounted as one read-only device filesystem per image.
Point containerd at it with:

  [proxy_plugins.overlaybd]
    type = "snapshot"
    address = "` + config.DefaultAddress + `"

Next to its socket it serves a status endpoint ('obd status', 'obd health'; GET /status, /healthz, /metrics on
<address without .sock>.status.sock) and, on [metrics] address (default ` + config.DefaultMetricsAddress + `), Prometheus
metrics. Device reads slower than [audit] slow_read_ms are written to the audit log. See docs/operations.md.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			level := new(slog.LevelVar) // info until the configuration is read
			logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			cfg, warnings, err := config.Load(configPath, cmd.Flags().Changed("config"))
			for _, w := range warnings {
				logger.Warn(w)
			}
			if err != nil {
				return err
			}
			sc := &cfg.Snapshotter
			if cmd.Flags().Changed("root") {
				sc.Root = root
			}
			if cmd.Flags().Changed("address") {
				sc.Address = address
			}
			if cmd.Flags().Changed("log-level") {
				sc.LogLevel = logLevel
			}
			l, err := node.ParseLevel(sc.LogLevel)
			if err != nil {
				return err
			}
			level.Set(l)
			node.RouteContainerdLog(logger)
			svc, err := node.New(cfg, node.WithLogger(logger), node.WithConfigPath(configPath), node.WithDeviceHolder())
			if err != nil {
				return err
			}
			return errors.Join(svc.Serve(cmd.Context()), svc.Close())
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", config.DefaultPath, "configuration file (TOML, table [snapshotter])")
	f.StringVar(&root, "root", config.DefaultRoot, "directory of snapshot metadata and data (overrides snapshotter.root)")
	f.StringVar(&address, "address", config.DefaultAddress, "unix socket to serve on (overrides snapshotter.address)")
	f.StringVar(&logLevel, "log-level", config.DefaultLogLevel, "trace, debug, info, warn or error (overrides snapshotter.log_level)")
	return cmd
}
