package device

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// mountEntry is one line of /proc/self/mountinfo.
type mountEntry struct {
	dev        uint64 // st_dev of the mounted filesystem
	mountPoint string
	fsType     string
	source     string
}

// readMountInfo returns the mounts of this process's mount namespace, in mount order.
func readMountInfo() ([]mountEntry, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	return parseMountInfo(data)
}

// parseMountInfo parses the format of proc(5) /proc/pid/mountinfo.
func parseMountInfo(data []byte) ([]mountEntry, error) {
	var out []mountEntry
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 2 {
			return nil, fmt.Errorf("mountinfo: malformed line %q", line)
		}
		maj, min, ok := strings.Cut(f[2], ":")
		ma, err1 := strconv.ParseUint(maj, 10, 32)
		mi, err2 := strconv.ParseUint(min, 10, 32)
		if !ok || err1 != nil || err2 != nil {
			return nil, fmt.Errorf("mountinfo: malformed device %q in %q", f[2], line)
		}
		out = append(out, mountEntry{
			dev:        unix.Mkdev(uint32(ma), uint32(mi)),
			mountPoint: unescapeMountInfo(f[4]),
			fsType:     g[0],
			source:     unescapeMountInfo(g[1]),
		})
	}
	return out, sc.Err()
}

// unescapeMountInfo undoes the octal escapes (\040 for space, …) that the kernel writes in mountinfo paths.
func unescapeMountInfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// mountsOf returns the mount points of the filesystems on device dev, innermost (most recent) first.
func mountsOf(mounts []mountEntry, dev uint64) []string {
	var out []string
	for i := len(mounts) - 1; i >= 0; i-- {
		if mounts[i].dev == dev {
			out = append(out, mounts[i].mountPoint)
		}
	}
	return out
}
