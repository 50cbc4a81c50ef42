package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/obdproject/obd/internal/units"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/lsmt"
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
			plat := image.DefaultPlatform()
			if platform != "" {
				if plat, err = image.ParsePlatform(platform); err != nil {
					return err
				}
			}
			img, err := image.OpenLocal(ref, plat)
			if err != nil {
				return err
			}
			defer img.Close()
			start := time.Now()
			n, err := exportRaw(cmd.Context(), img.Stack, args[1], progressWriter(cmd.ErrOrStderr()))
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

// exportRaw writes the stack's virtual disk to path as a sparse file, through a temporary file renamed at the end
// so that a failure never leaves a partial disk under the final name. It returns the data bytes written.
func exportRaw(ctx context.Context, s *lsmt.Stack, path string, progress io.Writer) (int64, error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return 0, err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if err := tmp.Truncate(s.VirtualSize()); err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	var report func(done, total int64)
	if progress != nil {
		last := time.Now()
		report = func(done, total int64) {
			if time.Since(last) > time.Second || done == total {
				fmt.Fprintf(progress, "\rexport: %s of %s", units.Bytes(done), units.Bytes(total))
				last = time.Now()
			}
			if done == total {
				fmt.Fprintln(progress)
			}
		}
	}
	n, err := image.ExportRaw(ctx, s, tmp, report)
	if err != nil {
		return n, fmt.Errorf("%s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		return n, fmt.Errorf("%s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return n, fmt.Errorf("%s: %w", path, err)
	}
	return n, os.Rename(tmp.Name(), path)
}

// progressWriter returns w when it is a terminal, else nil (no progress lines in logs and pipes).
func progressWriter(w io.Writer) io.Writer {
	f, ok := w.(*os.File)
	if !ok {
		return nil
	}
	st, err := f.Stat()
	if err != nil || st.Mode()&os.ModeCharDevice == 0 {
		return nil
	}
	return w
}
