// Command convert measures obd's userspace image conversion against the kernel baseline on the same real image:
// a ≥300 MB image built from Debian packages, converted by obd (OCI layout in, overlaybd OCI layout out) and
// unpacked by the kernel (mkfs.ext4 on a sparse file, loop mount, tar -x per layer, sync, unmount).
//
//	go run ./bench/convert            # as root for the kernel baseline and cache dropping
//
// It prints a table and writes JSON (default bench/results/convert.json). See bench/README.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"runtime/pprof"
	"runtime/trace"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	digest "github.com/opencontainers/go-digest"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/bench/internal/measure"
	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/decompress"
	"github.com/obdproject/obd/internal/gunzip"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/lz4c"
	"github.com/obdproject/obd/internal/testimage"
	"github.com/obdproject/obd/zfile"
)

type config struct {
	spec          testimage.Spec
	runs          int
	work, cache   string
	out           string
	zfileWorkers  int
	vsizeGiB      int64
	decompressors []string // kernel baselines: "gzip" (tar -z), or a decompressor program for tar
	noKernel      bool
	dropCaches    bool
	cpuProfile    string
	traceFile     string
	tarLayers     bool // the source layers are uncompressed tars
}

func main() {
	var c config
	size := flag.String("image", "large", "test image: large (≈400 MB of tar, 5 layers) or small (≈50 MB, 3 layers)")
	flag.IntVar(&c.runs, "runs", 5, "measured runs of each side; the table shows medians")
	flag.StringVar(&c.work, "work", os.TempDir(), "directory for the source image, scratch files and the baseline's disk file")
	flag.StringVar(&c.cache, "cache", testimage.DefaultCacheDir(), "cache of downloaded .deb files")
	flag.StringVar(&c.out, "out", filepath.Join("bench", "results", "convert.json"), "JSON result file ('' for none)")
	flag.IntVar(&c.zfileWorkers, "zfile-workers", 2, "ZFile compression workers (obd convert's --threads default)")
	flag.Int64Var(&c.vsizeGiB, "vsize", 64, "virtual disk size in GiB, for both sides")
	decompressors := flag.String("decompressors", "auto", "kernel baselines, comma-separated: gzip (tar -z), igzip, pigz or a path to such a program; auto: gzip plus igzip and pigz where installed")
	flag.BoolVar(&c.noKernel, "no-kernel", false, "skip the kernel baseline (it needs root)")
	layers := flag.String("layers", "gzip", "source layers: gzip (as registries serve them) or tar (uncompressed: the tar → overlaybd work alone, as upstream's figures are measured)")
	keepCaches := flag.Bool("keep-caches", false, "do not drop the page cache before each run (root drops it by default)")
	flag.StringVar(&c.cpuProfile, "cpuprofile", "", "write a CPU profile of obd's runs to this file (go tool pprof)")
	flag.StringVar(&c.traceFile, "trace", "", "write an execution trace of each obd run to this file, which keeps the last (go tool trace)")
	flag.Parse()
	switch *size {
	case "large":
		c.spec = testimage.Large
	case "small":
		c.spec = testimage.Small
	default:
		fmt.Fprintf(os.Stderr, "-image %q: want large or small\n", *size)
		os.Exit(2)
	}
	c.decompressors = strings.Split(*decompressors, ",")
	switch *layers {
	case "gzip":
	case "tar":
		c.tarLayers = true
	default:
		fmt.Fprintf(os.Stderr, "-layers %q: want gzip or tar\n", *layers)
		os.Exit(2)
	}
	if c.runs < 1 {
		fmt.Fprintln(os.Stderr, "-runs: want at least 1")
		os.Exit(2)
	}
	root := os.Geteuid() == 0
	if !root && !c.noKernel {
		fmt.Fprintln(os.Stderr, "the kernel baseline needs root (mount); running obd only (-no-kernel)")
		c.noKernel = true
	}
	c.dropCaches = root && !*keepCaches
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, c)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench/convert:", err)
		os.Exit(1)
	}
}

// Report is the JSON written to -out.
type Report struct {
	Date     string            `json:"date"`
	Host     Host              `json:"host"`
	Image    ImageInfo         `json:"image"`
	Settings map[string]string `json:"settings"`
	Obd      []ObdRun          `json:"obdRuns"`
	Kernel   []KernelRun       `json:"kernelRuns,omitempty"`
	// Gunzip and GunzipSHA256 time reading all layers in Go (warm cache), without and with the diff_id hash.
	Gunzip       []float64 `json:"gunzipSeconds"`
	GunzipSHA256 []float64 `json:"gunzipSha256Seconds"`
	Summary      Summary   `json:"summary"`
}

// Host describes the machine.
type Host struct {
	Kernel     string `json:"kernel"`
	GoVersion  string `json:"goVersion"`
	CPU        string `json:"cpu"`
	CPUs       int    `json:"cpus"`
	MemTotalMB int64  `json:"memTotalMB"`
	Root       bool   `json:"root"`
}

