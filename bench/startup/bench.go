package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/obdproject/obd/bench/internal/measure"
	"github.com/obdproject/obd/internal/units"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	dockerconfig "github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/obdproject/obd/internal/cacheclient"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/profile"
	"github.com/obdproject/obd/internal/pull"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/sandbox"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
)

// Case keys.
const (
	caseOverlayCold = "overlayfs-cold"
	caseOBDCold     = "obd-lazy-cold"
	caseOBDDownload = "obd-download-cold"
	caseOBDAccel    = "obd-accel-cold"
	caseOBDWarm     = "obd-warm"
	caseOverlayWarm = "overlayfs-warm"
	caseOBDMeta     = "obd-metadata-pull"
	caseOBDImported = "obd-imported-cache"
	caseOBDImpWarm  = "obd-imported-warm"
	caseOBDPullDL   = "obd-pull-download"
	caseOBDTurbo    = "obd-turbo-cold"
	caseTurboAccel  = "obd-turbo-accel-cold"
)

// benchCase is one measured case. Once the images are pushed and the link is calibrated, setup (optional) runs
// once; then every run calls run once. A cold case starts from an empty node (reset: no images, content,
// snapshots; obd-snapshotter restarted with an empty block cache and its config plus obdConfig); a case with
// after set is a warm case, run right after the cold case it names, on the state that one left. Every case has
// the page cache dropped and the registry's counters zeroed before it.
type benchCase struct {
	key, title string
	cold       bool
	after      string // warm cases: the cold case whose state they reuse
	// obd: the case runs containers under obd-snapshotter, whose CPU time and peak RSS are measured
	obd bool
	// loopback: the case does not go through the shaped link (no bound at the link's rate, no ratio)
	loopback bool
	// obdConfig is more obd.toml for this case (cold cases; the others run with the default config)
	obdConfig string
	setup     func(*bench) error
	run       func(*bench) (sample, error)
}

// downloadConfig turns the background download on at once and unbounded: the link is the only bound.
const downloadConfig = "[download]\nenable = true\ndelay = 0\nmax_mbps = 0\n"

// cases lists every case in the order of the table; runOnce runs each cold case followed by its warm cases.
var cases = []benchCase{
	{key: caseOverlayCold, title: "overlayfs: pull + unpack + run", cold: true, run: (*bench).overlayCold},
	{key: caseOBDCold, title: "obd lazy: obd pull + run", cold: true, obd: true, run: (*bench).obdCold},
	{key: caseOBDTurbo, title: "obd TurboOCI lazy: obd pull + run (original gzip layers, no conversion)", cold: true, obd: true, run: func(b *bench) (sample, error) { return b.obdStart(b.turboRef) }},
	{key: caseTurboAccel, title: "obd TurboOCI lazy + acceleration layer", cold: true, obd: true, setup: (*bench).recordTurboStart,
		run: func(b *bench) (sample, error) { return b.obdStart(b.turboAccelRef) }},
	{key: caseOBDAccel, title: "obd lazy + acceleration layer (recorded start)", cold: true, obd: true, setup: (*bench).recordStart, run: (*bench).obdAccel},
	{key: caseOBDDownload, title: "obd lazy + background download", cold: true, obd: true, obdConfig: downloadConfig, run: (*bench).obdDownload},
	{key: caseOBDPullDL, title: "obd pull --download + run (every blob fetched first)", cold: true, obd: true, run: (*bench).obdPullDownload},
	{key: caseOBDWarm, title: "obd warm: run (block cache filled)", after: caseOBDCold, obd: true,
		run: func(b *bench) (sample, error) { return b.runOnly(snapshotter.Name, b.obdRef) }},
	{key: caseOverlayWarm, title: "overlayfs warm: run (unpacked)", after: caseOverlayCold,
		run: func(b *bench) (sample, error) { return b.runOnly("overlayfs", b.plainRef) }},
	{key: caseOBDImported, title: "obd from an imported cache: run (after import + obd pull)", cold: true, obd: true,
		setup: (*bench).exportSnapshot, run: (*bench).obdImported},
	{key: caseOBDImpWarm, title: "obd from an imported cache, second start: run", after: caseOBDImported, obd: true,
		run: func(b *bench) (sample, error) { return b.runOnly(snapshotter.Name, b.obdRef) }},
	{key: caseOBDMeta, title: "obd pull only, loopback", cold: true, loopback: true, run: (*bench).obdMeta},
}

func findCase(key string) *benchCase {
	for i := range cases {
		if cases[i].key == key {
			return &cases[i]
		}
	}
	return nil
}

func caseKeys() []string {
	var keys []string
	for _, c := range cases {
		keys = append(keys, c.key)
	}
	return keys
}

