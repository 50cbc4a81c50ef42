package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	obdconfig "github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/status"
)

// daemonFlags say which obd-snapshotter to ask: its status socket, or the obd.toml that names it.
type daemonFlags struct {
	config, socket string
	timeout        time.Duration
}

func (f *daemonFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.config, "config", obdconfig.DefaultPath, "obd.toml of the daemon (gives the status socket)")
	cmd.Flags().StringVar(&f.socket, "socket", "", "obd-snapshotter's status socket (default: from obd.toml, next to snapshotter.address)")
	cmd.Flags().DurationVar(&f.timeout, "timeout", 10*time.Second, "how long to wait for the daemon")
}

// statusSocket returns the socket to ask.
func (f *daemonFlags) statusSocket(cmd *cobra.Command) (string, error) {
	if f.socket != "" {
		return f.socket, nil
	}
	cfg, _, err := obdconfig.Load(f.config, cmd.Flags().Changed("config"))
	if err != nil {
		return "", fmt.Errorf("%w (name the status socket with --socket)", err)
	}
	return cfg.Snapshotter.StatusSocket(), nil
}

// notRunningHint completes an error about a daemon that does not answer.
func (f *daemonFlags) notRunningHint(err error) error {
	if !errors.Is(err, status.ErrNotRunning) {
		return err
	}
	return fmt.Errorf("%w — start it with 'systemctl start obd-snapshotter' (set up by 'obd install') or 'obd-snapshotter --config %s'; if it runs with another configuration, pass --config or --socket",
		err, f.config)
}

func newStatusCmd() *cobra.Command {
	var (
		df     daemonFlags
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:     "status",
		Aliases: []string{"images"},
		Short:   "Show what obd-snapshotter serves: each image, whether it is read lazily, downloaded or plain overlayfs, and why",
		Long: `Ask the running obd-snapshotter (its status socket) which images containers use, and print for each: how it is
served (lazy: read from the registry on demand; local: downloaded; mixed; overlayfs: a normal image) and why, the
state of its device, its layers, the bytes fetched from the registry and its block cache hit ratio. The header
shows the daemon's version, uptime, configuration and cache usage. --json prints the daemon's whole answer.`,
		Example: "  obd status\n  obd images --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			socket, err := df.statusSocket(cmd)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), df.timeout)
			defer cancel()
			st, err := status.NewClient(socket, df.timeout).Status(ctx)
			if err != nil {
				return df.notRunningHint(err)
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), st)
			}
			status.WriteText(cmd.OutOrStdout(), st)
			return nil
		},
	}
	df.register(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