// ImageInfo describes the benchmark image.
type ImageInfo struct {
	Name      string            `json:"name"`
	Layers    []LayerInfo       `json:"layers"`
	TarBytes  int64             `json:"tarBytes"`
	GzipBytes int64             `json:"gzipBytes"`
	BuildSecs float64           `json:"buildSeconds"`
	Versions  map[string]string `json:"packageVersions"`
}

// LayerInfo describes one source layer.
type LayerInfo struct {
	Digest    string   `json:"digest"`
	TarBytes  int64    `json:"tarBytes"`
	GzipBytes int64    `json:"gzipBytes"`
	Entries   int      `json:"entries"`
	Packages  []string `json:"packages,omitempty"`
	Whiteouts []string `json:"whiteouts,omitempty"`
	Opaque    []string `json:"opaque,omitempty"`
}

// ObdRun is one obd conversion.
type ObdRun struct {
	Seconds       float64            `json:"seconds"`      // convert + write layout + fsync
	Stages        map[string]float64 `json:"stageSeconds"` // Result.Timings plus writeLayout and fsync
	LayerApply    []float64          `json:"layerApplySeconds"`
	PeakRSSMB     float64            `json:"peakRSSMB"`    // VmHWM (Go and C), reset before the run
	PeakHeapMB    float64            `json:"peakGoHeapMB"` // sampled every 10 ms
	PeakGoMemMB   float64            `json:"peakGoMemMB"`  // all memory the Go runtime mapped, sampled
	CPUSeconds    float64            `json:"cpuSeconds"`   // user+sys of this process during the run
	BlobBytes     int64              `json:"blobBytes"`
	Manifest      string             `json:"manifest"`
	CachesDropped bool               `json:"cachesDropped"`
	LoadAvg       float64            `json:"loadAvg1"` // 1-minute load average before the run (other work on the host)
	// CPUPressure is the share of the run's wall time in which some runnable task waited for a CPU (PSI).
	CPUPressure float64 `json:"cpuPressure"`
}

// KernelRun is one run of a baseline.
type KernelRun struct {
	Decompressor  string             `json:"decompressor"` // "gzip": tar -z; otherwise tar --use-compress-program
	Seconds       float64            `json:"seconds"`
	Steps         map[string]float64 `json:"stepSeconds"` // mkfs, mount, extract, sync, umount
	LayerExtract  []float64          `json:"layerExtractSeconds"`
	CPUSeconds    float64            `json:"cpuSeconds"` // user+sys of the child processes
	DiskBytes     int64              `json:"diskBytes"`  // allocated bytes of the sparse disk file after the run
	CachesDropped bool               `json:"cachesDropped"`
	LoadAvg       float64            `json:"loadAvg1"`
	CPUPressure   float64            `json:"cpuPressure"`
}

// Baseline holds the medians of one kernel baseline.
type Baseline struct {
	Decompressor    string  `json:"decompressor"`
	Seconds         float64 `json:"seconds"`
	MBps            float64 `json:"MBps"`
	ThroughputRatio float64 `json:"throughputRatioObdOverKernel"`
}

// Summary holds the medians.
type Summary struct {
	ObdSeconds float64 `json:"obdSeconds"`
	ObdMBps    float64 `json:"obdMBps"`
	// KernelSeconds, KernelMBps, ThroughputRatio and KernelSteps are of the gzip baseline (tar -z), or with
	// uncompressed layers of plain tar -x.
	KernelSeconds   float64            `json:"kernelSeconds,omitempty"`
	KernelMBps      float64            `json:"kernelMBps,omitempty"`
	ThroughputRatio float64            `json:"throughputRatioObdOverKernel,omitempty"` // ≥ 1: obd no slower
	KernelSteps     map[string]float64 `json:"kernelStepSeconds,omitempty"`
	// Baselines has every baseline, gzip first.
	Baselines        []Baseline         `json:"baselines,omitempty"`
	ObdStages        map[string]float64 `json:"obdStageSeconds"`
	ObdPeakRSSMB     float64            `json:"obdPeakRSSMB"`
	ObdPeakHeapMB    float64            `json:"obdPeakGoHeapMB"`
	GunzipSecs       float64            `json:"gunzipSeconds"`
	GunzipSHA256Secs float64            `json:"gunzipSha256Seconds"`
	// Deterministic says every obd run produced the same manifest digest.
	Deterministic bool `json:"deterministic"`
}

