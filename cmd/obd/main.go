// Command obd converts, inspects and runs overlaybd block-layer container images.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "obd:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "obd",
		Short: "obd converts, inspects and runs overlaybd block-layer container images",
		Long: `obd works with overlaybd images: container images whose layers are block-diff layers of one filesystem,
read lazily from the registry so a container starts before its image is downloaded.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newInspectCmd(), newExportRawCmd(), newLayerCmd(), newPullCmd(), newConvertCmd(), newVerifyCmd(), newDemoCmd(),
		newCommitCmd(), newInstallCmd(), newLoginCmd(), newCredentialsCmd(), newStatusCmd(), newHealthCmd(), newProfileCmd(), newCacheCmd())
	return root
}

// printJSON prints v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
