package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"time"
)

// profileRow is one line of a profile summary.
type profileRow struct {
	Name    string  `json:"name"`
	Seconds float64 `json:"seconds"`
	Percent float64 `json:"percent"` // of the profile's total CPU time
	What    string  `json:"what,omitempty"`
}

// profileSummary says where the CPU time of the serving process went during a profiled phase.
type profileSummary struct {
	File        string       `json:"file"`
	WallSeconds float64      `json:"wall_seconds"` // of the profiled reads (the profile also spans drop_caches)
	CPUSeconds  float64      `json:"cpu_seconds"`
	Requests    int64        `json:"reads"`    // reads done by the load generator while profiling
	Paths       []profileRow `json:"paths"`    // inclusive time of the stages of the read path
	Packages    []profileRow `json:"packages"` // exclusive (flat) time by package
	Error       string       `json:"error,omitempty"`
}

// pathStages are the stages of the obd read path, as functions whose inclusive (cum) time is reported. Nested
// stages are indented; "other" rows are derived by subtraction.
var pathStages = []struct{ name, fn, what string }{
	{"fuse: read requests from /dev/fuse", "golang.org/x/sys/unix.Read", "read(2) on /dev/fuse, incl. waiting in the kernel"},
	{"fuse: write replies to /dev/fuse", "github.com/obdproject/obd/internal/device.(*fuseServer).write", "write(2) of the reply back to the kernel"},
	{"backend: diskFS.read", "github.com/obdproject/obd/internal/device.(*diskFS).read", "everything below the FUSE server"},
	{"  lsmt: Stack.ReadAt", "github.com/obdproject/obd/lsmt.(*Stack).ReadAt", "index lookup + the layer reads below"},
	{"    zfile: Reader.ReadAt", "github.com/obdproject/obd/zfile.(*Reader).ReadAt", "compressed block fetch + CRC + decompress"},
	{"      cache: Reader.ReadAt", "github.com/obdproject/obd/internal/cache.(*Reader).ReadAt", "block cache lookup + data file read"},
	{"        cache: readDisk (pread)", "github.com/obdproject/obd/internal/cache.(*Reader).readDisk", "pread(2) of the cache's data file"},
	{"      zfile: LZ4 decodeBlock", "github.com/obdproject/obd/zfile.decodeBlock", "decompression"},
	{"      zfile: crc32c", "github.com/obdproject/obd/zfile.crc32c", "CRC32C check of each block"},
	{"runtime: GC (background mark)", "runtime.gcBgMarkWorker", "garbage collector workers"},
	{"runtime: mallocgc", "runtime.mallocgc", "allocation (anywhere)"},
	{"runtime: scheduler", "runtime.schedule", "finding goroutines to run, parking and waking threads"},
}