func run(ctx context.Context, c config) error {
	work, err := os.MkdirTemp(c.work, "obd-bench-convert-")
	if err != nil {
		return err
	}
	defer func() {
		// Never delete through a mount point that failed to unmount.
		if m := mountsUnder(work); len(m) > 0 {
			fmt.Fprintf(os.Stderr, "leaving %s in place: still mounted: %s\n", work, strings.Join(m, " "))
			return
		}
		os.RemoveAll(work)
	}()

	rep := Report{Date: time.Now().UTC().Format(time.RFC3339), Host: hostInfo(), Settings: map[string]string{
		"runs": strconv.Itoa(c.runs), "zfileWorkers": strconv.Itoa(c.zfileWorkers), "zfileAlgorithm": "lz4",
		"vsizeGiB": strconv.FormatInt(c.vsizeGiB, 10), "dropCaches": strconv.FormatBool(c.dropCaches),
		"work": c.work, "gunzip": gunzip.Backend(),
	}}
	rep.Settings["layers"] = "gzip"
	if c.tarLayers {
		rep.Settings["layers"] = "tar"
	}
	switch {
	case c.noKernel:
	case c.tarLayers:
		c.decompressors = []string{"none"}
	default:
		if c.decompressors, err = pickDecompressors(c.decompressors); err != nil {
			return err
		}
		rep.Settings["kernelDecompressors"] = strings.Join(c.decompressors, ",")
	}

	logf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, format+"\n", args...) }
	start := time.Now()
	im, err := testimage.Build(ctx, c.spec, filepath.Join(work, "src"), testimage.Options{CacheDir: c.cache, Log: logf})
	if err != nil {
		return fmt.Errorf("build test image: %w", err)
	}
	rep.Image = imageInfo(im, c.spec.Name, time.Since(start))
	if c.tarLayers {
		if im, err = uncompressed(im, filepath.Join(work, "src-tar")); err != nil {
			return fmt.Errorf("uncompressed copy of the test image: %w", err)
		}
	}
	tarMB := float64(im.TarBytes()) / 1e6
	logf("image %s: %d layers, %.1f MB of tar, %.1f MB gzip, built in %s", c.spec.Name, len(im.Layers), tarMB,
		float64(rep.Image.GzipBytes)/1e6, time.Since(start).Round(time.Millisecond))

	if c.cpuProfile != "" {
		f, err := os.Create(c.cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	for r := 0; r < c.runs; r++ {
		// Rotate which side goes first, so slow drift on a shared machine falls on all.
		sides := []string{"obd"}
		if !c.noKernel {
			sides = append(sides, c.decompressors...)
		}
		sides = append(sides[r%len(sides):], sides[:r%len(sides)]...)
		for _, side := range sides {
			dropped := dropCaches(c.dropCaches)
			if side == "obd" {
				o, err := obdRun(ctx, c, im, work, dropped)
				if err != nil {
					return err
				}
				rep.Obd = append(rep.Obd, o)
				logf("run %d obd: %.2f s (%.1f MB/s), peak RSS %.0f MB, load %.1f, CPU pressure %.0f%%", r+1, o.Seconds, tarMB/o.Seconds, o.PeakRSSMB, o.LoadAvg, 100*o.CPUPressure)
				continue
			}
			k, err := kernelRun(ctx, c, side, im, work, dropped)
			if err != nil {
				return err
			}
			rep.Kernel = append(rep.Kernel, k)
			logf("run %d kernel (%s): %.2f s (%.1f MB/s), load %.1f, CPU pressure %.0f%%", r+1, filepath.Base(side), k.Seconds, tarMB/k.Seconds, k.LoadAvg, 100*k.CPUPressure)
		}
		// The floor under obd's apply stage: gunzip (and sha256) of every layer, with warm caches.
		for _, hash := range []bool{false, true} {
			secs, err := gunzipFloor(ctx, im, hash)
			if err != nil {
				return err
			}
			if hash {
				rep.GunzipSHA256 = append(rep.GunzipSHA256, secs)
			} else {
				rep.Gunzip = append(rep.Gunzip, secs)
			}
		}
	}
	rep.Summary = summarize(rep, tarMB)
	printTable(os.Stdout, rep, tarMB)
	if c.out != "" {
		if err := os.MkdirAll(filepath.Dir(c.out), 0o755); err != nil {
			return err
		}
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(c.out, append(b, '\n'), 0o644); err != nil {
			return err
		}
		logf("wrote %s", c.out)
	}
	return nil
}

func imageInfo(im *testimage.Image, name string, build time.Duration) ImageInfo {
	info := ImageInfo{Name: name, TarBytes: im.TarBytes(), BuildSecs: build.Seconds(), Versions: im.Versions}
	for _, l := range im.Layers {
		info.GzipBytes += l.Desc.Size
		info.Layers = append(info.Layers, LayerInfo{Digest: l.Desc.Digest.String(), TarBytes: l.TarBytes, GzipBytes: l.Desc.Size,
			Entries: l.Entries, Packages: l.Packages, Whiteouts: l.Whiteouts, Opaque: l.Opaque})
	}
	return info
}

// obdRun converts the image and writes the result into an OCI layout, as `obd convert oci:SRC oci:DST` does, then
// fsyncs the layout so the result is on disk like the baseline's after its sync.
func obdRun(ctx context.Context, c config, im *testimage.Image, work string, dropped bool) (ObdRun, error) {
	scratch, out := filepath.Join(work, "obd-scratch"), filepath.Join(work, "obd-out")
	if err := os.MkdirAll(scratch, 0o755); err != nil {
		return ObdRun{}, err
	}
	defer os.RemoveAll(out)
	r := ObdRun{Stages: map[string]float64{}, CachesDropped: dropped, LoadAvg: measure.LoadAvg()}
	layerApply := make([]float64, len(im.Layers))

	debug.FreeOSMemory()
	if c.traceFile != "" {
		f, err := os.Create(c.traceFile)
		if err != nil {
			return r, err
		}
		defer f.Close()
		if err := trace.Start(f); err != nil {
			return r, err
		}
		defer trace.Stop()
	}
	resetPeakRSS()
	cpu0, psi0 := cpuTime(unix.RUSAGE_SELF), psiCPU()
	sampler := startMemSampler()
	start := time.Now()

	src, err := image.OpenLocalSource(im.Ref, image.DefaultPlatform())
	if err != nil {
		return r, err
	}
	defer src.Close()
	res, err := convert.ConvertImage(ctx, src, convert.ImageOptions{
		VirtualSize: c.vsizeGiB << 30,
		ZFile:       zfile.Options{Algorithm: zfile.AlgoLZ4, Workers: c.zfileWorkers, LZ4Batch: lz4c.Batch},
		WorkDir:     scratch,
		Progress: func(p convert.Progress) {
			if p.Stage == "apply" {
				layerApply[p.Layer] = p.Elapsed.Seconds()
			}
		},
	})
	if err != nil {
		sampler.stop()
		return r, fmt.Errorf("obd convert: %w", err)
	}
	defer res.Cleanup()
	t := time.Now()
	paths, err := writeLayout(res, out)
	if err != nil {
		sampler.stop()
		return r, fmt.Errorf("write OCI layout: %w", err)
	}
	r.Stages["writeLayout"] = time.Since(t).Seconds()
	t = time.Now()
	if err := fsyncAll(paths); err != nil {
		sampler.stop()
		return r, err
	}
	r.Stages["fsync"] = time.Since(t).Seconds()
	r.Seconds = time.Since(start).Seconds()
	r.CPUPressure = (psiCPU() - psi0) / r.Seconds

	r.CPUSeconds = cpuTime(unix.RUSAGE_SELF) - cpu0
	r.PeakHeapMB, r.PeakGoMemMB = sampler.stop()
	r.PeakRSSMB = peakRSSMB()
	for k, v := range res.Timings {
		r.Stages[k] = v.Seconds()
	}
	r.LayerApply = layerApply
	r.Manifest = res.ManifestDesc.Digest.String()
	for _, b := range res.Blobs {
		r.BlobBytes += b.Desc.Size
	}
	return r, nil
}

// writeLayout stores a conversion result in an OCI layout (as cmd/obd's writeResultToLayout does) and returns the
// paths of the files it wrote.
func writeLayout(res *convert.Result, dir string) ([]string, error) {
	lay, err := image.CreateLayout(dir)
	if err != nil {
		return nil, err
	}
	var paths []string
	for _, b := range res.Blobs {
		if err := lay.PutBlobFile(b.Path, b.Desc.Digest, b.Desc.Size); err != nil {
			return nil, err
		}
		paths = append(paths, lay.BlobPath(b.Desc.Digest))
	}
	if _, err := lay.PutBlobBytes(res.ConfigDesc.MediaType, res.Config); err != nil {
		return nil, err
	}
	if _, err := lay.PutBlobBytes(res.ManifestDesc.MediaType, res.Manifest); err != nil {
		return nil, err
	}
	if err := lay.Tag("obd", res.ManifestDesc); err != nil {
		return nil, err
	}
	paths = append(paths, lay.BlobPath(res.ConfigDesc.Digest), lay.BlobPath(res.ManifestDesc.Digest),
		filepath.Join(dir, "index.json"), filepath.Join(dir, "blobs", "sha256"), dir)
	return paths, nil
}

func fsyncAll(paths []string) error {
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return fmt.Errorf("fsync %s: %w", p, err)
		}
	}
	return nil
}

