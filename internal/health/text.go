package health

import (
	"fmt"
	"io"
	"text/tabwriter"
)

// Count returns how many results are at level l.
func Count(results []Result, l Level) int {
	n := 0
	for _, r := range results {
		if r.Level == l {
			n++
		}
	}
	return n
}

// WriteText writes results for people, as 'obd health' prints them: one line per check, its fix below it when it
// is not OK, with verbose what it looked at, and a count of each level.
func WriteText(w io.Writer, results []Result, verbose bool) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	counts := map[Level]int{}
	for _, r := range results {
		counts[r.Level]++
		fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Level, r.Check, r.Message)
		if r.Fix != "" && r.Level >= Warn {
			fmt.Fprintf(tw, "\t\tfix: %s\n", r.Fix)
		}
		if verbose {
			for _, d := range r.Details {
				fmt.Fprintf(tw, "\t\t· %s\n", d)
			}
		}
	}
	tw.Flush()
	fmt.Fprintf(w, "\n%d ok, %d warnings, %d failed", counts[OK], counts[Warn], counts[Fail])
	if counts[Skip] > 0 {
		fmt.Fprintf(w, ", %d skipped", counts[Skip])
	}
	fmt.Fprintln(w)
}
