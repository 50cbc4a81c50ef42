package main

import (
	"context"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	obdconfig "github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/units"
)

type report struct {
	Command     string             `json:"command"`
	Date        string             `json:"date"`
	Environment environment        `json:"environment"`
	Link        linkReport         `json:"link"`
	Image       imageReport        `json:"image"`
	App         string             `json:"app"`
	Workload    string             `json:"workload"`
	WorkloadDoc string             `json:"workloadDescription"`
	Runs        int                `json:"runs"`
	Cases       []caseReport       `json:"cases"`
	Targets     []target           `json:"targets"`
	Derived     map[string]float64 `json:"derived"`
	CacheMove   *cacheMove         `json:"cacheMove,omitempty"`
}

type environment struct {
	Kernel      string `json:"kernel"`
	CPU         string `json:"cpu"`
	CPUs        int    `json:"cpus"`
	MemoryGiB   int64  `json:"memoryGiB"`
	OS          string `json:"os"`
	Containerd  string `json:"containerd"`
	Go          string `json:"go"`
	Pigz        string `json:"pigz"`
	Snapshotter string `json:"snapshotter"`
	Git         string `json:"git,omitempty"`
	BlockSizeKB int    `json:"obdCacheBlockSizeKB"`
	FetchKB     int    `json:"obdCacheFetchKB,omitempty"`
	DropCaches  string `json:"dropCaches"`
}

type linkReport struct {
	Description string      `json:"description"`
	RateBits    int64       `json:"rateBitsPerSecond"`
	RTTms       float64     `json:"rttMs"`
	CC          string      `json:"registryCongestionControl"`
	Method      string      `json:"method"`
	Measured    calibration `json:"measured"`
}

type imageReport struct {
	Layers         int         `json:"layers"`
	Packages       int         `json:"packages"`
	TarBytes       int64       `json:"tarBytes"`
	GzipBytes      int64       `json:"gzipBytes"`
	OBDBytes       int64       `json:"obdBlobBytes"`
	PlainLayers    []layerInfo `json:"plainLayers"`
	OBDLayers      []layerInfo `json:"obdLayers"`
	ConvertSeconds float64     `json:"convertSeconds"`
	LDLibraryPath  string      `json:"ldLibraryPath"`
	ZFile          string      `json:"zfileAlgorithm"`
}

type caseReport struct {
	Key    string  `json:"key"`
	Title  string  `json:"title"`
	Median sample  `json:"median"`
	Min    float64 `json:"minSeconds"`
	Max    float64 `json:"maxSeconds"`
	// VsOverlayfs is the median time to ready over the overlayfs cold case's median (cold cases only).
	VsOverlayfs float64 `json:"vsOverlayfsCold,omitempty"`
	// BoundSeconds is the median bytes fetched at the link's rate: the least time moving them can take.
	BoundSeconds float64 `json:"bytesAtLinkRateSeconds,omitempty"`
	// ReadyBoundSeconds (background download): the bytes fetched by ready at the link's rate.
	ReadyBoundSeconds float64 `json:"readyBytesAtLinkRateSeconds,omitempty"`
	// LocalMin and LocalMax (background download): the range of the time until the image was local.
	LocalMin float64 `json:"localMinSeconds,omitempty"`
	LocalMax float64 `json:"localMaxSeconds,omitempty"`
	// LayerBytes is the median of the bytes fetched from each layer blob, bottom layer first.
	LayerBytes []int64 `json:"layerBytes,omitempty"`
	// DaemonCPUmsPerMB is obd-snapshotter's CPU time per MB (10⁶ bytes) fetched (medians of both).
	DaemonCPUmsPerMB float64  `json:"daemonCPUmsPerMB,omitempty"`
	Samples          []sample `json:"samples"`
}

