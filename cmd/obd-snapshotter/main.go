// Command obd-snapshotter is obd's node daemon: the containerd snapshotter "overlaybd", served as a proxy plugin
// on a unix socket. Normal images behave as with containerd's overlayfs snapshotter; overlaybd images are pulled
// lazily and mounted as one read-only device filesystem per image.
//
// containerd configuration (config.toml):
//
//	[proxy_plugins.overlaybd]
//	  type = "snapshot"
//	  address = "/run/obd/snapshotter.sock"
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	obdconfig "github.com/obdproject/obd/internal/config"
)

func main() {
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
    address = "` + defaultAddress + `"

Next to its socket it serves a status endpoint ('obd status', 'obd health'; GET /status, /healthz, /metrics on
<address without .sock>.status.sock) and, on [metrics] address (default ` + obdconfig.DefaultMetricsAddress + `), Prometheus
metrics. Device reads slower than [audit] slow_read_ms are written to the audit log. See docs/operations.md.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(configPath, cmd.Flags().Changed("config"))
			if err != nil {
				return err
			}
			sc := cfg.Snapshotter
			if cmd.Flags().Changed("root") {
				sc.Root = root
			}
			if cmd.Flags().Changed("address") {
				sc.Address = address
			}
			if cmd.Flags().Changed("log-level") {
				sc.LogLevel = logLevel
			}
			if err := log.SetFormat(log.TextFormat); err != nil {
				return err
			}
			if err := log.SetLevel(sc.LogLevel); err != nil {
				return fmt.Errorf("log level %q: %w", sc.LogLevel, err)
			}
			log.G(cmd.Context()).WithFields(log.Fields{"root": sc.Root, "address": sc.Address}).Info("starting obd-snapshotter")
			cfg.Snapshotter = sc
			logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slogLevel(sc.LogLevel)}))
			o, err := newOps(cfg, configPath, logger)
			if err != nil {
				return err
			}
			defer o.close()
			nd, err := newNode(cfg, logger, o)
			if err != nil {
				return err
			}
			defer nd.Close()
			return runWith(cmd.Context(), sc, nd.mounter, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", defaultConfigPath, "configuration file (TOML, table [snapshotter])")
	f.StringVar(&root, "root", defaultRoot, "directory of snapshot metadata and data (overrides snapshotter.root)")
	f.StringVar(&address, "address", defaultAddress, "unix socket to serve on (overrides snapshotter.address)")
	f.StringVar(&logLevel, "log-level", defaultLogLevel, "trace, debug, info, warn or error (overrides snapshotter.log_level)")
	return cmd
}

// slogLevel maps a containerd log level name to slog's.
func slogLevel(level string) slog.Level {
	switch level {
	case "trace", "debug":
		return slog.LevelDebug
	case "warn":
		return slog.LevelWarn
	case "error", "fatal", "panic":
		return slog.LevelError
	}
	return slog.LevelInfo
}
