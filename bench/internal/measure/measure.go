// Package measure holds what the benchmark programs share: medians and readings of the host.
package measure

import (
	"fmt"
	"os"
	"slices"

	"golang.org/x/sys/unix"
)

// Median returns the median of xs (0 for none), leaving xs as it is.
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// LoadAvg is the host's 1-minute load average (0 when unknown): above ~0.5 on an idle host, other work competes for
// the CPUs.
func LoadAvg() float64 {
	var l float64
	b, _ := os.ReadFile("/proc/loadavg")
	fmt.Sscanf(string(b), "%f", &l)
	return l
}

// DropCaches writes dirty pages back and drops the page cache, dentries and inodes (root only).
func DropCaches() error {
	unix.Sync()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200)
}
