package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	digest "github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/bench/internal/measure"
	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/device"
	"github.com/obdproject/obd/internal/mounter"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/snapshotter"
)

// Targets: obd/plain ratios and warm attach latency.
const (
	targetSeqRatio  = 0.6
	targetRandRatio = 0.5
	targetAttachMS  = 50
)

// bench holds what the measurements share.
type bench struct {
	cfg    config
	cl     *cleanups
	tmp    string
	img    *builtImage
	reg    *blobRegistry
	client *registry.Client
	fl     *device.FuseLoop
	cache  *cache.Cache   // the main image's cache
	caches []*cache.Cache // every cache opened, closed at the end
	m      *mounter.Mounter
	layers []snapshotter.Layer
	obd    *obdMounts
	sides  []string // mounts compared: "plain", ["plain-dio",] "obd", each at tmp/mnt/<side>
	rep    *report
}

// obdMounts tracks the images mounted by the benchmark so that they are unmounted on any exit.
type obdMounts struct {
	fl      *device.FuseLoop
	mounted map[string]mountRef // by target
}

type mountRef struct {
	m  *mounter.Mounter
	id string
}

func (o *obdMounts) mount(ctx context.Context, m *mounter.Mounter, id string, layers []snapshotter.Layer, target string) error {
	// Recorded before the call, so that the cleanup calls Unmount whatever happens (Unmount of a target that is not
	// mounted does nothing).
	o.mounted[target] = mountRef{m, id}
	return m.Mount(ctx, id, layers, target)
}

func (o *obdMounts) unmount(target string) error {
	r, ok := o.mounted[target]
	if !ok {
		return nil
	}
	delete(o.mounted, target)
	if err := r.m.Unmount(context.Background(), r.id, target); err != nil {
		// Make sure the device goes away anyway.
		return errors.Join(err, device.Unmount(target), o.fl.Detach(context.Background(), r.id))
	}
	return nil
}

func (o *obdMounts) unmountAll() error {
	var errs []error
	for t := range o.mounted {
		errs = append(errs, o.unmount(t))
	}
	return errors.Join(errs...)
}

func run(ctx context.Context, cfg config, cl *cleanups) (*report, error) {
	if err := preflight(); err != nil {
		return nil, err
	}
	if err := reclaimStale(ctx, cfg.workDir); err != nil {
		logf("could not remove everything earlier runs left: %v", err)
	}
	b := &bench{cfg: cfg, cl: cl, rep: newReport(cfg)}
	var err error
	if b.tmp, err = os.MkdirTemp(cfg.workDir, tmpPrefix); err != nil {
		return nil, err
	}
	if b.tmp, err = filepath.Abs(b.tmp); err != nil {
		return nil, err
	}
	cl.add("remove "+b.tmp, func() error { return removeUnmounted(b.tmp) })
	if err := os.WriteFile(filepath.Join(b.tmp, pidFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return nil, err
	}
	if err := b.setup(ctx); err != nil {
		return b.rep, err
	}
	only := map[string]bool{}
	for _, o := range strings.Split(cfg.only, ",") {
		only[strings.TrimSpace(o)] = true
	}
	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"seq", b.sequential},
		{"rand", b.random},
		{"attach", b.attach},
		{"mem", b.memory},
	}
	for _, s := range steps {
		if !only[s.name] {
			continue
		}
		if err := ctx.Err(); err != nil {
			return b.rep, err
		}
		if err := s.fn(ctx); err != nil {
			return b.rep, fmt.Errorf("%s: %w", s.name, err)
		}
	}
	b.rep.finish()
	return b.rep, nil
}