type target struct {
	Name     string  `json:"name"`
	Goal     string  `json:"goal"`
	Measured float64 `json:"measured"`
	Limit    float64 `json:"limit"`
	Met      bool    `json:"met"`
	// PerRun is the ratio within each run (run i of one case against run i of the other), for ratio targets:
	// less sensitive to load that drifts over the minutes of a benchmark than the ratio of medians.
	PerRun []float64 `json:"perRun,omitempty"`
}

func (b *bench) report(ctx context.Context) *report {
	r := &report{
		Command: "go run ./bench/startup " + strings.Join(b.cfg.args, " "),
		Date:    time.Now().UTC().Format(time.RFC3339),
		Environment: environment{
			Kernel: readTrim("/proc/sys/kernel/osrelease"), CPU: cpuModel(), CPUs: runtime.NumCPU(), MemoryGiB: memGiB(),
			OS: osName(), Containerd: commandOutput("containerd", "--version"), Go: runtime.Version(), BlockSizeKB: b.cfg.blockKB, FetchKB: b.cfg.fetchKB,
			DropCaches: "sync; echo 3 > /proc/sys/vm/drop_caches before every measured run",
		},
		Link: linkReport{Description: b.link.Describe(), RateBits: b.link.RateBits, RTTms: float64(b.link.RTT) / 1e6, Measured: b.calib,
			CC: b.link.CC, Method: linkMethod},
		Image: imageReport{Layers: len(b.im.Info.PlainLayers), TarBytes: b.im.Info.TarBytes, GzipBytes: b.im.Info.GzipBytes, OBDBytes: b.im.Info.OBDBytes,
			PlainLayers: b.im.Info.PlainLayers, OBDLayers: b.im.Info.OBDLayers, ConvertSeconds: b.im.Info.ConvertSeconds, LDLibraryPath: b.im.Info.LDLibraryPath,
			ZFile: b.im.Info.ZFile},
		App:         b.cfg.workload.commandLine(),
		Workload:    b.cfg.workload.name,
		WorkloadDoc: b.cfg.workload.desc,
		Runs:        b.cfg.runs,
		Cases:       []caseReport{},
		Targets:     []target{},
		Derived:     map[string]float64{},
	}
	if r.Environment.BlockSizeKB == 0 {
		r.Environment.BlockSizeKB = obdconfig.DefaultBlockKB
	}
	if r.Environment.FetchKB == 0 {
		r.Environment.FetchKB = obdconfig.DefaultFetchKB
	}
	switch _, err := exec.LookPath("unpigz"); {
	case b.cfg.pigz:
		r.Environment.Pigz = "given to containerd only (--pigz)"
	case err == nil:
		r.Environment.Pigz = "installed"
	default:
		r.Environment.Pigz = "not installed"
	}
	r.Environment.Snapshotter = "built from this tree"
	if b.cfg.snapshotterGiven {
		r.Environment.Snapshotter = "given with --snapshotter"
	}
	r.Environment.Git = gitState(ctx)
	for _, p := range b.im.Info.Packages {
		r.Image.Packages += len(p)
	}
	med := map[string]sample{}
	layerIndex := map[string]int{}
	for i, l := range b.im.Info.PlainLayers {
		layerIndex[l.Digest] = i
	}
	for i, l := range b.im.Info.OBDLayers {
		layerIndex[l.Digest] = i
	}
	for _, c := range cases {
		ss := b.results[c.key]
		if len(ss) == 0 {
			continue
		}
		cr := caseReport{Key: c.key, Title: c.title, Samples: ss, Median: medianSample(ss)}
		cr.Min, cr.Max = ss[0].Seconds, ss[0].Seconds
		cr.LocalMin, cr.LocalMax = ss[0].LocalSeconds, ss[0].LocalSeconds
		for _, s := range ss {
			cr.Min, cr.Max = min(cr.Min, s.Seconds), max(cr.Max, s.Seconds)
			cr.LocalMin, cr.LocalMax = min(cr.LocalMin, s.LocalSeconds), max(cr.LocalMax, s.LocalSeconds)
		}
		if cr.Median.Bytes > 0 {
			cr.LayerBytes = make([]int64, len(b.im.Info.OBDLayers))
			for i := range cr.LayerBytes {
				v := make([]float64, len(ss))
				for j, s := range ss {
					for d, n := range s.BlobBytes {
						if k, ok := layerIndex[d]; ok && k == i {
							v[j] += float64(n)
						}
					}
				}
				cr.LayerBytes[i] = int64(median(v))
			}
		}
		med[c.key] = cr.Median
		r.Cases = append(r.Cases, cr)
	}
	r.derive()
	if oc, lc := med[caseOverlayCold], med[caseOBDCold]; oc.Seconds > 0 && lc.Seconds > 0 {
		r.Targets = append(r.Targets, target{Name: "lazy start", Goal: "obd lazy time-to-ready without a trace ≤ 0.20 × overlayfs time-to-ready",
			Measured: lc.Seconds / oc.Seconds, Limit: 0.20, Met: lc.Seconds <= 0.20*oc.Seconds,
			PerRun: perRun(b.results[caseOBDCold], b.results[caseOverlayCold])})
		r.Derived["speedup"] = oc.Seconds / lc.Seconds
	}
	if oc, ac := med[caseOverlayCold], med[caseOBDAccel]; oc.Seconds > 0 && ac.Seconds > 0 {
		limit := 0.10 // at 100 Mbit/s; at 1 Gbit/s and more, 0.15
		if b.link.RateBits >= 1e9 {
			limit = 0.15
		}
		r.Targets = append(r.Targets, target{Name: "accelerated start",
			Goal:     fmt.Sprintf("obd time-to-ready with the acceleration layer ≤ %.2f × overlayfs time-to-ready", limit),
			Measured: ac.Seconds / oc.Seconds, Limit: limit, Met: ac.Seconds <= limit*oc.Seconds,
			PerRun: perRun(b.results[caseOBDAccel], b.results[caseOverlayCold])})
	}
	if m := med[caseOBDMeta]; m.Seconds > 0 {
		r.Targets = append(r.Targets, target{Name: "metadata-only pull", Goal: "obd pull on loopback ≤ 0.5 s",
			Measured: m.Seconds, Limit: 0.5, Met: m.Seconds <= 0.5})
	}
	if ow, bw := med[caseOverlayWarm], med[caseOBDWarm]; ow.Seconds > 0 && bw.Seconds > 0 {
		r.Targets = append(r.Targets, target{Name: "warm start", Goal: "obd warm start ≤ 1.1 × overlayfs warm start",
			Measured: bw.Seconds / ow.Seconds, Limit: 1.1, Met: bw.Seconds <= 1.1*ow.Seconds,
			PerRun: perRun(b.results[caseOBDWarm], b.results[caseOverlayWarm])})
	}
	if ow, im := med[caseOverlayWarm], med[caseOBDImported]; ow.Seconds > 0 && im.Seconds > 0 {
		r.Targets = append(r.Targets, target{Name: "start from an imported cache", Goal: "obd start on a fresh node from an imported cache snapshot ≤ 1.1 × overlayfs warm start",
			Measured: im.Seconds / ow.Seconds, Limit: 1.1, Met: im.Seconds <= 1.1*ow.Seconds,
			PerRun: perRun(b.results[caseOBDImported], b.results[caseOverlayWarm])})
	}
	if im := med[caseOBDImported]; im.ImportSeconds > 0 && b.move.SnapshotBytes > 0 {
		mv := b.move
		mv.ImportMBps = float64(mv.SnapshotBytes) / 1e6 / im.ImportSeconds
		mv.UntarMBps = float64(mv.CacheDirBytes) / 1e6 / im.UntarSeconds
		r.CacheMove = &mv
		r.Targets = append(r.Targets,
			target{Name: "cache export throughput", Goal: "obd cache export MB/s ≥ tar of the cache directory",
				Measured: mv.ExportMBps / mv.TarMBps, Limit: 1, Met: mv.ExportMBps >= mv.TarMBps},
			target{Name: "cache import throughput", Goal: "obd cache import MB/s ≥ tar -x of the cache directory",
				Measured: mv.ImportMBps / mv.UntarMBps, Limit: 1, Met: mv.ImportMBps >= mv.UntarMBps})
	}
	if lc := med[caseOBDCold]; lc.Bytes > 0 && b.im.Info.OBDBytes > 0 {
		r.Derived["lazyFractionOfOBDBlobs"] = float64(lc.Bytes) / float64(b.im.Info.OBDBytes)
		r.Derived["lazyFractionOfGzipImage"] = float64(lc.Bytes) / float64(b.im.Info.GzipBytes)
		if lc.Requests > 0 {
			r.Derived["lazyBytesPerRequest"] = float64(lc.Bytes) / float64(lc.Requests)
		}
		if lc.RunSeconds > 0 {
			r.Derived["lazyRunMbits"] = float64(lc.Bytes) * 8 / lc.RunSeconds / 1e6
		}
		if b.link.RateBits > 0 {
			r.Derived["lazyBytesAtLinkRateSeconds"] = float64(lc.Bytes) * 8 / float64(b.link.RateBits)
			r.Derived["overlayGzipAtLinkRateSeconds"] = float64(b.im.Info.GzipBytes) * 8 / float64(b.link.RateBits)
		}
		r.Derived["lazyRequestsTimesRTTSeconds"] = float64(lc.Requests) * b.link.RTT.Seconds()
	}
	if d := med[caseOBDPullDL]; d.PullSeconds > 0 && b.link.RateBits > 0 {
		mbits := float64(d.Bytes) * 8 / d.PullSeconds / 1e6
		r.Derived["pullDownloadMbits"] = mbits
		r.Targets = append(r.Targets, target{Name: "pull --download rate", Goal: "obd pull --download ≥ 90% of the link's rate (bytes over the whole pull)",
			Measured: mbits * 1e6 / float64(b.link.RateBits), Limit: 0.9, Met: mbits*1e6 >= 0.9*float64(b.link.RateBits)})
	}
	if d := med[caseOBDDownload]; d.LocalSeconds > 0 {
		r.Derived["downloadMbitsUntilLocal"] = float64(d.Bytes) * 8 / d.LocalSeconds / 1e6
		if b.link.RateBits > 0 {
			r.Targets = append(r.Targets, target{Name: "background download rate", Goal: "background download ≥ 90% of the link's rate (bytes until every blob is local)",
				Measured: float64(d.Bytes) * 8 / d.LocalSeconds / float64(b.link.RateBits), Limit: 0.9,
				Met: float64(d.Bytes)*8/d.LocalSeconds >= 0.9*float64(b.link.RateBits)})
		}
		if b.im.Info.OBDBytes > 0 {
			r.Derived["downloadBytesOverOBDBlobs"] = float64(d.Bytes) / float64(b.im.Info.OBDBytes)
		}
	}
	return r
}

