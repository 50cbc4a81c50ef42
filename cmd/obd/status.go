package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/obdproject/obd/internal/units"

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
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			printStatus(cmd.OutOrStdout(), st)
			return nil
		},
	}
	df.register(cmd)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// printStatus prints a status as a header and a table of images.
func printStatus(w io.Writer, st *status.Status) {
	up := (time.Duration(st.UptimeSeconds) * time.Second).String()
	fmt.Fprintf(w, "obd-snapshotter %s (pid %d), up %s, config %s\n", st.Version, st.PID, up, st.Config.File)
	metrics := "metrics only on the status socket"
	if st.Config.MetricsAddress != "" {
		metrics = "metrics http://" + st.Config.MetricsAddress + "/metrics"
	}
	fmt.Fprintf(w, "  socket %s, status %s, %s\n", st.Config.Address, st.Config.StatusAddress, metrics)
	c := st.Cache
	fmt.Fprintf(w, "  cache %s: %s of %s (%.0f%%), %d blobs, hit ratio %s\n", c.Dir, units.Bytes(c.UsedBytes), units.Bytes(c.CapacityBytes),
		100*float64(c.UsedBytes)/float64(max(c.CapacityBytes, 1)), c.Blobs, ratio(status.HitRatio(c.Hits, c.Misses)))
	r := st.Reads
	fmt.Fprintf(w, "  device reads %d: %d failed, %d slow (≥ %d ms), %d in flight, %d hung\n", r.Total, r.Errors, r.Slow, st.Config.SlowReadMS, r.InFlight, r.Hung)
	for _, warning := range st.Warnings {
		fmt.Fprintf(w, "  warning: %s\n", warning)
	}
	fmt.Fprintln(w)
	if len(st.Images) == 0 {
		fmt.Fprintln(w, "No images in use.")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tIMAGE\tMODE\tSTATE\tLAYERS\tFETCHED\tCACHE HITS\tREADS\tSNAPSHOTS")
	for _, img := range st.Images {
		ref := img.ImageRef
		if ref == "" {
			ref = "-"
		}
		layers, fetched, hits, reads := "-", "-", "-", "-"
		if img.Mode != status.ModeOverlayfs && img.Mode != status.ModeInvalid {
			layers = layerSummary(img.Layers)
			fetched = units.Bytes(img.BytesFetched)
			hits = ratio(img.CacheHitRatio)
			reads = fmt.Sprint(img.Reads)
			if img.HungReads > 0 {
				reads += fmt.Sprintf(" (%d hung)", img.HungReads)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", img.ID, ref, img.Mode, img.State, layers, fetched, hits, reads, len(img.Snapshots))
	}
	tw.Flush()
	fmt.Fprintln(w)
	for _, img := range st.Images {
		fmt.Fprintf(w, "%s: %s\n", img.ID, img.Reason)
		if img.Error != "" {
			fmt.Fprintf(w, "%s: error: %s\n", img.ID, img.Error)
		}
		if p := img.Prefetch; p != nil {
			state := "done"
			switch {
			case p.Running:
				state = "running"
			case p.Error != "":
				state = "stopped: " + p.Error
			}
			fmt.Fprintf(w, "%s: prefetch of its recorded start %s: %d of %d ranges, %s of %s in %.1f s\n", img.ID, state,
				p.DoneRanges, p.Ranges, units.Bytes(p.DoneBytes), units.Bytes(p.Bytes), p.Seconds)
		}
		if img.Recording != "" {
			fmt.Fprintf(w, "%s: recording its reads into %s\n", img.ID, img.Recording)
		}
	}
}

// layerSummary says how many layers an image has and where they are read from.
func layerSummary(layers []status.Layer) string {
	local := 0
	for _, l := range layers {
		if l.Source == "local" {
			local++
		}
	}
	switch {
	case len(layers) == 0:
		return "-"
	case local == 0:
		return fmt.Sprintf("%d remote", len(layers))
	case local == len(layers):
		return fmt.Sprintf("%d local", len(layers))
	}
	return fmt.Sprintf("%d remote, %d local", len(layers)-local, local)
}

func ratio(r *float64) string {
	if r == nil {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", 100**r)
}
