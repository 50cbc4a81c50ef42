package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/units"
	"github.com/obdproject/obd/lsmt"
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
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if eerr := enc.Encode(info); eerr != nil {
					return eerr
				}
			} else {
				printBlobInfo(cmd.OutOrStdout(), info)
			}
			return err
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printBlobInfo(w io.Writer, info image.BlobInfo) {
	fmt.Fprintf(w, "blob:        %s (%d bytes)\n", info.Path, info.Size)
	if t := info.Tar; t != nil {
		pax := ""
		if t.PAX {
			pax = ", pax header"
		}
		fmt.Fprintf(w, "tar wrapper: member %q at offset %d, %d bytes%s\n", t.Member, t.Offset, t.Size, pax)
	} else {
		fmt.Fprintf(w, "tar wrapper: none\n")
	}
	if z := info.ZFile; z != nil {
		crc := "no block CRCs"
		switch {
		case z.CRCError != "":
			crc = "CRC ERROR: " + z.CRCError
		case z.CRCOK:
			crc = "all block CRCs ok"
		}
		hdr := "trailer"
		if z.HeaderOverwrite {
			hdr = "header overwrite"
		}
		fmt.Fprintf(w, "zfile:       %s, %d-byte blocks, %d blocks, original size %d bytes (%s), %s\n",
			z.Algorithm, z.BlockSize, z.Blocks, z.OriginalSize, hdr, crc)
	} else {
		fmt.Fprintf(w, "zfile:       none\n")
	}
	if l := info.LSMT; l != nil {
		fmt.Fprintf(w, "lsmt:        %s layer, virtual size %s\n", l.Kind, units.Bytes(l.VirtualSize))
		fmt.Fprintf(w, "  uuid:      %s\n  parent:    %s\n", l.UUID, l.ParentUUID)
		switch l.Kind {
		case lsmt.KindRWData, lsmt.KindRWIndex, lsmt.KindSparseRW:
			fmt.Fprintf(w, "  writable:  one file of a writable layer; 'obd layer commit' turns it (with its pair) into a layer\n")
		default:
			fmt.Fprintf(w, "  index:     %d valid of %d entries\n  data:      %d bytes\n", l.ValidEntries, l.IndexEntries, l.DataBytes)
		}
		if l.UserTag != "" {
			fmt.Fprintf(w, "  tag:       %q\n", l.UserTag)
		}
	}
}