// derive computes the figures of each case that follow from its medians and the link: the ratio to the overlayfs
// cold case, the bytes at the link's rate, obd-snapshotter's CPU time per MB fetched (cold obd cases).
func (r *report) derive() {
	var overlayCold float64
	for _, cr := range r.Cases {
		if cr.Key == caseOverlayCold {
			overlayCold = cr.Median.Seconds
		}
	}
	atRate := func(bytes int64) float64 {
		if r.Link.RateBits <= 0 {
			return 0
		}
		return float64(bytes) * 8 / float64(r.Link.RateBits)
	}
	for i := range r.Cases {
		cr := &r.Cases[i]
		var c benchCase
		if bc := findCase(cr.Key); bc != nil {
			c = *bc
		}
		cr.VsOverlayfs, cr.BoundSeconds, cr.ReadyBoundSeconds, cr.DaemonCPUmsPerMB = 0, 0, 0, 0
		if c.cold && !c.loopback && overlayCold > 0 && c.key != caseOBDImported {
			cr.VsOverlayfs = cr.Median.Seconds / overlayCold
		}
		if !c.loopback {
			cr.BoundSeconds = atRate(cr.Median.Bytes)
			cr.ReadyBoundSeconds = atRate(cr.Median.ReadyBytes)
		}
		if c.cold && c.key != caseOBDImported && cr.Median.DaemonCPUSeconds > 0 && cr.Median.Bytes > 0 {
			cr.DaemonCPUmsPerMB = cr.Median.DaemonCPUSeconds * 1000 / (float64(cr.Median.Bytes) / 1e6)
		}
		if !slices.ContainsFunc(cr.LayerBytes, func(n int64) bool { return n > 0 }) {
			cr.LayerBytes = nil
		}
	}
}