// kernelRun is the baseline: a fresh ext4 on a sparse file, loop-mounted, every layer unpacked with GNU tar
// (whiteouts applied first, as containerd's applier does), then synced and unmounted.
func kernelRun(ctx context.Context, c config, decompressor string, im *testimage.Image, work string, dropped bool) (k KernelRun, err error) {
	dir := filepath.Join(work, "kernel")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return k, err
	}
	disk, mnt := filepath.Join(dir, "disk.img"), filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		return k, err
	}
	k = KernelRun{Decompressor: decompressor, Steps: map[string]float64{}, CachesDropped: dropped, LoadAvg: measure.LoadAvg()}
	lay := image.Layout{Dir: im.Ref.Path}
	cpu0, psi0 := cpuTime(unix.RUSAGE_CHILDREN), psiCPU()
	start := time.Now()
	step := func(name string, t time.Time) { k.Steps[name] += time.Since(t).Seconds() }

	t := time.Now()
	f, err := os.Create(disk)
	if err != nil {
		return k, err
	}
	err = f.Truncate(c.vsizeGiB << 30)
	f.Close()
	if err != nil {
		return k, err
	}
	if err := command(ctx, "mkfs.ext4", "-F", "-q", disk); err != nil {
		return k, err
	}
	step("mkfs", t)

	t = time.Now()
	if err := command(ctx, "mount", "-t", "ext4", "-o", "loop", disk, mnt); err != nil {
		return k, err
	}
	mounted := true
	defer func() {
		if mounted { // an error path: unmount (the kernel detaches the loop device mount set up)
			var uerr error
			for try := 0; try < 5; try++ {
				if uerr = exec.Command("umount", mnt).Run(); uerr == nil {
					break
				}
				time.Sleep(200 * time.Millisecond)
			}
			if uerr != nil {
				err = errors.Join(err, fmt.Errorf("umount %s: %w", mnt, uerr))
				return
			}
		}
		os.RemoveAll(dir)
	}()
	step("mount", t)

	for _, l := range im.Layers {
		t := time.Now()
		if err := applyWhiteouts(mnt, l); err != nil {
			return k, err
		}
		args := []string{"-x", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--exclude=.wh.*",
			"-f", lay.BlobPath(l.Desc.Digest), "-C", mnt}
		switch decompressor {
		case "none":
		case "gzip":
			args = append(args, "-z")
		default:
			args = append(args, "--use-compress-program="+decompressor)
		}
		if err := command(ctx, "tar", args...); err != nil {
			return k, err
		}
		k.LayerExtract = append(k.LayerExtract, time.Since(t).Seconds())
		step("extract", t)
	}

	t = time.Now()
	if err := syncfs(mnt); err != nil {
		return k, err
	}
	step("sync", t)

	t = time.Now()
	if err := command(ctx, "umount", mnt); err != nil {
		return k, err
	}
	mounted = false
	step("umount", t)
	k.Seconds = time.Since(start).Seconds()
	k.CPUPressure = (psiCPU() - psi0) / k.Seconds
	k.CPUSeconds = cpuTime(unix.RUSAGE_CHILDREN) - cpu0
	var st unix.Stat_t
	if unix.Stat(disk, &st) == nil {
		k.DiskBytes = st.Blocks * 512
	}
	return k, nil
}

