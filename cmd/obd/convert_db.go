package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/units"
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

// open opens the database the flags select, or returns nil with --no-db. When the default database cannot be
// used (no cache directory, a read-only home), it says so on warn and returns nil: converting without it gives
// the same result.
func (f *dbFlags) open(warn io.Writer) (*convert.DB, error) {
	if f.off {
		if f.path != "" {
			return nil, fmt.Errorf("--db and --no-db: pick one")
		}
		return nil, nil
	}
	maxSize, err := units.ParseBytes(f.maxSize)
	if err != nil {
		return nil, fmt.Errorf("--db-max-size: %w", err)
	}
	if f.path != "" {
		return convert.OpenDB(f.path, maxSize)
	}
	path, err := convert.DefaultDBPath()
	var db *convert.DB
	if err == nil {
		db, err = convert.OpenDB(path, maxSize)
	}
	if err != nil && warn != nil {
		fmt.Fprintf(warn, "warning: converting without a conversion database: %v\n", err)
	}
	return db, nil
}