// setup builds the image, starts the registry, mounts the obd image (warming its cache) and the plain baseline.
func (b *bench) setup(ctx context.Context) error {
	imgDir := b.cfg.imageDir
	if imgDir == "" {
		imgDir = filepath.Join(b.tmp, "image")
	}
	params := imageParams{FileBytes: int64(b.cfg.fileMiB) << 20, VirtualSize: int64(b.cfg.vsizeGiB) << 30,
		SmallFiles: b.cfg.smallFiles, Generator: generatorVersion}
	img, err := buildImage(ctx, imgDir, params, logf)
	if err != nil {
		return err
	}
	b.img = img
	b.rep.setImage(img)
	logf("image: %d MiB file, blobs %d MiB (%.2f× smaller), raw disk %d MiB of data", params.FileBytes>>20,
		img.blobBytes()>>20, float64(img.TarBytes)/float64(img.blobBytes()), img.RawData>>20)

	blobs := map[digest.Digest]string{}
	for _, bl := range img.Blobs {
		blobs[bl.Digest] = bl.Path
	}
	if b.reg, err = startRegistry(blobs); err != nil {
		return err
	}
	b.cl.add("stop registry", b.reg.Close)
	ref := b.reg.Host + "/bench/io:obd"
	for _, bl := range img.Blobs {
		b.layers = append(b.layers, snapshotter.Layer{Digest: bl.Digest, Size: bl.Size, ImageRef: ref})
	}
	log := quietLogger(b.cfg.verbose)
	if b.client, err = registry.New(registry.Options{PlainHTTP: true, Credentials: registry.StaticCredentials("", ""), Logger: log}); err != nil {
		return err
	}
	b.cl.add("close registry client", b.client.Close)
	b.fl = device.NewFuseLoop(log)
	b.obd = &obdMounts{fl: b.fl, mounted: map[string]mountRef{}}
	// Cleanups run last first: the images are unmounted before their caches close.
	b.cl.add("close caches", b.closeCaches)
	b.cl.add("unmount obd images", b.obd.unmountAll)
	if b.cache, b.m, err = b.newMounter(filepath.Join(b.tmp, "cache")); err != nil {
		return err
	}

	// First mount: nothing cached yet.
	target := filepath.Join(b.tmp, "mnt", "obd")
	if err := dropCaches(); err != nil {
		return err
	}
	start := time.Now()
	if err := b.obd.mount(ctx, b.m, "bench-io", b.layers, target); err != nil {
		return err
	}
	b.rep.Attach.FirstColdMS = ms(time.Since(start))
	logf("mounted the obd image at %s (first, cold: %.1f ms)", target, b.rep.Attach.FirstColdMS)

	// Warm the cache: read the whole big file through the mount, and check its content.
	before := b.reg.bytes.Load()
	start = time.Now()
	res, err := runWorker(ctx, "-bs", "1048576", "-hash", "seq", filepath.Join(target, bigFile))
	if err != nil {
		return fmt.Errorf("warm-up read: %w", err)
	}
	if res.SHA256 != img.BigSHA256 {
		return fmt.Errorf("warm-up read: the big file read through obd has SHA-256 %s, want %s", res.SHA256, img.BigSHA256)
	}
	b.rep.Warmup = warmup{Seconds: time.Since(start).Seconds(), RegistryBytes: b.reg.bytes.Load() - before,
		MBps: mbps(res.Bytes, res.Seconds), Cache: b.cache.Stats()}
	logf("warmed the cache: read %d MiB through obd in %.1fs (%.0f MB/s), fetched %d MiB from the registry; content OK",
		res.Bytes>>20, res.Seconds, b.rep.Warmup.MBps, b.rep.Warmup.RegistryBytes>>20)

	// The baselines: the raw export on a buffered loop device (what 'mount -o loop,ro' sets up) and, for
	// reference, on one with direct I/O on the raw file. The same ext4 can be mounted read-only from both.
	b.sides = []string{"plain", "obd"}
	dios := []bool{false}
	if b.cfg.plainDIO {
		b.sides = []string{"plain", "plain-dio", "obd"}
		dios = append(dios, true)
	}
	for _, dio := range dios {
		name := "plain"
		if dio {
			name = "plain-dio"
		}
		p, err := mountPlain(img.Raw, filepath.Join(b.tmp, "mnt", name), dio)
		if err != nil {
			return err
		}
		b.cl.add("unmount "+name+" loop", p.close)
		if res, err = runWorker(ctx, "-bs", "1048576", "-hash", "seq", b.bigPath(name)); err != nil {
			return fmt.Errorf("%s read: %w", name, err)
		}
		if res.SHA256 != img.BigSHA256 {
			return fmt.Errorf("the big file read through the %s loop device has SHA-256 %s, want %s", name, res.SHA256, img.BigSHA256)
		}
		logf("mounted the %s baseline (%s) at %s; content OK", name, p.loop, p.target)
	}
	return nil
}