// applyWhiteouts removes what a layer's whiteouts delete and empties its opaque directories, before the layer's
// own files are unpacked (tar skips the .wh.* markers). The builder reports them; a general tool finds them while
// reading the stream, as containerd does.
func applyWhiteouts(mnt string, l testimage.Layer) error {
	for _, p := range l.Whiteouts {
		if err := os.RemoveAll(filepath.Join(mnt, p)); err != nil {
			return err
		}
	}
	for _, d := range l.Opaque {
		ents, err := os.ReadDir(filepath.Join(mnt, d))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		for _, e := range ents {
			if err := os.RemoveAll(filepath.Join(mnt, d, e.Name())); err != nil {
				return err
			}
		}
	}
	return nil
}

// mountsUnder lists the mount points at or below dir.
func mountsUnder(dir string) []string {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && (f[1] == dir || strings.HasPrefix(f[1], dir+"/")) {
			out = append(out, f[1])
		}
	}
	return out
}

func syncfs(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

func command(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	if p, err := lookTool(name); err == nil {
		cmd.Path = p
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// lookTool finds a program on PATH or in the sbin directories, which are not on every user's PATH.
func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		if _, err := os.Stat(filepath.Join(d, name)); err == nil {
			return filepath.Join(d, name), nil
		}
	}
	return "", fmt.Errorf("%s is not installed", name)
}

// pickDecompressors resolves the -decompressors list: gzip first (the baseline the ratio is reported against).
func pickDecompressors(want []string) ([]string, error) {
	out := []string{"gzip"}
	for _, w := range want {
		switch w = strings.TrimSpace(w); w {
		case "gzip", "":
		case "auto":
			for _, name := range []string{"igzip", "pigz"} {
				if p, err := exec.LookPath(name); err == nil && !slices.Contains(out, p) {
					out = append(out, p)
				}
			}
		case "igzip", "pigz":
			p, err := exec.LookPath(w)
			if err != nil {
				return nil, fmt.Errorf("-decompressors %s: %w", w, err)
			}
			if !slices.Contains(out, p) {
				out = append(out, p)
			}
		default:
			if _, err := os.Stat(w); err != nil {
				return nil, fmt.Errorf("-decompressors %s: %w", w, err)
			}
			p, err := filepath.Abs(w)
			if err != nil {
				return nil, err
			}
			if !slices.Contains(out, p) {
				out = append(out, p)
			}
		}
	}
	return out, nil
}

// gunzipFloor reads every layer as obd's apply stage does (decompression and, with hash, the diff_id's sha256) and
// throws the tar away: the part of obd's apply time that is not ext4 work.
func gunzipFloor(ctx context.Context, im *testimage.Image, hash bool) (float64, error) {
	lay := image.Layout{Dir: im.Ref.Path}
	start := time.Now()
	for _, l := range im.Layers {
		f, err := lay.OpenBlob(l.Desc)
		if err != nil {
			return 0, err
		}
		zr, _, err := decompress.Layer(f)
		if err != nil {
			f.Close()
			return 0, err
		}
		v := digest.SHA256.Digester()
		var dst io.Writer = v.Hash()
		if !hash {
			dst = io.Discard
		}
		_, err = io.CopyBuffer(dst, zr, make([]byte, 1<<20))
		zr.Close()
		f.Close()
		if err != nil {
			return 0, err
		}
		if hash && v.Digest() != l.DiffID {
			return 0, fmt.Errorf("layer %s: diff_id mismatch", l.Desc.Digest)
		}
		if err := ctx.Err(); err != nil {
			return 0, err
		}
	}
	return time.Since(start).Seconds(), nil
}

// uncompressed writes a copy of im with uncompressed tar layers (same config, so the same diff_ids) into a new
// OCI layout at dir.
func uncompressed(im *testimage.Image, dir string) (*testimage.Image, error) {
	src := &image.Layout{Dir: im.Ref.Path}
	desc, err := src.Resolve(im.Ref)
	if err != nil {
		return nil, err
	}
	m, _, err := src.Manifest(desc, image.DefaultPlatform())
	if err != nil {
		return nil, err
	}
	cfg, err := src.ReadBlob(m.Config)
	if err != nil {
		return nil, err
	}
	dst, err := image.CreateLayout(dir)
	if err != nil {
		return nil, err
	}
	out := *im
	out.Ref.Path = dir
	out.Layers = slices.Clone(im.Layers)
	m.Layers = slices.Clone(m.Layers)
	for i, l := range im.Layers {
		f, err := src.OpenBlob(l.Desc)
		if err != nil {
			return nil, err
		}
		tmp := filepath.Join(dir, "layer.tmp")
		w, err := os.Create(tmp)
		if err != nil {
			f.Close()
			return nil, err
		}
		zr, err := gunzip.NewReader(f)
		var n int64
		if err == nil {
			n, err = io.Copy(w, zr)
			zr.Close()
		}
		f.Close()
		if cerr := w.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, fmt.Errorf("layer %s: %w", l.Desc.Digest, err)
		}
		if err := dst.PutBlobFile(tmp, l.DiffID, n); err != nil {
			return nil, err
		}
		out.Layers[i].Desc = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: l.DiffID, Size: n}
		m.Layers[i] = out.Layers[i].Desc
	}
	if m.Config, err = dst.PutBlobBytes(m.Config.MediaType, cfg); err != nil {
		return nil, err
	}
	mb, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	md, err := dst.PutBlobBytes(ocispec.MediaTypeImageManifest, mb)
	if err != nil {
		return nil, err
	}
	return &out, dst.Tag(im.Ref.Tag, md)
}

