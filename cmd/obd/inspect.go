package main

import (
	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/image"
)

func newInspectCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "inspect BLOB",
		Short: "Show what an overlaybd blob or layer file is: tar wrapper, ZFile, LSMT layer",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			info, err := image.InspectBlob(args[0])
			if asJSON {
				if err != nil {
					info.Error = err.Error()
				}
				if eerr := printJSON(cmd.OutOrStdout(), info); eerr != nil {
					return eerr
				}
			} else {
				info.WriteText(cmd.OutOrStdout())
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
