package main

import (
	"fmt"
	"time"

	"github.com/obdproject/obd/internal/units"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/progress"
)

func newExportRawCmd() *cobra.Command {
	var platform string
	cmd := &cobra.Command{
		Use:   "export-raw IMAGE OUT",
		Short: "Write the virtual disk of an overlaybd image as a sparse raw file",
		Long: `Write the merged virtual disk of an overlaybd image (all layers stacked) to OUT as a sparse raw file: holes
stay holes. The result can be checked with e2fsck, mounted with a loop device, or booted as a VM disk.

IMAGE is an OCI layout reference, e.g. oci:testdata/upstream/hello-world-oci:amd64-converted`,
		Example: "  obd export-raw oci:testdata/upstream/hello-world-oci:amd64-converted disk.img",
		Args:    cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ref, err := image.ParseRef(args[0])
			if err != nil {
				return err
			}
			plat, err := image.PlatformOrDefault(platform)
			if err != nil {
				return err
			}
			img, err := image.OpenLocal(ref, plat)
			if err != nil {
				return err
			}
			defer img.Close()
			start := time.Now()
			n, err := image.ExportRawFile(cmd.Context(), img.Stack, args[1], progress.Count(progress.Terminal(cmd.ErrOrStderr()), "export"))
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "wrote %s: virtual size %s, %s of data from %d layers in %s\n",
				args[1], units.Bytes(img.Stack.VirtualSize()), units.Bytes(n), len(img.Layers), time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	cmd.Flags().StringVar(&platform, "platform", "", "os/arch[/variant] to pick from a multi-platform image (default: this machine's)")
	return cmd
}
