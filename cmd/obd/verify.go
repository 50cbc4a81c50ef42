package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/verify"
)

func newVerifyCmd() *cobra.Command {
	var platform string
	cmd := &cobra.Command{
		Use:   "verify SRC CONVERTED",
		Short: "Compare the files of a source image with those of its overlaybd conversion; exit 1 if they differ",
		Long: `Walk both file trees in userspace — the source's layers applied in order with whiteouts, and the converted
image's merged ext4 filesystem — and report every difference: type, mode, owner, size, content (sha256), mtime,
symlink target, device numbers, xattrs and hardlink groups. /lost+found, made by mkfs, is ignored.

SRC is oci:DIR[:TAG] or docker-archive:FILE[:TAG]; CONVERTED is oci:DIR[:TAG].`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			plat, err := image.PlatformOrDefault(platform)
			if err != nil {
				return err
			}
			srcRef, err := image.ParseRef(args[0])
			if err != nil {
				return err
			}
			dstRef, err := image.ParseRef(args[1])
			if err != nil {
				return err
			}
			diffs, paths, err := verify.Images(cmd.Context(), srcRef, dstRef, plat)
			if err != nil {
				return err
			}
			for _, d := range diffs {
				fmt.Fprintln(cmd.OutOrStdout(), d)
			}
			if len(diffs) > 0 {
				return fmt.Errorf("%d differences between %s and %s", len(diffs), srcRef, dstRef)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s and %s hold the same %d paths\n", srcRef, dstRef, paths)
			return nil
		},
	}
	cmd.Flags().StringVar(&platform, "platform", "", "os/arch[/variant] of a multi-platform image (default: this machine's)")
	return cmd
}
