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

// DiskReads is what a block device has read since boot: completed reads and bytes.
type DiskReads struct {
	Reads, Bytes int64
}

// DiskOf returns the statistics file of the block device holding path (/sys/dev/block/MAJOR:MINOR/stat, a
// partition's own when path is on one).
func DiskOf(path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", fmt.Errorf("stat %s: %w", path, err)
	}
	f := fmt.Sprintf("/sys/dev/block/%d:%d/stat", unix.Major(st.Dev), unix.Minor(st.Dev))
	if _, err := os.Stat(f); err != nil {
		return "", fmt.Errorf("%s is not on a block device: %w", path, err)
	}
	return f, nil
}

// ReadDisk reads a block device's statistics file (see DiskOf; Documentation/block/stat.rst: field 1 is the
// reads completed, field 3 the 512-byte sectors read).
func ReadDisk(statFile string) (DiskReads, error) {
	b, err := os.ReadFile(statFile)
	if err != nil {
		return DiskReads{}, err
	}
	var reads, merged, sectors int64
	if _, err := fmt.Sscan(string(b), &reads, &merged, &sectors); err != nil {
		return DiskReads{}, fmt.Errorf("%s: %w", statFile, err)
	}
	return DiskReads{Reads: reads, Bytes: sectors * 512}, nil
}

// CPUTimes is the time the host's CPUs spent, all of them summed, since boot.
type CPUTimes struct {
	// Busy is user, nice, system, irq and softirq time; IOWait the time idle CPUs waited for I/O.
	Busy, IOWait float64
}

// ReadCPU reads the host's CPU times from /proc/stat.
func ReadCPU() (CPUTimes, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return CPUTimes{}, err
	}
	return parseCPU(b)
}

// parseCPU parses the first line of /proc/stat ("cpu" and times in USER_HZ, 100 per second on Linux).
func parseCPU(b []byte) (CPUTimes, error) {
	var user, nice, system, idle, iowait, irq, softirq int64
	if _, err := fmt.Sscanf(string(b), "cpu %d %d %d %d %d %d %d", &user, &nice, &system, &idle, &iowait, &irq, &softirq); err != nil {
		return CPUTimes{}, fmt.Errorf("/proc/stat: %w", err)
	}
	const hz = 100
	return CPUTimes{Busy: float64(user+nice+system+irq+softirq) / hz, IOWait: float64(iowait) / hz}, nil
}