// dropCaches drops the page cache when enabled (see measure.DropCaches) and says whether it did.
func dropCaches(enabled bool) bool { return enabled && measure.DropCaches() == nil }

// resetPeakRSS resets the process's peak RSS (VmHWM, and getrusage's maxrss) to its current RSS.
func resetPeakRSS() { os.WriteFile("/proc/self/clear_refs", []byte("5"), 0o644) }

// peakRSSMB reads VmHWM from /proc/self/status, falling back to getrusage's maxrss.
func peakRSSMB() float64 {
	if b, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
				kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
				if err == nil {
					return float64(kb) / 1024
				}
			}
		}
	}
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return float64(ru.Maxrss) / 1024
}

// psiCPU is the total time, in seconds, in which some task waited for a CPU (/proc/pressure/cpu); 0 without PSI.
func psiCPU() float64 {
	b, err := os.ReadFile("/proc/pressure/cpu")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, "some ") {
			continue
		}
		for _, f := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(f, "total="); ok {
				us, _ := strconv.ParseInt(v, 10, 64)
				return float64(us) / 1e6
			}
		}
	}
	return 0
}

func cpuTime(who int) float64 {
	var ru unix.Rusage
	unix.Getrusage(who, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// memSampler records the peak Go heap and the peak memory mapped by the Go runtime.
type memSampler struct {
	done       chan struct{}
	wg         sync.WaitGroup
	heap, mine uint64
}

func startMemSampler() *memSampler {
	s := &memSampler{done: make(chan struct{})}
	samples := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/total:bytes"}}
	read := func() {
		metrics.Read(samples)
		s.heap = max(s.heap, samples[0].Value.Uint64())
		s.mine = max(s.mine, samples[1].Value.Uint64())
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			read()
			select {
			case <-s.done:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

func (s *memSampler) stop() (heapMB, goMB float64) {
	close(s.done)
	s.wg.Wait()
	return float64(s.heap) / (1 << 20), float64(s.mine) / (1 << 20)
}

func hostInfo() Host {
	h := Host{GoVersion: runtime.Version(), CPUs: runtime.NumCPU(), Root: os.Geteuid() == 0}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		h.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				h.CPU = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil {
		h.MemTotalMB = int64(si.Totalram) * int64(si.Unit) >> 20
	}
	return h
}

func pick[T any](xs []T, f func(T) float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = f(x)
	}
	return out
}

func summarize(rep Report, tarMB float64) Summary {
	s := Summary{ObdStages: map[string]float64{}, KernelSteps: map[string]float64{}}
	s.ObdSeconds = measure.Median(pick(rep.Obd, func(r ObdRun) float64 { return r.Seconds }))
	s.ObdMBps = tarMB / s.ObdSeconds
	s.ObdPeakRSSMB = measure.Median(pick(rep.Obd, func(r ObdRun) float64 { return r.PeakRSSMB }))
	s.ObdPeakHeapMB = measure.Median(pick(rep.Obd, func(r ObdRun) float64 { return r.PeakHeapMB }))
	s.GunzipSecs = measure.Median(rep.Gunzip)
	s.Deterministic = true
	for _, r := range rep.Obd {
		s.Deterministic = s.Deterministic && r.Manifest == rep.Obd[0].Manifest
	}
	s.GunzipSHA256Secs = measure.Median(rep.GunzipSHA256)
	for _, r := range rep.Obd {
		for k := range r.Stages {
			s.ObdStages[k] = measure.Median(pick(rep.Obd, func(r ObdRun) float64 { return r.Stages[k] }))
		}
	}
	for _, dec := range decompressorsOf(rep.Kernel) {
		runs := kernelRunsWith(rep.Kernel, dec)
		b := Baseline{Decompressor: dec, Seconds: measure.Median(pick(runs, func(r KernelRun) float64 { return r.Seconds }))}
		b.MBps = tarMB / b.Seconds
		b.ThroughputRatio = s.ObdMBps / b.MBps
		s.Baselines = append(s.Baselines, b)
		if dec != "gzip" && dec != "none" {
			continue
		}
		s.KernelSeconds, s.KernelMBps, s.ThroughputRatio = b.Seconds, b.MBps, b.ThroughputRatio
		for _, r := range runs {
			for k := range r.Steps {
				s.KernelSteps[k] = measure.Median(pick(runs, func(r KernelRun) float64 { return r.Steps[k] }))
			}
		}
	}
	return s
}

// decompressorsOf lists the baselines of runs in first-seen order.
func decompressorsOf(runs []KernelRun) []string {
	var out []string
	for _, r := range runs {
		if !slices.Contains(out, r.Decompressor) {
			out = append(out, r.Decompressor)
		}
	}
	return out
}

func kernelRunsWith(runs []KernelRun, dec string) []KernelRun {
	var out []KernelRun
	for _, r := range runs {
		if r.Decompressor == dec {
			out = append(out, r)
		}
	}
	return out
}

func printTable(w io.Writer, rep Report, tarMB float64) {
	s := rep.Summary
	entries := 0
	for _, l := range rep.Image.Layers {
		entries += l.Entries
	}
	fmt.Fprintf(w, "\nimage %s: %d layers, %d tar entries, %.1f MB of uncompressed tar (%.1f MB gzip)\n",
		rep.Image.Name, len(rep.Image.Layers), entries, tarMB, float64(rep.Image.GzipBytes)/1e6)
	loads := append(pick(rep.Obd, func(r ObdRun) float64 { return r.LoadAvg }), pick(rep.Kernel, func(r KernelRun) float64 { return r.LoadAvg })...)
	fmt.Fprintf(w, "host: %s, %d CPUs, kernel %s, %s; caches dropped before each run: %v\n", rep.Host.CPU, rep.Host.CPUs,
		rep.Host.Kernel, rep.Host.GoVersion, rep.Settings["dropCaches"] == "true")
	fmt.Fprintf(w, "other load: 1-min load average before runs median %.1f (max %.1f); CPU pressure during runs: obd %.0f%%, kernel %.0f%% (median)\n\n",
		measure.Median(loads), slices.Max(loads), 100*measure.Median(pick(rep.Obd, func(r ObdRun) float64 { return r.CPUPressure })),
		100*measure.Median(pick(rep.Kernel, func(r KernelRun) float64 { return r.CPUPressure })))
	runs := func(xs []float64) string {
		var parts []string
		for _, x := range xs {
			parts = append(parts, fmt.Sprintf("%.2f", x))
		}
		return strings.Join(parts, " ")
	}
	fmt.Fprintf(w, "%-44s %9s %8s  %s\n", "", "median s", "MB/s", "runs (s)")
	fmt.Fprintf(w, "%-44s %9.2f %8.1f  %s\n", "obd: convert + write OCI layout + fsync", s.ObdSeconds, s.ObdMBps,
		runs(pick(rep.Obd, func(r ObdRun) float64 { return r.Seconds })))
	for _, b := range s.Baselines {
		fmt.Fprintf(w, "%-44s %9.2f %8.1f  %s\n", "kernel: mkfs + mount + tar -x ("+filepath.Base(b.Decompressor)+") + sync", b.Seconds, b.MBps,
			runs(pick(kernelRunsWith(rep.Kernel, b.Decompressor), func(r KernelRun) float64 { return r.Seconds })))
	}
	if len(s.Baselines) > 0 {
		fmt.Fprintf(w, "\n")
	}
	for _, b := range s.Baselines {
		fmt.Fprintf(w, "throughput ratio obd/kernel (%s): %.2f (≥ 1.00 means obd is no slower; time ratio %.2f)\n",
			filepath.Base(b.Decompressor), b.ThroughputRatio, 1/b.ThroughputRatio)
	}
	fmt.Fprintf(w, "\nobd peak RSS %.0f MB (Go heap peak %.0f MB); CPU %.1f s per run; blobs %.1f MB; same manifest every run: %v\n",
		s.ObdPeakRSSMB, s.ObdPeakHeapMB, measure.Median(pick(rep.Obd, func(r ObdRun) float64 { return r.CPUSeconds })),
		float64(rep.Obd[0].BlobBytes)/1e6, s.Deterministic)
	if len(rep.Kernel) > 0 {
		for _, dec := range decompressorsOf(rep.Kernel) {
			fmt.Fprintf(w, "kernel baseline (%s): child CPU %.1f s per run (page writeback by kernel threads not counted)\n",
				filepath.Base(dec), measure.Median(pick(kernelRunsWith(rep.Kernel, dec), func(r KernelRun) float64 { return r.CPUSeconds })))
		}
	}
	first, decomp := "gzip", "gunzip "+rep.Settings["gunzip"]
	if rep.Settings["layers"] == "tar" {
		decomp = "none"
	}
	if len(s.Baselines) > 0 {
		first = s.Baselines[0].Decompressor
	}
	fmt.Fprintf(w, "\nwhere obd's time goes (median s, share of obd's median):\n")
	for _, st := range []struct{ key, what string }{
		{"apply", "apply: decompress + sha256 diff_id + tar → ext4 (libext2fs) → LSMT"},
		{"compress", "pack: commit → ZFile LZ4 + CRC32C → blob, streamed"},
		{"done", "sha256 of the blob"},
		{"writeLayout", "write OCI layout (rename blobs)"},
		{"fsync", "fsync the output layout"},
	} {
		v := s.ObdStages[st.key]
		fmt.Fprintf(w, "  %-62s %7.2f %5.1f%%\n", st.what, v, 100*v/s.ObdSeconds)
	}
	fmt.Fprintf(w, "  %-62s %7.2f\n", "(inside apply: decompress alone, "+decomp+", warm cache)", s.GunzipSecs)
	fmt.Fprintf(w, "  %-62s %7.2f\n", "(inside apply: decompress + sha256 alone, "+decomp+", warm cache)", s.GunzipSHA256Secs)
	if len(rep.Kernel) > 0 {
		fmt.Fprintf(w, "\nwhere the kernel baseline's time goes (tar -x (%s), median s):\n", first)
		for _, k := range []string{"mkfs", "mount", "extract", "sync", "umount"} {
			fmt.Fprintf(w, "  %-62s %7.2f\n", k, s.KernelSteps[k])
		}
	}
	fmt.Fprintf(w, "\nper layer (median s):\n  %-5s %10s %8s %10s %14s\n", "layer", "tar MB", "entries", "obd apply", "tar -x ("+first+")")
	gz := kernelRunsWith(rep.Kernel, first)
	for i, l := range rep.Image.Layers {
		kx := "-"
		if len(gz) > 0 {
			kx = fmt.Sprintf("%.2f", measure.Median(pick(gz, func(r KernelRun) float64 { return r.LayerExtract[i] })))
		}
		fmt.Fprintf(w, "  %-5d %10.1f %8d %10.2f %14s\n", i, float64(l.TarBytes)/1e6, l.Entries,
			measure.Median(pick(rep.Obd, func(r ObdRun) float64 { return r.LayerApply[i] })), kx)
	}
}