// sample is one measured run of a case.
type sample struct {
	Seconds     float64 `json:"seconds"`               // time to ready (metadata case: the pull)
	PullSeconds float64 `json:"pullSeconds,omitempty"` // pull (+ unpack)
	RunSeconds  float64 `json:"runSeconds,omitempty"`  // ctr run until the app printed ready
	// LocalSeconds (background download case): from the start of the pull until every layer blob of the image was
	// downloaded and verified.
	LocalSeconds float64 `json:"localSeconds,omitempty"`
	// PrefetchSeconds is how long the prefetch of the recorded start took (it starts when the container's root
	// filesystem is prepared), PrefetchBytes what it fetched (cases with an acceleration layer).
	PrefetchSeconds float64 `json:"prefetchSeconds,omitempty"`
	PrefetchBytes   int64   `json:"prefetchBytes,omitempty"`
	// ImportSeconds (imported-cache case): obd cache import of the snapshot, before the pull.
	ImportSeconds float64 `json:"importSeconds,omitempty"`
	// UntarSeconds (imported-cache case): tar -x of the tar of the cache directory, the import's baseline, timed
	// before the import under the same conditions.
	UntarSeconds float64 `json:"untarSeconds,omitempty"`
	Bytes        int64   `json:"bytes"`    // blob bytes the registry served during the case
	Requests     int64   `json:"requests"` // blob GET requests the registry answered
	// ReadyBytes and ReadyRequests (background download case): what the registry had served when the container
	// exited after printing ready.
	ReadyBytes    int64 `json:"readyBytes,omitempty"`
	ReadyRequests int64 `json:"readyRequests,omitempty"`
	// Load1 is the machine's 1-minute load average when the run started (other work shares the CPUs).
	Load1 float64 `json:"load1"`
	// BlobBytes breaks Bytes down by blob digest.
	BlobBytes map[string]int64 `json:"blobBytes,omitempty"`
	// DaemonCPUSeconds is obd-snapshotter's user+system CPU time during the case (obd cases), DaemonPeakRSS its
	// peak resident set (VmHWM, reset at the start of the case) in bytes. In the imported-cache case, these and the
	// disk figures leave out the import.
	DaemonCPUSeconds float64 `json:"daemonCPUSeconds,omitempty"`
	DaemonPeakRSS    int64   `json:"daemonPeakRSSBytes,omitempty"`
	// DiskReads and DiskReadBytes are what the disk holding the sandbox (containerd's content and snapshots, obd's
	// cache) read during the case, from a cold page cache.
	DiskReads     int64 `json:"diskReads,omitempty"`
	DiskReadBytes int64 `json:"diskReadBytes,omitempty"`
	// Predecoded is how many blocks of the start obd-snapshotter decoded ahead of its reads (obd cases with a
	// learned or recorded start), PredecodeLoaded how many it had decoded already (by the start before, on the
	// image's attach, or kept on disk), PredecodeMissed how many the start's reads did not find decoded and decoded
	// themselves.
	Predecoded      int64 `json:"predecoded,omitempty"`
	PredecodeLoaded int64 `json:"predecodeLoaded,omitempty"`
	PredecodeMissed int64 `json:"predecodeMissed,omitempty"`
	// PrimedFileBytes and PrimedMetadataBytes are what obd-snapshotter read of the start into the page cache
	// ahead of the container's reads: file data, and filesystem metadata through the block device.
	PrimedFileBytes     int64 `json:"primedFileBytes,omitempty"`
	PrimedMetadataBytes int64 `json:"primedMetadataBytes,omitempty"`
	// DeviceReads is how many reads the kernel sent to the image's device (obd cases), DeviceReadSeconds the sum
	// of the times obd-snapshotter took to answer them (reads in parallel each count), and SnapshotsAPISeconds the
	// sum of the times it took to answer containerd's snapshots API calls, by method (the container's removal
	// after it exited included).
	DeviceReads         int64              `json:"deviceReads,omitempty"`
	DeviceReadSeconds   float64            `json:"deviceReadSeconds,omitempty"`
	SnapshotsAPISeconds map[string]float64 `json:"snapshotsAPISeconds,omitempty"`
	// The run's phases, from containerd's task events: CreatedSeconds is the time from ctr run to the task's
	// creation (image checks, the container's snapshot and mounts, runc create), StartedSeconds to its start; the
	// rest of RunSeconds is the app's own start. CPUBusySeconds is the CPU time the whole host spent from ctr run
	// to ready (all cores summed), IOWaitSeconds the time idle cores waited for I/O meanwhile.
	CreatedSeconds float64 `json:"createdSeconds,omitempty"`
	StartedSeconds float64 `json:"startedSeconds,omitempty"`
	CPUBusySeconds float64 `json:"cpuBusySeconds,omitempty"`
	IOWaitSeconds  float64 `json:"ioWaitSeconds,omitempty"`
}

