package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/bench/internal/measure"
	"github.com/obdproject/obd/internal/cache"
)

// report is what bench/results/io.json holds.
type report struct {
	Date   string         `json:"date"`
	Host   hostInfo       `json:"host"`
	Config map[string]any `json:"config"`
	Image  imageInfo      `json:"image"`
	Warmup warmup         `json:"warmup"`
	Method string         `json:"method"`

	Sequential reads       `json:"sequential"`
	Random     reads       `json:"random_4k"`
	Attach     attachTimes `json:"attach"`
	Memory     memory      `json:"memory"`
	// RegistryBytesDuringMeasurement must be 0: after the warm-up, every read is served by the cache.
	RegistryBytesDuringMeasurement int64            `json:"registry_bytes_during_measurement"`
	Profiles                       []profileSummary `json:"profiles,omitempty"`
	Complete                       bool             `json:"complete"` // false if the run stopped early
}

type hostInfo struct {
	Kernel string `json:"kernel"`
	CPUs   int    `json:"cpus"`
	Go     string `json:"go"`
}

type imageInfo struct {
	FileBytes        int64          `json:"file_bytes"`
	TarBytes         int64          `json:"tar_bytes"`
	BlobBytes        int64          `json:"blob_bytes"`
	CompressionRatio float64        `json:"compression_ratio"` // tar bytes / blob bytes
	VirtualSize      int64          `json:"virtual_size"`
	RawDataBytes     int64          `json:"raw_data_bytes"`
	Seconds          map[string]any `json:"seconds"`
}

type warmup struct {
	Seconds       float64     `json:"seconds"`
	MBps          float64     `json:"mb_per_s"`
	RegistryBytes int64       `json:"registry_bytes"`
	Cache         cache.Stats `json:"cache"`
}

// reads is one read measurement on every side.
type reads struct {
	Unit  string                `json:"unit"`
	Sides map[string]*sideReads `json:"sides"` // "plain", "plain-dio", "obd"
	// Ratio is obd/plain of the medians; RatioDIO is obd/plain-dio, for reference.
	Ratio    float64 `json:"ratio"`
	RatioDIO float64 `json:"ratio_vs_plain_dio,omitempty"`
	Target   float64 `json:"target_ratio"`
	Met      bool    `json:"target_met"`
}

// sideReads are the runs of one side.
type sideReads struct {
	Runs   []float64 `json:"runs"`
	Load1  []float64 `json:"load1"` // 1-minute load average of the host before each run
	Median float64   `json:"median"`
	Direct bool      `json:"o_direct"` // false: O_DIRECT was refused and buffered reads were measured
	// Latencies of random reads, µs: the medians over the runs of each run's p50 and p99.
	P50us float64 `json:"p50_us,omitempty"`
	P99us float64 `json:"p99_us,omitempty"`
}

type attachTimes struct {
	FirstColdMS          float64   `json:"first_cold_ms"`
	WarmMS               []float64 `json:"warm_ms"`
	WarmMedianMS         float64   `json:"warm_median_ms"`
	WarmDroppedMS        []float64 `json:"warm_page_cache_dropped_ms"`
	WarmDroppedMedianMS  float64   `json:"warm_page_cache_dropped_median_ms"`
	UnmountMS            []float64 `json:"unmount_ms"`
	UnmountMedianMS      float64   `json:"unmount_median_ms"`
	ColdMS               []float64 `json:"cold_ms"`
	ColdMedianMS         float64   `json:"cold_median_ms"`
	ColdRegistryRequests []int64   `json:"cold_registry_requests"`
	ColdRegistryBytes    []int64   `json:"cold_registry_bytes"`
	Target               float64   `json:"target_warm_ms"`
	Met                  bool      `json:"target_met"`
}

