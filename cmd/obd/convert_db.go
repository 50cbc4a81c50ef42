package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/convert"
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
	maxSize, err := parseSize(f.maxSize)
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

// parseSize parses a byte count: a whole number with an optional binary unit (K, M, G, T, with or without "iB"/"B").
func parseSize(s string) (int64, error) {
	num := strings.TrimSpace(s)
	mult := int64(1)
	upper := strings.ToUpper(num)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"TIB", 1 << 40}, {"GIB", 1 << 30}, {"MIB", 1 << 20}, {"KIB", 1 << 10}, {"TB", 1 << 40}, {"GB", 1 << 30}, {"MB", 1 << 20}, {"KB", 1 << 10}, {"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1}} {
		if strings.HasSuffix(upper, u.suffix) {
			num, mult = strings.TrimSpace(num[:len(num)-len(u.suffix)]), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%q: want a size such as 10GiB, 500MiB or 0", s)
	}
	return n * mult, nil
}
