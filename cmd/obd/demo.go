package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/demo"
	"github.com/obdproject/obd/internal/sandbox"
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
			if os.Geteuid() != 0 {
				return errors.New("the demo mounts filesystems and runs containers: run it as root")
			}
			if snapshotterBin == "" {
				exe, err := os.Executable()
				if err != nil {
					return err
				}
				snapshotterBin = filepath.Join(filepath.Dir(exe), "obd-snapshotter")
			}
			for _, tool := range append([]string{snapshotterBin, "apt-get", "dpkg-deb"}, sandbox.Required...) {
				if _, err := exec.LookPath(tool); err != nil {
					return fmt.Errorf("%s is missing: run 'make deps' (Debian packages) and 'make build' first", tool)
				}
			}
			return demo.Run(cmd.Context(), cmd.OutOrStdout(), snapshotterBin)
		},
	}
	cmd.Flags().StringVar(&snapshotterBin, "snapshotter", "", "obd-snapshotter binary (default: next to obd)")
	return cmd
}