// runPhases is what runContainer saw of its run besides the time to ready (see sample).
type runPhases struct {
	created, started time.Duration
	cpu              measure.CPUTimes
}

type bench struct {
	cfg  *config
	sb   *sandbox.Sandbox
	c    *client.Client
	ctx  context.Context // with the containerd namespace
	link *shapedLink
	im   *builtImage
	// image references: through the shaped link, and the obd image on loopback
	plainRef, obdRef, obdLoopRef string
	turboRef                     string
	accelRef                     string // the obd image with the acceleration layer recordStart made, through the link
	turboAccelRef                string // the TurboOCI image with its acceleration layer
	results                      map[string][]sample
	usage                        usageMark // the daemon's CPU time and the disk's reads when the case began
	calib                        calibration
	snapshot                     string    // the cache snapshot exportSnapshot wrote
	cacheTar                     string    // and the tar of the cache directory
	move                         cacheMove // how fast the cache moves
	seq                          int
	phases                       runPhases // of the last runContainer
}

func runBench(ctx context.Context, cfg *config) (err error) {
	if err := checkPrerequisites(); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "obd-bench-startup-bin-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	if cfg.snapshotter == "" {
		logf("building obd-snapshotter")
		if cfg.snapshotter, err = buildSnapshotter(ctx, tmp); err != nil {
			return err
		}
	}
	if cfg.pigz {
		if err := providePigz(ctx, tmp); err != nil {
			return fmt.Errorf("--pigz: %w", err)
		}
	}
	im, err := prepareImage(ctx, cfg.work, cfg.rebuild, cfg.zfile, cfg.fsType, logf)
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	link, err := newLink(cfg.rateBits, cfg.rtt, cfg.cc)
	if err != nil {
		return err
	}
	sb, err := sandbox.Start(ctx, sandbox.Options{Snapshotter: cfg.snapshotter, CacheBlockKB: cfg.blockKB, CacheFetchKB: cfg.fetchKB, PlainHTTP: []string{link.Addr},
		CacheSizeGB: 8, Logf: logf})
	if err != nil {
		return err
	}
	defer func() {
		if cfg.logs != "" {
			if err := saveLogs(sb, cfg.logs); err != nil {
				logf("saving logs: %v", err)
			}
		}
		logf("cleaning up")
		if cerr := sb.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("sandbox cleanup: %w", cerr))
		}
	}()
	if err := link.start(ctx, sb.Registry, logf); err != nil {
		return err
	}
	defer func() {
		if cerr := link.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("shaped link cleanup: %w", cerr))
		}
	}()
	logf("shaped link: registry reachable at %s through router namespace %s (%s; registry side's TCP: %s)", link.Addr, link.Router, link.Describe(), link.CC)

	c, err := client.New(sb.Containerd)
	if err != nil {
		return err
	}
	defer c.Close()
	b := &bench{cfg: cfg, sb: sb, c: c, ctx: namespaces.WithNamespace(ctx, sb.Namespace), link: link, im: im, results: map[string][]sample{},
		plainRef: link.Addr + "/bench/app:" + tagPlain, obdRef: link.Addr + "/bench/app:" + tagOBD, obdLoopRef: sb.Registry + "/bench/app:" + tagOBD,
		turboRef: link.Addr + "/bench/app:" + tagTurbo}
	if err := b.push(ctx); err != nil {
		return err
	}
	if b.calib, err = calibrate(ctx, link, im); err != nil {
		return fmt.Errorf("calibrate the shaped link: %w", err)
	}
	logf("shaped link measured: %.1f ms per small request, %.1f Mbit/s for one %s range read; a 1 MiB range read takes %.0f ms on a new connection (connect included), %.0f ms on a warm one, %.0f ms on one idle for %s",
		b.calib.RTTms, b.calib.Mbits, units.Bytes(b.calib.RangeReadBytes), b.calib.FreshMiBms, b.calib.WarmMiBms, b.calib.IdleMiBms, calibIdle)
	for _, c := range cases {
		if cfg.cases[c.key] && c.setup != nil {
			logf("setting up %s", c.key)
			if err := c.setup(b); err != nil {
				return fmt.Errorf("%s: setup: %w", c.key, err)
			}
		}
	}
	logf("workload %s: %s", cfg.workload.name, cfg.workload.commandLine())
	for i := range cfg.runs {
		logf("run %d/%d", i+1, cfg.runs)
		if err := b.runOnce(); err != nil {
			return fmt.Errorf("run %d: %w", i+1, err)
		}
	}
	b.sb.SetSnapshotterConfig("")
	if err := b.reset(true); err != nil {
		return err
	}
	if stats, err := link.DelayStats(); err != nil {
		logf("router delay line: %v", err)
	} else if stats != "" {
		logf("router delay line: %s", stats)
	}
	rep := b.report(ctx)
	rep.printTable(os.Stdout)
	if cfg.out != "" {
		if err := rep.write(cfg.out, cfg.name); err != nil {
			return err
		}
		logf("wrote %s.json and %s.svg", filepath.Join(cfg.out, cfg.name), filepath.Join(cfg.out, cfg.name))
	}
	return nil
}

