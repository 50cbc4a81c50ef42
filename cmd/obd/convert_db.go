package main

import (
	"github.com/spf13/cobra"
)

// dbFlags select the conversion database.
type dbFlags struct {
	path    string
	off     bool
	maxSize string
}

func (f *dbFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.path, "db", "", "conversion database reused across conversions (default: the user cache dir, e.g. ~/.cache/obd/convert.db)")
	cmd.Flags().BoolVar(&f.off, "no-db", false, "convert every layer: do not reuse layers converted before, do not record them")
	cmd.Flags().StringVar(&f.maxSize, "db-max-size", "10GiB", "bytes of converted layer blobs kept next to the database (least recently used trimmed first; 0 keeps none)")
}
