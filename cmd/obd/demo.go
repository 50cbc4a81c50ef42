package main

import (
	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/demo"
)

func newDemoCmd() *cobra.Command {
	var snapshotterBin string
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the end-to-end demo: convert an image and start a container from it lazily, in a private sandbox",
		Long: `Run the whole path on this machine without touching its global state: build a sample image from Debian
packages, start a private registry, containerd and obd-snapshotter (own sockets and directories under /tmp),
convert the image to overlaybd, push it, pull it lazily and run a container from it; then print what was fetched
and how long each step took, and clean everything up. Needs root and the packages 'make deps' installs.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			bin, err := demo.Check(snapshotterBin)
			if err != nil {
				return err
			}
			return demo.Run(cmd.Context(), cmd.OutOrStdout(), bin)
		},
	}
	cmd.Flags().StringVar(&snapshotterBin, "snapshotter", "", "obd-snapshotter binary (default: next to obd)")
	return cmd
}