// push stores both images in the sandbox registry (over loopback: pushing is not measured).
func (b *bench) push(ctx context.Context) error {
	rc, err := registry.New(registry.Options{PlainHTTP: true, UserAgent: "obd-bench", Credentials: noCredentials})
	if err != nil {
		return err
	}
	defer rc.Close()
	lay, err := image.OpenLayout(b.im.Dir)
	if err != nil {
		return err
	}
	for _, tag := range []string{tagPlain, tagOBD, tagTurbo} {
		ref, err := image.ParseRef(b.sb.Registry + "/bench/app:" + tag)
		if err != nil {
			return err
		}
		start := time.Now()
		if err := image.PushLayout(ctx, rc, lay, tag, ref); err != nil {
			return err
		}
		logf("pushed %s in %s", ref, time.Since(start).Round(time.Millisecond))
	}
	return nil
}

func noCredentials(context.Context, string) (string, string, error) { return "", "", nil }

// runOnce measures every selected case once: each cold case, then the warm cases that follow it.
func (b *bench) runOnce() error {
	for _, c := range cases {
		if !b.cfg.cases[c.key] || !c.cold {
			continue
		}
		if err := b.measureCase(&c); err != nil {
			return err
		}
		for _, w := range cases {
			if w.after == c.key && b.cfg.cases[w.key] {
				if err := b.measureCase(&w); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func (b *bench) measureCase(c *benchCase) error {
	if c.cold {
		b.sb.SetSnapshotterConfig(c.obdConfig + b.cfg.obdTOML)
		if err := b.reset(true); err != nil {
			return err
		}
	}
	if err := measure.DropCaches(); err != nil {
		return err
	}
	b.sb.ResetCounters()
	load := measure.LoadAvg()
	b.markUsage(c.obd)
	b.phases = runPhases{}
	smp, err := c.run(b)
	if err != nil {
		return fmt.Errorf("%s: %w", c.key, err)
	}
	smp.CreatedSeconds, smp.StartedSeconds = b.phases.created.Seconds(), b.phases.started.Seconds()
	smp.CPUBusySeconds, smp.IOWaitSeconds = b.phases.cpu.Busy, b.phases.cpu.IOWait
	b.endUsage(&smp)
	smp.Load1 = load
	smp.BlobBytes = b.sb.BlobBytes()
	smp.Bytes, smp.Requests = sum(smp.BlobBytes), sum(b.sb.BlobRequests())
	b.results[c.key] = append(b.results[c.key], smp)
	extra := ""
	if smp.LocalSeconds > 0 {
		extra = fmt.Sprintf("; local after %.2f s (%s in %d requests by ready)", smp.LocalSeconds, units.Bytes(smp.ReadyBytes), smp.ReadyRequests)
	}
	if smp.PrefetchSeconds > 0 {
		extra += fmt.Sprintf("; prefetch %s in %.2f s", units.Bytes(smp.PrefetchBytes), smp.PrefetchSeconds)
	}
	if smp.ImportSeconds > 0 {
		extra += fmt.Sprintf("; cache import %.2f s", smp.ImportSeconds)
	}
	if c.obd {
		extra += fmt.Sprintf("; daemon CPU %.2f s, peak RSS %s", smp.DaemonCPUSeconds, units.Bytes(smp.DaemonPeakRSS))
	}
	if smp.StartedSeconds > 0 {
		extra += fmt.Sprintf("; task created at %.3f s, started at %.3f s; CPU busy %.2f s, I/O wait %.2f s", smp.CreatedSeconds, smp.StartedSeconds, smp.CPUBusySeconds, smp.IOWaitSeconds)
	}
	if smp.DiskReads > 0 {
		extra += fmt.Sprintf("; disk read %s in %d reads", units.Bytes(smp.DiskReadBytes), smp.DiskReads)
	}
	if smp.DeviceReads > 0 {
		extra += fmt.Sprintf("; %d device reads served in %.3f s (%.0f µs each)", smp.DeviceReads, smp.DeviceReadSeconds, smp.DeviceReadSeconds/float64(smp.DeviceReads)*1e6)
	}
	if len(smp.SnapshotsAPISeconds) > 0 {
		var calls []string
		for _, m := range slices.Sorted(maps.Keys(smp.SnapshotsAPISeconds)) {
			calls = append(calls, fmt.Sprintf("%s %.3f", m, smp.SnapshotsAPISeconds[m]))
		}
		extra += fmt.Sprintf("; snapshots API s: %s", strings.Join(calls, ", "))
	}
	if smp.Predecoded+smp.PredecodeLoaded > 0 {
		extra += fmt.Sprintf("; %d blocks decoded ahead, %d decoded before, %d by the reads", smp.Predecoded, smp.PredecodeLoaded, smp.PredecodeMissed)
	}
	if smp.PrimedFileBytes+smp.PrimedMetadataBytes > 0 {
		extra += fmt.Sprintf("; primed %s of files, %s of metadata", units.Bytes(smp.PrimedFileBytes), units.Bytes(smp.PrimedMetadataBytes))
	}
	logf("  %-18s %7.2f s  (pull %.2f s, run %.2f s)  %s in %d requests  (load %.1f)%s", c.key, smp.Seconds, smp.PullSeconds, smp.RunSeconds,
		units.Bytes(smp.Bytes), smp.Requests, load, extra)
	return nil
}

func (b *bench) overlayCold() (sample, error) {
	start := time.Now()
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: dockerconfig.ConfigureHosts(b.ctx, dockerconfig.HostOptions{DefaultScheme: "http"})})
	if _, err := b.c.Pull(b.ctx, b.plainRef, client.WithResolver(resolver), client.WithPullUnpack, client.WithPullSnapshotter("overlayfs")); err != nil {
		return sample{}, fmt.Errorf("pull %s: %w", b.plainRef, err)
	}
	pulled := time.Since(start)
	ready, err := b.runContainer("overlayfs", b.plainRef)
	if err != nil {
		return sample{}, err
	}
	return sample{Seconds: (pulled + ready).Seconds(), PullSeconds: pulled.Seconds(), RunSeconds: ready.Seconds()}, nil
}

func (b *bench) obdCold() (sample, error) { return b.obdStart(b.obdRef) }

// obdStart pulls ref lazily through the link and runs the workload.
func (b *bench) obdStart(ref string) (sample, error) {
	start := time.Now()
	if _, err := pull.Pull(b.ctx, b.c, ref, pull.Options{PlainHTTP: true, Credentials: noCredentials}); err != nil {
		return sample{}, err
	}
	pulled := time.Since(start)
	ready, err := b.runContainer(snapshotter.Name, ref)
	if err != nil {
		return sample{}, err
	}
	smp := sample{Seconds: (pulled + ready).Seconds(), PullSeconds: pulled.Seconds(), RunSeconds: ready.Seconds()}
	// The recorded start's prefetch, if the image has one: how long it took, against the run.
	if st, err := status.NewClient(b.sb.StatusSocket, 10*time.Second).Status(b.ctx); err == nil {
		for _, im := range st.Images {
			if pf := im.Prefetch; pf != nil && !pf.Running {
				smp.PrefetchSeconds, smp.PrefetchBytes = pf.Seconds, pf.DoneBytes
			}
		}
	}
	return smp, nil
}

// recordStart records the workload's start with obd profile's code, over loopback, and pushes the image with the
// acceleration layer; obdAccel then pulls that image through the link.
func (b *bench) recordStart() error {
	ref, err := b.record(tagOBD, tagAccel)
	b.accelRef = ref
	return err
}

// recordTurboStart is recordStart for the TurboOCI image.
func (b *bench) recordTurboStart() error {
	ref, err := b.record(tagTurbo, tagTurboAccel)
	b.turboAccelRef = ref
	return err
}

// record records the workload's start from the image tagged from, over loopback, pushes it with the acceleration
// layer as tag to and returns that image's reference through the link.
func (b *bench) record(from, to string) (string, error) {
	if err := b.reset(true); err != nil {
		return "", err
	}
	loopRef := b.sb.Registry + "/bench/app:" + from
	res, err := pull.Pull(b.ctx, b.c, loopRef, pull.Options{PlainHTTP: true, Credentials: noCredentials})
	if err != nil {
		return "", err
	}
	p, tf, err := profile.Record(b.ctx, b.c, res.Image, profile.Options{Args: b.cfg.workload.cmd, ReadyLine: "ready", Timeout: 5 * time.Minute})
	if err != nil {
		return "", err
	}
	if p.End != profile.EndReady {
		return "", fmt.Errorf("the recorded start ended by %s, not by its ready line", p.End)
	}
	rc, err := registry.New(registry.Options{PlainHTTP: true, UserAgent: "obd-bench", Credentials: noCredentials})
	if err != nil {
		return "", err
	}
	defer rc.Close()
	src, err := image.ParseRef(loopRef)
	if err != nil {
		return "", err
	}
	dst := src
	dst.Tag = to
	if _, err := profile.Push(b.ctx, rc, src, dst, image.DefaultPlatform(), p.Layers, tf); err != nil {
		return "", err
	}
	logf("recorded the start of %s: %d reads, %s of %d layers", from, len(p.Reads), units.Bytes(p.ReadBytes), len(p.Layers))
	return b.link.Addr + "/bench/app:" + to, nil
}

// obdAccel is obdCold of the image with the acceleration layer.
func (b *bench) obdAccel() (sample, error) { return b.obdStart(b.accelRef) }

// obdDownload is obdCold with the background download on: the time to ready, then the time until every layer
// blob of the image is downloaded and verified, as obd-snapshotter's status endpoint reports it.
func (b *bench) obdDownload() (sample, error) {
	start := time.Now()
	smp, err := b.obdCold()
	if err != nil {
		return smp, err
	}
	smp.ReadyBytes, smp.ReadyRequests = sum(b.sb.BlobBytes()), sum(b.sb.BlobRequests())
	if err := b.waitLocal(len(b.im.Info.OBDLayers)); err != nil {
		return smp, err
	}
	smp.LocalSeconds = time.Since(start).Seconds()
	return smp, nil
}

// obdPullDownload is 'obd pull --download': the image is pulled lazily, then every overlaybd blob is fetched into
// the block cache in parallel range requests and checked against its digest (obd cache warm --all), then the
// workload runs.
func (b *bench) obdPullDownload() (sample, error) {
	start := time.Now()
	res, err := pull.Pull(b.ctx, b.c, b.obdRef, pull.Options{PlainHTTP: true, Credentials: noCredentials})
	if err != nil {
		return sample{}, err
	}
	cc := &cacheclient.Client{Status: status.NewClient(b.sb.StatusSocket, time.Minute), Containerd: func() (*client.Client, error) { return pull.Connect(b.sb.Containerd) }, Namespace: b.sb.Namespace}
	if err := cc.Warm(b.ctx, io.Discard, res.Image.Name(), true, "", nil, nil); err != nil {
		return sample{}, fmt.Errorf("pull --download %s: %w", b.obdRef, err)
	}
	pulled := time.Since(start)
	ready, err := b.runContainer(snapshotter.Name, b.obdRef)
	if err != nil {
		return sample{}, err
	}
	return sample{Seconds: (pulled + ready).Seconds(), PullSeconds: pulled.Seconds(), RunSeconds: ready.Seconds()}, nil
}

// waitLocal polls obd-snapshotter's status until an image has layers blobs in its background download, all of
// them verified.
func (b *bench) waitLocal(layers int) error {
	sc := status.NewClient(b.sb.StatusSocket, 10*time.Second)
	deadline := time.Now().Add(15 * time.Minute)
	var last string
	for {
		st, err := sc.Status(b.ctx)
		if err != nil {
			return fmt.Errorf("obd-snapshotter status: %w", err)
		}
		for _, img := range st.Images {
			verified, states := 0, []string{}
			for _, l := range img.Layers {
				states = append(states, fmt.Sprintf("%s %s/%s", l.Download, units.Bytes(l.DownloadedBytes), units.Bytes(l.Size)))
				switch l.Download {
				case "verified":
					verified++
				case "failed":
					return fmt.Errorf("image %s: background download of %s failed: %s", img.ImageRef, l.Digest, l.DownloadError)
				}
			}
			if verified == layers && len(img.Layers) == layers {
				return nil
			}
			if len(img.Layers) > 0 {
				last = strings.Join(states, ", ")
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("image not local after 15 minutes; layers: %s", last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (b *bench) runOnly(sn, ref string) (sample, error) {
	ready, err := b.runContainer(sn, ref)
	if err != nil {
		return sample{}, err
	}
	return sample{Seconds: ready.Seconds(), RunSeconds: ready.Seconds()}, nil
}

func (b *bench) obdMeta() (sample, error) {
	start := time.Now()
	res, err := pull.Pull(b.ctx, b.c, b.obdLoopRef, pull.Options{Credentials: noCredentials})
	if err != nil {
		return sample{}, err
	}
	d := time.Since(start)
	if res.Lazy != res.Layers {
		return sample{}, fmt.Errorf("pull %s: only %d of %d layers were lazy", b.obdLoopRef, res.Lazy, res.Layers)
	}
	return sample{Seconds: d.Seconds(), PullSeconds: d.Seconds()}, nil
}

// runContainer runs the app with ctr and returns the time until it printed "ready"; it waits for the container to
// exit (ctr run --rm also removes it) before returning. It keeps the run's phases in b.phases.
func (b *bench) runContainer(sn, ref string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(b.ctx, 5*time.Minute)
	defer cancel()
	b.seq++
	id := fmt.Sprintf("bench-%d", b.seq)
	evctx, evcancel := context.WithCancel(ctx)
	defer evcancel()
	events, errs := b.c.EventService().Subscribe(evctx,
		fmt.Sprintf(`topic=="/tasks/create",event.container_id==%q`, id),
		fmt.Sprintf(`topic=="/tasks/start",event.container_id==%q`, id))
	seen := make(chan map[string]time.Time, 1)
	go func() {
		at := map[string]time.Time{}
		defer func() { seen <- at }()
		for {
			select {
			case e := <-events:
				if _, ok := at[e.Topic]; !ok {
					at[e.Topic] = e.Timestamp
				}
			case <-errs: // the subscription ended (evcancel)
				return
			case <-evctx.Done():
				return
			}
		}
	}()
	cpu0, cpuErr := measure.ReadCPU()
	cmd := b.sb.Ctr(ctx, append([]string{"run", "--rm", "--snapshotter", sn, ref, id}, b.cfg.workload.cmd...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	var ready time.Duration
	var lines []string
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if sc.Text() == "ready" && ready == 0 {
			ready = time.Since(start)
			if cpu1, err := measure.ReadCPU(); err == nil && cpuErr == nil {
				b.phases.cpu = measure.CPUTimes{Busy: cpu1.Busy - cpu0.Busy, IOWait: cpu1.IOWait - cpu0.IOWait}
			}
		}
		lines = append(lines, sc.Text())
	}
	io.Copy(io.Discard, out)
	werr := cmd.Wait()
	evcancel()
	at := <-seen
	if ready == 0 || werr != nil {
		return 0, fmt.Errorf("ctr run --snapshotter %s %s: %v\nstdout: %s\nstderr: %s", sn, ref, werr, strings.Join(lines, "\n"), stderr.String())
	}
	if t, ok := at["/tasks/create"]; ok {
		b.phases.created = t.Sub(start)
	}
	if t, ok := at["/tasks/start"]; ok {
		b.phases.started = t.Sub(start)
	}
	return ready, nil
}

// reset empties containerd's namespace (images, containers, snapshots, content) and, with clearCache, restarts
// obd-snapshotter with an empty block cache and no learned starts.
func (b *bench) reset(clearCache bool) error {
	ctx := b.ctx
	ctrs, err := b.c.Containers(ctx)
	if err != nil {
		return err
	}
	for _, ct := range ctrs {
		if task, err := ct.Task(ctx, nil); err == nil {
			task.Delete(ctx, client.WithProcessKill)
		}
		if err := ct.Delete(ctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("delete container %s: %w", ct.ID(), err)
		}
	}
	imgs, err := b.c.ImageService().List(ctx)
	if err != nil {
		return err
	}
	for _, img := range imgs {
		if err := b.c.ImageService().Delete(ctx, img.Name, images.SynchronousDelete()); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("delete image %s: %w", img.Name, err)
		}
	}
	for _, sn := range []string{"overlayfs", snapshotter.Name} {
		if err := removeSnapshots(ctx, b.c.SnapshotService(sn)); err != nil {
			return fmt.Errorf("snapshotter %s: %w", sn, err)
		}
	}
	cs := b.c.ContentStore()
	var blobs []content.Info
	if err := cs.Walk(ctx, func(i content.Info) error { blobs = append(blobs, i); return nil }); err != nil {
		return err
	}
	for _, i := range blobs {
		if err := cs.Delete(ctx, i.Digest); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
	}
	if !clearCache {
		return nil
	}
	// The image mounts go when their snapshots are removed; wait for that before stopping the snapshotter.
	deadline := time.Now().Add(30 * time.Second)
	for {
		m, err := sandbox.MountsUnder(filepath.Join(b.sb.Dir, "snapshotter"))
		if err != nil {
			return err
		}
		if len(m) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("image mounts still there 30s after their snapshots were removed: %s", strings.Join(m, ", "))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := b.sb.KillSnapshotter(); err != nil {
		return err
	}
	// A fresh node: no cached blocks, and no start learned (or decoded) by an earlier case.
	for _, dir := range []string{b.sb.CacheDir(), filepath.Join(b.sb.Dir, "snapshotter", "starts")} {
		if err := os.RemoveAll(dir); err != nil {
			return err
		}
	}
	if err := b.sb.StartSnapshotter(b.ctx); err != nil {
		return err
	}
	// containerd redials the proxy snapshotter with its gRPC backoff: wait until it answers again.
	var perr error
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if perr = b.probeSnapshotter(); perr == nil {
			return nil
		}
	}
	return fmt.Errorf("containerd does not reach the restarted obd-snapshotter: %w", perr)
}

// probeSnapshotter makes containerd call obd-snapshotter (Prepare and Remove of an empty snapshot, under a lease
// whose synchronous deletion also removes it from the snapshotter).
func (b *bench) probeSnapshotter() error {
	ls := b.c.LeasesService()
	l, err := ls.Create(b.ctx, leases.WithRandomID(), leases.WithExpiration(time.Minute))
	if err != nil {
		return err
	}
	ctx := leases.WithLease(b.ctx, l.ID)
	ss := b.c.SnapshotService(snapshotter.Name)
	_, err = ss.Prepare(ctx, "bench-probe-"+l.ID, "")
	if err == nil {
		err = ss.Remove(ctx, "bench-probe-"+l.ID)
	}
	return errors.Join(err, ls.Delete(b.ctx, l, leases.SynchronousDelete))
}

// removeSnapshots removes every snapshot, children before parents.
func removeSnapshots(ctx context.Context, ss snapshots.Snapshotter) error {
	for range 100 {
		var infos []snapshots.Info
		if err := ss.Walk(ctx, func(_ context.Context, i snapshots.Info) error { infos = append(infos, i); return nil }); err != nil {
			return err
		}
		if len(infos) == 0 {
			return nil
		}
		parents := map[string]bool{}
		for _, i := range infos {
			parents[i.Parent] = true
		}
		for _, i := range infos {
			if !parents[i.Name] {
				if err := ss.Remove(ctx, i.Name); err != nil && !errdefs.IsNotFound(err) {
					return fmt.Errorf("remove snapshot %s: %w", i.Name, err)
				}
			}
		}
	}
	return errors.New("snapshots remain after 100 rounds of removal")
}

func sum(m map[string]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}

// calibration is what the shaped link measured as before the runs. The three 1 MiB reads show what TCP's window
// costs on the path: a new connection starts small (slow start), a warm one sends at the rate, and one idle for
// longer than its retransmission timeout starts small again (tcp_slow_start_after_idle; not with BBR).
type calibration struct {
	RTTms float64 `json:"requestRoundTripMs"` // median of small GETs on a kept-alive connection
	// Mbits is the throughput of one range read of a layer blob, RangeReadBytes long: about 2 s at the link's rate,
	// at least 16 MiB, at most the largest layer.
	Mbits          float64 `json:"rangeReadMbits"`
	RangeReadBytes int64   `json:"rangeReadBytes"`
	FreshMiBms     float64 `json:"freshConnMiBReadMs"` // 1 MiB range read on a new connection, connect included
	WarmMiBms      float64 `json:"warmConnMiBReadMs"`  // 1 MiB range read right after the long one, same connection
	IdleMiBms      float64 `json:"idleConnMiBReadMs"`  // 1 MiB range read on that connection after calibIdle
}

// calibIdle is how long the connection rests before the last 1 MiB read: longer than TCP's minimum
// retransmission timeout (200 ms) plus the round trip.
const calibIdle = time.Second

func calibrate(ctx context.Context, link *shapedLink, im *builtImage) (calibration, error) {
	addr := link.Addr
	tr := &http.Transport{MaxConnsPerHost: 1} // one connection, reused: the warm and idle reads find it
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: time.Minute}
	get := func(url string, n int64) (time.Duration, int64, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return 0, 0, err
		}
		if n > 0 {
			req.Header.Set("Range", fmt.Sprintf("bytes=0-%d", n-1))
		}
		start := time.Now()
		resp, err := hc.Do(req)
		if err != nil {
			return 0, 0, err
		}
		defer resp.Body.Close()
		got, err := io.Copy(io.Discard, resp.Body)
		if resp.StatusCode/100 != 2 {
			return 0, 0, fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		return time.Since(start), got, err
	}
	ms := func(d time.Duration) float64 { return d.Seconds() * 1000 }
	var big layerInfo
	for _, l := range im.Info.PlainLayers {
		if l.Size > big.Size {
			big = l
		}
	}
	blob := fmt.Sprintf("http://%s/v2/bench/app/blobs/%s", addr, big.Digest)
	var c calibration
	fresh, _, err := get(blob, min(big.Size, 1<<20))
	if err != nil {
		return c, err
	}
	c.FreshMiBms = ms(fresh)
	var rtts []float64
	for range 6 {
		d, _, err := get("http://"+addr+"/v2/", 0)
		if err != nil {
			return c, err
		}
		rtts = append(rtts, ms(d))
	}
	slices.Sort(rtts)
	c.RTTms = rtts[len(rtts)/2]
	d, got, err := get(blob, min(big.Size, max(16<<20, link.RateBits/8*2)))
	if err != nil {
		return c, err
	}
	c.RangeReadBytes, c.Mbits = got, float64(got)*8/d.Seconds()/1e6
	warm, _, err := get(blob, min(big.Size, 1<<20))
	if err != nil {
		return c, err
	}
	c.WarmMiBms = ms(warm)
	time.Sleep(calibIdle)
	idle, _, err := get(blob, min(big.Size, 1<<20))
	if err != nil {
		return c, err
	}
	c.IdleMiBms = ms(idle)
	return c, nil
}

// saveLogs copies the logs of the sandbox's processes into dir.
func saveLogs(sb *sandbox.Sandbox, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, name := range []string{"registry", "containerd", "snapshotter"} {
		if err := os.WriteFile(filepath.Join(dir, name+".log"), []byte(sb.Log(name)), 0o644); err != nil {
			return err
		}
	}
	return nil
}