func (a *attachTimes) finish() {
	a.WarmMedianMS, a.WarmDroppedMedianMS = measure.Median(a.WarmMS), measure.Median(a.WarmDroppedMS)
	a.UnmountMedianMS, a.ColdMedianMS = measure.Median(a.UnmountMS), measure.Median(a.ColdMS)
	a.Target = targetAttachMS
	a.Met = a.WarmMedianMS > 0 && a.WarmMedianMS <= targetAttachMS
}

type memory struct {
	Images             int     `json:"images"`
	HeapInuseBefore    uint64  `json:"heap_inuse_before"`
	HeapInuseAfter     uint64  `json:"heap_inuse_after"`
	RSSBefore          int64   `json:"rss_before"`
	RSSAfter           int64   `json:"rss_after"`
	HeapPerImage       float64 `json:"heap_inuse_per_image"`
	RSSPerImage        float64 `json:"rss_per_image"`
	GoroutinesPerImage float64 `json:"goroutines_per_image"`
	// Sites are the allocation sites of the heap the images added (heap profile after minus before, in use
	// bytes per image, sampled).
	Sites       []heapSite `json:"heap_sites,omitempty"`
	HeapProfile string     `json:"heap_profile,omitempty"` // after attaching
}

func newReport(cfg config) *report {
	r := &report{
		Date: time.Now().UTC().Format(time.RFC3339),
		Host: hostInfo{CPUs: runtime.NumCPU(), Go: runtime.Version()},
		Config: map[string]any{
			"file_mib": cfg.fileMiB, "vsize_gib": cfg.vsizeGiB, "small_files": cfg.smallFiles, "runs": cfg.runs, "seq_runs": cfg.seqRuns,
			"rand_seconds": cfg.randTime.Seconds(), "depth": cfg.depth, "attach_runs": cfg.attachRuns,
			"cold_runs": cfg.coldRuns, "images": cfg.images, "plain_dio": cfg.plainDIO, "only": cfg.only,
			"command": strings.Join(append([]string{"go run ./bench/io"}, os.Args[1:]...), " "),
		},
		Method: "obd: mounter.Mount of the converted image, blobs from an in-process registry on 127.0.0.1 through " +
			"internal/cache (warmed by one full read), device.FuseLoop, ext4 ro. plain: image.ExportRaw of the same " +
			"disk to a sparse file on a read-only loop device (LOOP_CONFIGURE; buffered like mount -o loop,ro unless " +
			"plain_dio), ext4 ro. " +
			"Reads of the big file from a child process; page cache dropped before every run; runs alternate sides.",
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		r.Host.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	return r
}

func (r *report) setImage(img *builtImage) {
	r.Image = imageInfo{
		FileBytes:        img.Params.FileBytes,
		TarBytes:         img.TarBytes,
		BlobBytes:        img.blobBytes(),
		CompressionRatio: float64(img.TarBytes) / float64(img.blobBytes()),
		VirtualSize:      img.Params.VirtualSize,
		RawDataBytes:     img.RawData,
		Seconds:          img.Seconds,
	}
}

func (r *report) setReads(dst *reads, res map[string][]workerResult, metric func(workerResult) float64, unit string, target float64) {
	*dst = reads{Unit: unit, Target: target, Sides: map[string]*sideReads{}}
	for side, list := range res {
		sr := &sideReads{Direct: true}
		var p50, p99 []float64
		for _, w := range list {
			sr.Runs = append(sr.Runs, metric(w))
			sr.Load1 = append(sr.Load1, w.Load1)
			sr.Direct = sr.Direct && w.Direct
			p50, p99 = append(p50, w.P50us), append(p99, w.P99us)
		}
		sr.Median, sr.P50us, sr.P99us = measure.Median(sr.Runs), measure.Median(p50), measure.Median(p99)
		dst.Sides[side] = sr
	}
	dst.Ratio = dst.ratio("plain")
	dst.RatioDIO = dst.ratio("plain-dio")
	dst.Met = dst.Ratio >= target
}

// ratio returns obd/base of the medians, or 0.
func (rd *reads) ratio(base string) float64 {
	o, b := rd.Sides["obd"], rd.Sides[base]
	if o == nil || b == nil || b.Median == 0 {
		return 0
	}
	return o.Median / b.Median
}

// direct reports whether every side used O_DIRECT.
func (rd *reads) direct() bool {
	for _, s := range rd.Sides {
		if !s.Direct {
			return false
		}
	}
	return true
}

// runs returns the number of runs per side.
func (rd *reads) runs() int {
	if o := rd.Sides["obd"]; o != nil {
		return len(o.Runs)
	}
	return 0
}

func (r *report) finish() { r.Complete = true }

func verdict(met bool) string {
	if met {
		return "met"
	}
	return "MISSED"
}

func mode(direct bool) string {
	if direct {
		return "O_DIRECT"
	}
	return "buffered (O_DIRECT refused)"
}

// print writes the human-readable table.
func (r *report) print(w io.Writer) {
	fmt.Fprintf(w, "obd I/O benchmark — %s, kernel %s, %d CPUs, %s\n", r.Date, r.Host.Kernel, r.Host.CPUs, r.Host.Go)
	fmt.Fprintf(w, "image: %d MiB file + %v small files, blob %.1f MiB (%.2f× compression), vsize %d GiB\n",
		r.Image.FileBytes>>20, r.Config["small_files"], float64(r.Image.BlobBytes)/(1<<20), r.Image.CompressionRatio, r.Image.VirtualSize>>30)
	if !r.Complete {
		fmt.Fprintln(w, "INCOMPLETE: the run stopped early; only the measurements below were taken")
	}
	fmt.Fprintln(w)
	sides := []string{"plain", "plain-dio", "obd"}
	if r.Config["plain_dio"] != true {
		sides = []string{"plain", "obd"}
	}
	cols := func(f func(string) string) string {
		var c []string
		for _, s := range sides {
			c = append(c, f(s))
		}
		return strings.Join(c, "\t")
	}
	empty := cols(func(string) string { return "" })
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	head := map[string]string{"plain": "plain loop", "plain-dio": "plain loop dio", "obd": "obd"}
	fmt.Fprintf(tw, "measurement\t%s\tobd/plain\ttarget\t", cols(func(s string) string { return head[s] }))
	if len(sides) == 3 {
		fmt.Fprint(tw, "obd/plain-dio\t")
	}
	fmt.Fprintln(tw)
	row := func(name string, rd reads) {
		if rd.runs() == 0 {
			return
		}
		fmt.Fprintf(tw, "%s (%s, median of %d)\t%s\t%.2f\t≥ %.1f %s\t", name, mode(rd.direct()), rd.runs(), cols(func(s string) string {
			if sr := rd.Sides[s]; sr != nil {
				return fmt.Sprintf("%.0f", sr.Median)
			}
			return "-"
		}), rd.Ratio, rd.Target, verdict(rd.Met))
		if len(sides) == 3 {
			fmt.Fprintf(tw, "%.2f\t", rd.RatioDIO)
		}
		fmt.Fprintln(tw)
	}
	row("sequential 1 MiB, MB/s", r.Sequential)
	row(fmt.Sprintf("random 4 KiB ×%v, IOPS", r.Config["depth"]), r.Random)
	if r.Random.runs() > 0 {
		fmt.Fprintf(tw, "  random read latency p50 / p99 (µs)\t%s\t\t\t\n", cols(func(s string) string {
			if sr := r.Random.Sides[s]; sr != nil {
				return fmt.Sprintf("%.0f / %.0f", sr.P50us, sr.P99us)
			}
			return "-"
		}))
	}
	// Rows with one value, in the obd column.
	one := func(name, value string) {
		fmt.Fprintf(tw, "%s\t%s%s\t\t\t\n", name, empty, value)
	}
	a := r.Attach
	if len(a.WarmMS) > 0 {
		fmt.Fprintf(tw, "Mount, warm cache (ms, median of %d)\t%s%.1f\t\t≤ %.0f %s\t\n", len(a.WarmMS), empty, a.WarmMedianMS, a.Target, verdict(a.Met))
		one("Mount, warm cache, page cache dropped (ms)", fmt.Sprintf("%.1f", a.WarmDroppedMedianMS))
		one(fmt.Sprintf("Mount, cold cache (ms, median of %d)", len(a.ColdMS)), fmt.Sprintf("%.1f", a.ColdMedianMS))
		if len(a.ColdRegistryBytes) > 0 {
			one("  cold: registry requests / KiB fetched", fmt.Sprintf("%d / %.0f", a.ColdRegistryRequests[0], float64(a.ColdRegistryBytes[0])/1024))
		}
		one("Unmount + detach (ms)", fmt.Sprintf("%.1f", a.UnmountMedianMS))
	}
	if a.FirstColdMS > 0 {
		one("first Mount of the run (cold, ms)", fmt.Sprintf("%.1f", a.FirstColdMS))
	}
	if m := r.Memory; m.Images > 0 {
		one(fmt.Sprintf("per attached image (%d attached): Go heap in use", m.Images), fmt.Sprintf("%.0f KiB", m.HeapPerImage/1024))
		one("per attached image: process RSS", fmt.Sprintf("%.0f KiB", m.RSSPerImage/1024))
		one("per attached image: goroutines", fmt.Sprintf("%.1f", m.GoroutinesPerImage))
	}
	tw.Flush()
	if len(r.Memory.Sites) > 0 {
		fmt.Fprintf(w, "\nGo heap per attached image by allocation site (heap profile %s, sampled):\n", r.Memory.HeapProfile)
		for _, s := range r.Memory.Sites {
			fmt.Fprintf(w, "  %7.0f KiB  %s\n", s.BytesPerImage/1024, s.Name)
		}
	}
	fmt.Fprintf(w, "\nwarm-up: read the big file through obd in %.1fs (%.0f MB/s), fetched %.1f MiB from the registry; registry bytes during the measurements: %d\n",
		r.Warmup.Seconds, r.Warmup.MBps, float64(r.Warmup.RegistryBytes)/(1<<20), r.RegistryBytesDuringMeasurement)
	for _, m := range []struct {
		name string
		rd   reads
	}{{"sequential MB/s", r.Sequential}, {"random IOPS", r.Random}} {
		for _, s := range sides {
			if sr := m.rd.Sides[s]; sr != nil {
				fmt.Fprintf(w, "runs: %s %s: %s\n", m.name, s, fmtList(sr.Runs))
			}
		}
	}
	r.printProfiles(w)
}

// printProfiles writes the summaries of the CPU profiles.
func (r *report) printProfiles(w io.Writer) {
	for _, p := range r.Profiles {
		fmt.Fprintf(w, "\nCPU profile of the obd process, %s (%.1fs wall, %.2fs CPU", p.File, p.WallSeconds, p.CPUSeconds)
		if p.Requests > 0 {
			fmt.Fprintf(w, ", %d reads by the load generator, %.1f µs of obd CPU per read", p.Requests, 1e6*p.CPUSeconds/float64(p.Requests))
		}
		fmt.Fprintln(w, "):")
		if p.Error != "" {
			fmt.Fprintf(w, "  (no summary: %s)\n", p.Error)
			continue
		}
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		for _, row := range p.Paths {
			fmt.Fprintf(tw, "  %s\t%.2fs\t%4.1f%%\t%s\n", row.Name, row.Seconds, row.Percent, row.What)
		}
		fmt.Fprintln(tw, "  flat time by package:\t\t\t")
		for _, row := range p.Packages {
			fmt.Fprintf(tw, "    %s\t%.2fs\t%4.1f%%\t\n", row.Name, row.Seconds, row.Percent)
		}
		tw.Flush()
	}
}

func fmtList(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprintf("%.0f", x)
	}
	return "[" + strings.Join(s, " ") + "]"
}