// summarizeProfile runs 'go tool pprof -top' on a CPU profile and condenses it.
func summarizeProfile(path string, wall time.Duration) profileSummary {
	s := profileSummary{File: path, WallSeconds: wall.Seconds()}
	goBin, err := exec.LookPath("go")
	if err != nil {
		s.Error = "no go tool in PATH to read the profile: " + err.Error()
		return s
	}
	out, err := exec.Command(goBin, "tool", "pprof", "-top", "-cum", "-nodecount=1000000", "-nodefraction=0", "-edgefraction=0", path).Output()
	if err != nil {
		s.Error = fmt.Sprintf("go tool pprof: %v", err)
		return s
	}
	type fn struct{ flat, cum time.Duration }
	fns := map[string]fn{}
	var total time.Duration
	sc := bufio.NewScanner(bytes.NewReader(out))
	header := false
	for sc.Scan() {
		line := sc.Text()
		if strings.Contains(line, "Total samples =") {
			// Duration: 5.01s, Total samples = 6.20s (123.75%)
			if _, rest, ok := strings.Cut(line, "Total samples = "); ok {
				total, _ = time.ParseDuration(strings.Fields(rest)[0])
			}
		}
		f := strings.Fields(line)
		if len(f) >= 5 && f[0] == "flat" && f[1] == "flat%" {
			header = true
			continue
		}
		if !header || len(f) < 6 {
			continue
		}
		flat, err1 := time.ParseDuration(f[0])
		cum, err2 := time.ParseDuration(f[3])
		if err1 != nil || err2 != nil {
			continue
		}
		name := strings.TrimSuffix(strings.Join(f[5:], " "), " (inline)")
		e := fns[name]
		e.flat += flat
		e.cum = max(e.cum, cum)
		fns[name] = e
	}
	if total == 0 {
		s.Error = "empty profile"
		return s
	}
	s.CPUSeconds = total.Seconds()
	row := func(name string, d time.Duration, what string) profileRow {
		return profileRow{Name: name, Seconds: d.Seconds(), Percent: 100 * float64(d) / float64(total), What: what}
	}
	cum := func(f string) time.Duration { return fns[f].cum }
	for _, st := range pathStages {
		s.Paths = append(s.Paths, row(st.name, cum(st.fn), st.what))
	}
	// Derived rows: what a stage costs itself, beyond the stages below it.
	lsmtOwn := cum(pathStages[3].fn) - cum(pathStages[4].fn)
	cacheOwn := cum(pathStages[5].fn) - cum(pathStages[6].fn)
	zfileOwn := cum(pathStages[4].fn) - cum(pathStages[5].fn) - cum(pathStages[7].fn) - cum(pathStages[8].fn)
	backendGap := cum(pathStages[2].fn) - cum(pathStages[3].fn)
	s.Paths = append(s.Paths,
		row("= lsmt own (lookup, tarwrap section)", lsmtOwn, "Stack.ReadAt minus zfile"),
		row("= zfile own (buffers, bookkeeping)", zfileOwn, "zfile minus cache, LZ4, CRC"),
		row("= cache own (bitmap, pins, locks)", cacheOwn, "cache minus pread"),
		row("= diskFS own", backendGap, "diskFS.Read minus lsmt"))

	// Flat time by package.
	pk := map[string]time.Duration{}
	for name, e := range fns {
		pk[packageOf(name)] += e.flat
	}
	type kv struct {
		k string
		v time.Duration
	}
	var list []kv
	for k, v := range pk {
		list = append(list, kv{k, v})
	}
	sort.Slice(list, func(i, j int) bool { return list[i].v > list[j].v })
	for i, e := range list {
		if i == 10 {
			break
		}
		s.Packages = append(s.Packages, row(e.k, e.v, ""))
	}
	return s
}

// packageOf returns the package path of a function name like "github.com/a/b.(*T).M" or "runtime.mallocgc",
// folding the syscall entry points into one "syscall (kernel time)" bucket.
func packageOf(name string) string {
	switch {
	case strings.HasPrefix(name, "syscall."), strings.HasPrefix(name, "internal/runtime/syscall"),
		strings.HasPrefix(name, "golang.org/x/sys/unix."), strings.HasPrefix(name, "runtime/internal/syscall."):
		return "syscalls (kernel time of the daemon's system calls)"
	}
	slash := strings.LastIndex(name, "/")
	dot := strings.Index(name[slash+1:], ".")
	if dot < 0 {
		return name
	}
	return name[:slash+1+dot]
}

// heapSite is an allocation site of a heap profile.
type heapSite struct {
	Name          string  `json:"name"`
	BytesPerImage float64 `json:"bytes_per_image"`
}

// heapSites returns the allocation sites with the most in-use bytes added between two heap profiles, divided by
// n (the images attached in between).
func heapSites(before, after string, n int) []heapSite {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return nil
	}
	out, err := exec.Command(goBin, "tool", "pprof", "-top", "-sample_index=inuse_space", "-nodecount=12",
		"-diff_base", before, after).Output()
	if err != nil {
		return nil
	}
	var rows []heapSite
	header := false
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 5 && f[0] == "flat" && f[1] == "flat%" {
			header = true
			continue
		}
		if !header || len(f) < 6 {
			continue
		}
		b, ok := parseBytes(f[0])
		if !ok || b <= 0 {
			continue
		}
		rows = append(rows, heapSite{Name: strings.Join(f[5:], " "), BytesPerImage: b / float64(n)})
	}
	return rows
}

// parseBytes parses pprof's sizes: 512B, 1.50kB, 2MB, 1GB (powers of 1024).
func parseBytes(s string) (float64, bool) {
	units := []struct {
		suffix string
		mult   float64
	}{{"GB", 1 << 30}, {"MB", 1 << 20}, {"kB", 1 << 10}, {"B", 1}}
	for _, u := range units {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			x, err := strconv.ParseFloat(v, 64)
			return x * u.mult, err == nil
		}
	}
	return 0, false
}