// perRun divides a's run i by b's run i.
func perRun(a, b []sample) []float64 {
	var out []float64
	for i := range min(len(a), len(b)) {
		out = append(out, math.Round(a[i].Seconds/b[i].Seconds*1000)/1000)
	}
	return out
}

func median(v []float64) float64 {
	v = slices.Clone(v)
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// medianSample takes the median of every field on its own.
func medianSample(ss []sample) sample {
	m := func(f func(sample) float64) float64 {
		v := make([]float64, len(ss))
		for i, s := range ss {
			v[i] = f(s)
		}
		return median(v)
	}
	return sample{
		Seconds:          m(func(s sample) float64 { return s.Seconds }),
		PullSeconds:      m(func(s sample) float64 { return s.PullSeconds }),
		RunSeconds:       m(func(s sample) float64 { return s.RunSeconds }),
		LocalSeconds:     m(func(s sample) float64 { return s.LocalSeconds }),
		ImportSeconds:    m(func(s sample) float64 { return s.ImportSeconds }),
		UntarSeconds:     m(func(s sample) float64 { return s.UntarSeconds }),
		PrefetchSeconds:  m(func(s sample) float64 { return s.PrefetchSeconds }),
		PrefetchBytes:    int64(m(func(s sample) float64 { return float64(s.PrefetchBytes) })),
		Bytes:            int64(m(func(s sample) float64 { return float64(s.Bytes) })),
		Requests:         int64(m(func(s sample) float64 { return float64(s.Requests) })),
		ReadyBytes:       int64(m(func(s sample) float64 { return float64(s.ReadyBytes) })),
		ReadyRequests:    int64(m(func(s sample) float64 { return float64(s.ReadyRequests) })),
		Load1:            m(func(s sample) float64 { return s.Load1 }),
		DaemonCPUSeconds: m(func(s sample) float64 { return s.DaemonCPUSeconds }),
		DaemonPeakRSS:    int64(m(func(s sample) float64 { return float64(s.DaemonPeakRSS) })),
	}
}

func (r *report) printTable(w io.Writer) {
	fmt.Fprintf(w, "\nstartup of %s — image: %d layers, %s tar, %s gzip, %s overlaybd; link: %s (measured %.1f ms, %.1f Mbit/s); medians of %d runs\n\n",
		r.App, r.Image.Layers, units.Bytes(r.Image.TarBytes), units.Bytes(r.Image.GzipBytes), units.Bytes(r.Image.OBDBytes),
		r.Link.Description, r.Link.Measured.RTTms, r.Link.Measured.Mbits, r.Runs)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "case\ttime to ready\tmin–max\t× overlayfs\tpull\trun\tfetched\trequests\tbytes at link rate\tdaemon CPU\tms/MB\tpeak RSS\t")
	for _, c := range r.Cases {
		opt := func(v float64, format string) string {
			if v <= 0 {
				return "–"
			}
			return fmt.Sprintf(format, v)
		}
		rss := "–"
		if c.Median.DaemonPeakRSS > 0 {
			rss = units.Bytes(c.Median.DaemonPeakRSS)
		}
		fmt.Fprintf(tw, "%s\t%.2f s\t%.2f–%.2f\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t\n", c.Title, c.Median.Seconds, c.Min, c.Max, opt(c.VsOverlayfs, "%.3f"),
			opt(c.Median.PullSeconds, "%.2f s"), opt(c.Median.RunSeconds, "%.2f s"), units.Bytes(c.Median.Bytes), c.Median.Requests,
			opt(c.BoundSeconds, "%.2f s"), opt(c.Median.DaemonCPUSeconds, "%.2f s"), opt(c.DaemonCPUmsPerMB, "%.1f"), rss)
		if c.Median.LocalSeconds > 0 {
			fmt.Fprintf(tw, "  … until every layer is downloaded and verified\t%.2f s\t%.2f–%.2f\t\t\t\t%s by ready\t%d by ready\t%s by ready\t\t\t\t\n",
				c.Median.LocalSeconds, c.LocalMin, c.LocalMax, units.Bytes(c.Median.ReadyBytes), c.Median.ReadyRequests, opt(c.ReadyBoundSeconds, "%.2f s"))
		}
	}
	tw.Flush()
	fmt.Fprintln(w)
	for _, c := range r.Cases {
		if len(c.LayerBytes) == 0 {
			continue
		}
		var parts []string
		for i, n := range c.LayerBytes {
			parts = append(parts, fmt.Sprintf("layer %d %s", i+1, units.Bytes(n)))
		}
		fmt.Fprintf(w, "fetched per layer, %s: %s\n", c.Key, strings.Join(parts, ", "))
	}
	fmt.Fprintln(w)
	if m := r.CacheMove; m != nil {
		fmt.Fprintf(w, "cache snapshot of the whole image, %s: export %.0f MB/s, import %.0f MB/s; tar of the cache directory (%s): -c %.0f MB/s, -x %.0f MB/s\n",
			units.Bytes(m.SnapshotBytes), m.ExportMBps, m.ImportMBps, units.Bytes(m.CacheDirBytes), m.TarMBps, m.UntarMBps)
	}
	for _, t := range r.Targets {
		verdict := "MISSED"
		if t.Met {
			verdict = "met"
		}
		fmt.Fprintf(w, "target %-20s %-55s measured %.3f (limit %.2f): %s", t.Name+":", t.Goal, t.Measured, t.Limit, verdict)
		if len(t.PerRun) > 0 {
			fmt.Fprintf(w, "; per run %v", t.PerRun)
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "\npigz: %s; obd cache block size: %d KiB, fetch unit: %d KiB\n", r.Environment.Pigz, r.Environment.BlockSizeKB,
		max(r.Environment.FetchKB, r.Environment.BlockSizeKB))
}

// replot recomputes the derived figures of a JSON result file (derive) and rewrites it and its SVG chart
// (FILE.json → FILE.svg) without measuring again.
func replot(jsonPath string) error {
	b, err := os.ReadFile(jsonPath)
	if err != nil {
		return err
	}
	var r report
	if err := json.Unmarshal(b, &r); err != nil {
		return fmt.Errorf("%s: %w", jsonPath, err)
	}
	r.derive()
	return r.write(filepath.Dir(jsonPath), strings.TrimSuffix(filepath.Base(jsonPath), ".json"))
}

func (r *report) write(dir, name string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, name+".json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, name+".svg"), []byte(r.svg()), 0o644)
}

// svg draws one horizontal bar per case: time to ready (median), split into pull and run where both exist, with
// the min–max range as a whisker and the bytes fetched as a label.
func (r *report) svg() string {
	const (
		width, left, right = 1060, 250, 330
		top, rowH, barH    = 90, 46, 24
	)
	maxS := 0.0
	for _, c := range r.Cases {
		maxS = max(maxS, c.Max, c.LocalMax)
	}
	if maxS == 0 {
		maxS = 1
	}
	plotW := float64(width - left - right)
	x := func(s float64) float64 { return float64(left) + s/maxS*plotW }
	height := top + rowH*len(r.Cases) + 70
	var sb strings.Builder
	fmt.Fprintf(&sb, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="13">`+"\n", width, height, width, height)
	fmt.Fprintf(&sb, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&sb, `<text x="%d" y="24" font-size="16" font-weight="bold">Container start until the app prints "ready" (median of %d runs)</text>`+"\n", 10, r.Runs)
	fmt.Fprintf(&sb, `<text x="%d" y="44" fill="#444">%s; image %s gzip / %s tar, %d layers; registry link %s</text>`+"\n", 10,
		html.EscapeString(r.App), units.Bytes(r.Image.GzipBytes), units.Bytes(r.Image.TarBytes), r.Image.Layers, html.EscapeString(r.Link.Description))
	fmt.Fprintf(&sb, `<text x="%d" y="%d" fill="#444">containerd %s (pigz: %s) vs obd (cache block %d KiB); %d CPUs, kernel %s; whiskers: min–max</text>`+"\n", 10, 62,
		html.EscapeString(containerdVersion(r.Environment.Containerd)), html.EscapeString(r.Environment.Pigz), r.Environment.BlockSizeKB, r.Environment.CPUs,
		html.EscapeString(r.Environment.Kernel))
	// grid
	step := niceStep(maxS)
	for s := 0.0; s <= maxS+1e-9; s += step {
		fmt.Fprintf(&sb, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>`+"\n", x(s), top-8, x(s), top+rowH*len(r.Cases))
		fmt.Fprintf(&sb, `<text x="%.1f" y="%d" text-anchor="middle" fill="#666">%g s</text>`+"\n", x(s), top+rowH*len(r.Cases)+16, s)
	}
	colors := map[string][2]string{
		caseOverlayCold: {"#c0504d", "#e6a19f"}, caseOverlayWarm: {"#c0504d", "#e6a19f"},
		caseOBDCold: {"#2f6db5", "#8fb3e0"}, caseOBDWarm: {"#2f6db5", "#8fb3e0"}, caseOBDMeta: {"#2f6db5", "#8fb3e0"},
	}
	for i, c := range r.Cases {
		y := top + i*rowH
		col, ok := colors[c.Key]
		if !ok {
			col = colors[caseOBDCold]
		}
		fmt.Fprintf(&sb, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", left-8, y+barH/2+5, html.EscapeString(c.Title))
		pull, run := c.Median.PullSeconds, c.Median.RunSeconds
		if pull > 0 && run > 0 && c.Key != caseOBDImported {
			fmt.Fprintf(&sb, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"><title>pull %.2f s</title></rect>`+"\n", left, y, x(pull)-float64(left), barH, col[1], pull)
			fmt.Fprintf(&sb, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"><title>run %.2f s</title></rect>`+"\n", x(pull), y, x(pull+run)-x(pull), barH, col[0], run)
		} else {
			fill := col[0]
			if c.Key == caseOBDMeta {
				fill = col[1]
			}
			fmt.Fprintf(&sb, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/>`+"\n", left, y, max(x(c.Median.Seconds)-float64(left), 1), barH, fill)
		}
		// whisker: min–max
		fmt.Fprintf(&sb, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#333"/>`+"\n", x(c.Min), y+barH/2, x(c.Max), y+barH/2)
		for _, v := range []float64{c.Min, c.Max} {
			fmt.Fprintf(&sb, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#333"/>`+"\n", x(v), y+barH/2-5, x(v), y+barH/2+5)
		}
		label, end := fmt.Sprintf("%.2f s · %s fetched", c.Median.Seconds, units.Bytes(c.Median.Bytes)), c.Max
		if l := c.Median.LocalSeconds; l > 0 {
			// the background download: a dashed line from ready to the median time the image was local
			fmt.Fprintf(&sb, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="3" stroke-dasharray="6 3"><title>every layer local after %.2f s</title></line>`+"\n",
				x(c.Median.Seconds), y+barH/2, x(l), y+barH/2, col[1], l)
			fmt.Fprintf(&sb, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="3"/>`+"\n", x(l), y, x(l), y+barH, col[0])
			label = fmt.Sprintf("%.2f s ready · local %.2f s · %s", c.Median.Seconds, l, units.Bytes(c.Median.Bytes))
			end = max(end, c.LocalMax)
		}
		fmt.Fprintf(&sb, `<text x="%.1f" y="%d">%s</text>`+"\n", x(end)+8, y+barH/2+5, html.EscapeString(label))
	}
	// the lazy-start target: 0.25 × the overlayfs time to ready, across the obd lazy row
	var oc float64
	for _, c := range r.Cases {
		if c.Key == caseOverlayCold {
			oc = c.Median.Seconds
		}
	}
	for i, c := range r.Cases {
		if c.Key == caseOBDCold && oc > 0 {
			y := top + i*rowH
			fmt.Fprintf(&sb, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#222" stroke-dasharray="4 3"/>`+"\n", x(oc/4), y-6, x(oc/4), y+barH+6)
			fmt.Fprintf(&sb, `<text x="%.1f" y="%d" text-anchor="middle" font-size="11" fill="#222">target: ¼ of overlayfs</text>`+"\n", x(oc/4), y+barH+18)
		}
	}
	ly := top + rowH*len(r.Cases) + 40
	fmt.Fprintf(&sb, `<rect x="%d" y="%d" width="14" height="14" fill="#e6a19f"/><text x="%d" y="%d">overlayfs pull + unpack</text>`+"\n", left, ly, left+20, ly+12)
	fmt.Fprintf(&sb, `<rect x="%d" y="%d" width="14" height="14" fill="#c0504d"/><text x="%d" y="%d">overlayfs run</text>`+"\n", left+190, ly, left+210, ly+12)
	fmt.Fprintf(&sb, `<rect x="%d" y="%d" width="14" height="14" fill="#8fb3e0"/><text x="%d" y="%d">obd pull</text>`+"\n", left+320, ly, left+340, ly+12)
	fmt.Fprintf(&sb, `<rect x="%d" y="%d" width="14" height="14" fill="#2f6db5"/><text x="%d" y="%d">obd run</text>`+"\n", left+420, ly, left+440, ly+12)
	sb.WriteString("</svg>\n")
	return sb.String()
}

func niceStep(maxS float64) float64 {
	for _, s := range []float64{0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120} {
		if maxS/s <= 8 {
			return s
		}
	}
	return 300
}

func readTrim(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}

func cpuModel() string {
	for _, line := range strings.Split(readTrim("/proc/cpuinfo"), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return runtime.GOARCH
}

func memGiB() int64 {
	var kb int64
	for _, line := range strings.Split(readTrim("/proc/meminfo"), "\n") {
		if strings.HasPrefix(line, "MemTotal:") {
			fmt.Sscanf(strings.TrimPrefix(line, "MemTotal:"), "%d", &kb)
		}
	}
	return (kb + 1<<19) >> 20
}

func osName() string {
	for _, line := range strings.Split(readTrim("/etc/os-release"), "\n") {
		if v, ok := strings.CutPrefix(line, "PRETTY_NAME="); ok {
			return strings.Trim(v, `"`)
		}
	}
	return runtime.GOOS
}

func commandOutput(name string, args ...string) string {
	b, err := exec.Command(name, args...).Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// containerdVersion picks the version out of `containerd --version`.
func containerdVersion(s string) string {
	f := strings.Fields(s)
	if len(f) >= 3 {
		return f[2]
	}
	return s
}