// newMounter opens a block cache in dir and a Mounter that uses it.
func (b *bench) newMounter(dir string) (*cache.Cache, *mounter.Mounter, error) {
	log := quietLogger(b.cfg.verbose)
	c, err := cache.Open(cache.Options{Dir: dir, CapacityBytes: 2*b.img.blobBytes() + 1<<30, Logger: log})
	if err != nil {
		return nil, nil, err
	}
	b.caches = append(b.caches, c)
	m := mounter.New(mounter.Options{
		Frontend: b.fl,
		StateDir: filepath.Join(b.tmp, "state"),
		Cache:    c,
		Registry: func(string) (*registry.Client, error) { return b.client, nil },
		Logger:   log,
	})
	return c, m, nil
}

// closeCaches closes every cache opened (Close is idempotent).
func (b *bench) closeCaches() error {
	var errs []error
	for _, c := range b.caches {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// order returns the sides in the order of run i: rotated, so that drift hits all equally.
func (b *bench) order(i int) []string {
	n := len(b.sides)
	out := make([]string, n)
	for j := range n {
		out[j] = b.sides[(i+j)%n]
	}
	return out
}

func (b *bench) bigPath(side string) string {
	return filepath.Join(b.tmp, "mnt", side, bigFile)
}

// measure runs the worker with args on every side runs times, dropping the page cache before each run.
func (b *bench) measure(ctx context.Context, what string, runs int, args ...string) (map[string][]workerResult, error) {
	out := map[string][]workerResult{}
	for i := range runs {
		for _, side := range b.order(i) {
			if err := dropCaches(); err != nil {
				return nil, err
			}
			load := measure.LoadAvg()
			res, err := runWorker(ctx, append(args, b.bigPath(side))...)
			if err != nil {
				return nil, fmt.Errorf("%s on %s: %w", what, side, err)
			}
			res.Load1 = load
			out[side] = append(out[side], res)
			logf("%s run %d %-9s: %s", what, i+1, side, res.describe())
		}
	}
	return out, nil
}

func (r workerResult) describe() string {
	s := fmt.Sprintf("%.0f MB/s, %.0f IOPS in %.2fs", mbps(r.Bytes, r.Seconds), float64(r.Ops)/r.Seconds, r.Seconds)
	if r.P50us > 0 {
		s += fmt.Sprintf(", latency p50 %.0f µs p99 %.0f µs", r.P50us, r.P99us)
	}
	if !r.Direct {
		s += " (buffered)"
	}
	if r.Load1 > 0 {
		s += fmt.Sprintf(" [load %.1f]", r.Load1)
	}
	return s
}

func (b *bench) sequential(ctx context.Context) error {
	before := b.reg.bytes.Load()
	args := []string{"-bs", "1048576", "seq"}
	res, err := b.measure(ctx, "sequential", b.cfg.seqRuns, args...)
	if err != nil {
		return err
	}
	b.rep.setReads(&b.rep.Sequential, res, func(r workerResult) float64 { return mbps(r.Bytes, r.Seconds) }, "MB/s", targetSeqRatio)
	b.rep.RegistryBytesDuringMeasurement += b.reg.bytes.Load() - before
	if b.cfg.profile {
		p, err := b.profile(ctx, "seq", 5, args)
		if err != nil {
			return err
		}
		b.rep.Profiles = append(b.rep.Profiles, p)
	}
	return nil
}

func (b *bench) random(ctx context.Context) error {
	before := b.reg.bytes.Load()
	args := []string{"-bs", "4096", "-depth", strconv.Itoa(b.cfg.depth), "-duration", b.cfg.randTime.String(), "rand"}
	res, err := b.measure(ctx, "random 4K", b.cfg.runs, args...)
	if err != nil {
		return err
	}
	b.rep.setReads(&b.rep.Random, res, func(r workerResult) float64 { return float64(r.Ops) / r.Seconds }, "IOPS", targetRandRatio)
	b.rep.RegistryBytesDuringMeasurement += b.reg.bytes.Load() - before
	if b.cfg.profile {
		p, err := b.profile(ctx, "rand", 1, args)
		if err != nil {
			return err
		}
		b.rep.Profiles = append(b.rep.Profiles, p)
	}
	return nil
}

// profile runs passes extra (unreported) runs on obd, page cache dropped before each, with this process's CPU
// profile on.
func (b *bench) profile(ctx context.Context, name string, passes int, args []string) (profileSummary, error) {
	path := strings.TrimSuffix(b.cfg.out, filepath.Ext(b.cfg.out)) + "." + name + ".pprof"
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return profileSummary{}, err
	}
	f, err := os.Create(path)
	if err != nil {
		return profileSummary{}, err
	}
	defer f.Close()
	if err := pprof.StartCPUProfile(f); err != nil {
		return profileSummary{}, err
	}
	var wall time.Duration
	var ops int64
	for range passes {
		if err = dropCaches(); err != nil {
			break
		}
		start := time.Now()
		var res workerResult
		if res, err = runWorker(ctx, append(args, b.bigPath("obd"))...); err != nil {
			break
		}
		wall += time.Since(start)
		ops += res.Ops
		logf("profiling %s on obd: %s", name, res.describe())
	}
	pprof.StopCPUProfile()
	if err != nil {
		return profileSummary{}, err
	}
	if err := f.Close(); err != nil {
		return profileSummary{}, err
	}
	s := summarizeProfile(path, wall)
	s.Requests = ops
	logf("wrote the CPU profile %s", path)
	return s, nil
}

// attach measures mounter.Mount (open the layers, attach FUSE + loop, mount ext4) and Unmount.
func (b *bench) attach(ctx context.Context) error {
	target := filepath.Join(b.tmp, "mnt", "obd")
	start := time.Now()
	if err := b.obd.unmount(target); err != nil {
		return err
	}
	logf("unmounted the main obd image in %.1f ms", ms(time.Since(start)))
	a := &b.rep.Attach
	cycle := func(m *mounter.Mounter, id string, drop bool) (mount, unmount float64, err error) {
		if drop {
			if err := dropCaches(); err != nil {
				return 0, 0, err
			}
		}
		start := time.Now()
		if err := b.obd.mount(ctx, m, id, b.layers, target); err != nil {
			return 0, 0, err
		}
		mount = ms(time.Since(start))
		start = time.Now()
		if err := b.obd.unmount(target); err != nil {
			return 0, 0, err
		}
		return mount, ms(time.Since(start)), nil
	}
	for _, drop := range []bool{false, true} {
		for i := range b.cfg.attachRuns {
			mt, ut, err := cycle(b.m, "bench-io", drop)
			if err != nil {
				return err
			}
			if drop {
				a.WarmDroppedMS = append(a.WarmDroppedMS, mt)
			} else {
				a.WarmMS = append(a.WarmMS, mt)
				a.UnmountMS = append(a.UnmountMS, ut)
			}
			if i == 0 {
				logf("warm Mount %.1f ms, Unmount %.1f ms (page cache dropped: %v)", mt, ut, drop)
			}
		}
	}
	for i := range b.cfg.coldRuns {
		dir := filepath.Join(b.tmp, fmt.Sprintf("cold-cache-%d", i))
		c, m, err := b.newMounter(dir)
		if err != nil {
			return err
		}
		reqs, bytes := b.reg.requests.Load(), b.reg.bytes.Load()
		mt, _, err := cycle(m, fmt.Sprintf("bench-io-cold-%d", i), true)
		if err != nil {
			return err
		}
		a.ColdMS = append(a.ColdMS, mt)
		a.ColdRegistryRequests = append(a.ColdRegistryRequests, b.reg.requests.Load()-reqs)
		a.ColdRegistryBytes = append(a.ColdRegistryBytes, b.reg.bytes.Load()-bytes)
		if err := c.Close(); err != nil {
			return err
		}
		if err := os.RemoveAll(dir); err != nil {
			return err
		}
	}
	a.finish()
	logf("attach+mount: warm median %.1f ms, warm after drop_caches %.1f ms, cold median %.1f ms", a.WarmMedianMS, a.WarmDroppedMedianMS, a.ColdMedianMS)
	return nil
}

// memory attaches cfg.images images at once (the same blobs under different ids and targets), touches their files,
// and reports the Go heap and process RSS they add.
func (b *bench) memory(ctx context.Context) error {
	n := b.cfg.images
	heap0, rss0, gr0 := memSnapshot()
	base, err := b.writeHeapProfile("mem-before")
	if err != nil {
		return err
	}
	var targets []string
	for i := range n {
		target := filepath.Join(b.tmp, "mnt", fmt.Sprintf("mem-%d", i))
		if err := b.obd.mount(ctx, b.m, fmt.Sprintf("bench-io-mem-%d", i), b.layers, target); err != nil {
			return err
		}
		targets = append(targets, target)
		if err := touchTree(target); err != nil {
			return err
		}
	}
	heap1, rss1, gr1 := memSnapshot()
	after, err := b.writeHeapProfile("mem")
	if err != nil {
		return err
	}
	b.rep.Memory.Sites, b.rep.Memory.HeapProfile = heapSites(base, after, n), after
	if err := os.Remove(base); err != nil {
		return err
	}
	mm := &b.rep.Memory
	mm.Images = n
	mm.HeapInuseBefore, mm.HeapInuseAfter = heap0, heap1
	mm.RSSBefore, mm.RSSAfter = rss0, rss1
	mm.HeapPerImage = float64(int64(heap1)-int64(heap0)) / float64(n)
	mm.RSSPerImage = float64(rss1-rss0) / float64(n)
	mm.GoroutinesPerImage = float64(gr1-gr0) / float64(n)
	for _, t := range targets {
		if err := b.obd.unmount(t); err != nil {
			return err
		}
	}
	logf("memory: %d images attached: %.0f KiB heap and %.0f KiB RSS per image, %.1f goroutines per image",
		n, mm.HeapPerImage/1024, mm.RSSPerImage/1024, mm.GoroutinesPerImage)
	return nil
}

// writeHeapProfile writes this process's heap profile next to the results as <out>.<name>.pprof.
func (b *bench) writeHeapProfile(name string) (string, error) {
	path := strings.TrimSuffix(b.cfg.out, filepath.Ext(b.cfg.out)) + "." + name + ".pprof"
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", err
	}
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		f.Close()
		return "", err
	}
	return path, f.Close()
}

// touchTree reads every small file under dir and the first MiB of the big file, as a container start would.
func touchTree(dir string) error {
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(io.Discard, io.LimitReader(f, 1<<20))
		return err
	})
}

// memSnapshot returns the Go heap in use, the process RSS (after returning freed memory to the OS) and the
// number of goroutines.
func memSnapshot() (heapInuse uint64, rss int64, goroutines int) {
	runtime.GC()
	runtime.GC() // the second one empties the sync.Pools
	debug.FreeOSMemory()
	var st runtime.MemStats
	runtime.ReadMemStats(&st)
	return st.HeapInuse, readRSS(), runtime.NumGoroutine()
}

// readRSS returns VmRSS of this process in bytes.
func readRSS() int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func mbps(bytes int64, seconds float64) float64 {
	if seconds <= 0 {
		return 0
	}
	return float64(bytes) / seconds / 1e6
}
