// Command writable measures a container's writable block layer (rw_mode dir) against an overlayfs upper directory
// on the same disk, and the space the layer takes when a file is rewritten.
//
// The obd side is the node daemon's code path: an image converted by internal/convert (one small layer over a
// fresh ext4) and mounter.MountWritable — a sparse LSMT layer in a work directory stacked on the image's layer,
// served by device.FuseLoop, its ext4 mounted read-write with online discard, as a container in dir mode gets it.
// The baseline is an overlayfs mount whose upper and work directories are in the same work directory (so on the
// same disk), as containerd's overlayfs snapshotter gives a container. fio runs the same jobs on both: 4 KiB random
// writes (O_DIRECT, libaio) and 1 MiB sequential writes (O_DIRECT, fsync at the end); the sides rotate which goes
// first, medians of the runs. Then a file is written and rewritten 10 times, in place and by replacing it (write a
// new file, rename it over), and the size of the layer's data file is read after each.
//
//	go run ./bench/writable [flags]        # see bench/README.md
package main

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/bench/internal/measure"
	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/device"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/mounter"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/units"
)

type config struct {
	runs                int
	randTime            time.Duration
	depth               int
	fileMiB, rewriteMiB int
	rewrites            int
	vsizeGiB            int
	workDir, out        string
	verbose, skipFio    bool
}

func main() {
	var cfg config
	flag.IntVar(&cfg.runs, "runs", 5, "fio runs per side and job (the median is reported; at least 3)")
	flag.DurationVar(&cfg.randTime, "rand-time", 10*time.Second, "duration of one random-write run")
	flag.IntVar(&cfg.depth, "depth", 32, "I/O depth of the random writes")
	flag.IntVar(&cfg.fileMiB, "file-mib", 1024, "size of the file the random writes go to, and of the sequential write, in MiB")
	flag.IntVar(&cfg.rewriteMiB, "rewrite-mib", 256, "size of the file rewritten for the space measurement, in MiB")
	flag.IntVar(&cfg.rewrites, "rewrites", 10, "rewrites of that file")
	flag.IntVar(&cfg.vsizeGiB, "vsize-gib", 16, "virtual size of the image's disk in GiB")
	flag.StringVar(&cfg.workDir, "work", "", "directory for the layer and the overlayfs directories (default $TMPDIR; a real disk, not tmpfs)")
	flag.StringVar(&cfg.out, "out", "bench/results/writable.json", "JSON results; the table goes next to it (.txt)")
	flag.BoolVar(&cfg.skipFio, "space-only", false, "only measure the space of rewrites")
	flag.BoolVar(&cfg.verbose, "v", false, "log what the mounter and device do")
	flag.Parse()
	if cfg.runs < 3 {
		fatal(errors.New("-runs: at least 3"))
	}
	if os.Geteuid() != 0 {
		fatal(errors.New("needs root: it attaches loop devices and FUSE, and mounts filesystems"))
	}
	if _, err := exec.LookPath("fio"); err != nil && !cfg.skipFio {
		fatal(errors.New("fio is not installed (apt-get install fio)"))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	r, err := run(ctx, cfg)
	if err != nil {
		fatal(err)
	}
	var table bytes.Buffer
	r.print(&table)
	os.Stdout.Write(table.Bytes())
	if cfg.out != "" {
		b, _ := json.MarshalIndent(r, "", "  ")
		if err := os.WriteFile(cfg.out, append(b, '\n'), 0o644); err != nil {
			fatal(err)
		}
		if err := os.WriteFile(strings.TrimSuffix(cfg.out, ".json")+".txt", table.Bytes(), 0o644); err != nil {
			fatal(err)
		}
	}
}

// command is how the run was started, without -out (the results are compared wherever they are written).
func command() string {
	args := []string{"go run ./bench/writable"}
	for i := 1; i < len(os.Args); i++ {
		a := os.Args[i]
		if a == "-out" || a == "--out" {
			i++
			continue
		}
		if strings.HasPrefix(a, "-out=") || strings.HasPrefix(a, "--out=") {
			continue
		}
		args = append(args, a)
	}
	return strings.Join(args, " ")
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "writable:", err)
	os.Exit(1)
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

// report is the JSON result.
type report struct {
	Command  string             `json:"command"`
	Date     string             `json:"date"`
	Kernel   string             `json:"kernel"`
	CPUs     int                `json:"cpus"`
	Go       string             `json:"go"`
	Load     [2]float64         `json:"load_before_after"`
	Method   string             `json:"method"`
	Fio      map[string]fioSide `json:"fio,omitempty"`
	Space    space              `json:"space"`
	Versions map[string]string  `json:"versions"`
}

// fioSide holds a job's runs on each side.
type fioSide struct {
	Unit    string               `json:"unit"`
	Runs    map[string][]float64 `json:"runs"`
	Medians map[string]float64   `json:"medians"`
	Ratio   float64              `json:"obd_over_overlayfs"`
	Target  float64              `json:"target_ratio"`
}

// space is the size of the layer's data file through the rewrites.
type space struct {
	FileBytes int64 `json:"file_bytes"`
	// Empty is the data file before the file is written (the journal and what mounting wrote).
	Empty        int64   `json:"data_bytes_empty"`
	FirstWrite   int64   `json:"data_bytes_after_first_write"`
	InPlace      []int64 `json:"data_bytes_after_each_rewrite_in_place"`
	Replaced     []int64 `json:"data_bytes_after_each_rewrite_by_rename"`
	Ratio        float64 `json:"data_over_live"`
	Target       float64 `json:"target_ratio"`
	Index        int64   `json:"index_bytes"`
	UpperBytes   int64   `json:"overlayfs_upper_bytes"`
	Explanation  string  `json:"explanation"`
	LiveBytes    int64   `json:"live_bytes"`
	UpstreamLike int64   `json:"append_only_bytes_estimate"`
}

const (
	sideObd = "obd-dir"
	sideOvl = "overlayfs"
)

func run(ctx context.Context, cfg config) (*report, error) {
	r := &report{
		Command: command(), Date: time.Now().UTC().Format(time.RFC3339), CPUs: runtime.NumCPU(), Go: runtime.Version(),
		Fio: map[string]fioSide{}, Versions: map[string]string{},
		Method: "obd-dir: mounter.MountWritable over an image converted by internal/convert (sparse LSMT writable layer, " +
			"device.FuseLoop, ext4 rw with discard); overlayfs: lower = an empty directory, upper and work in the same " +
			"work directory. fio on both, the sides alternating first; medians.",
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		r.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if out, err := exec.Command("fio", "--version").Output(); err == nil {
		r.Versions["fio"] = strings.TrimSpace(string(out))
	}
	r.Load[0] = measure.LoadAvg()
	work, err := os.MkdirTemp(cfg.workDir, "obd-bench-writable-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)

	obdMnt, cleanup, err := mountObd(ctx, cfg, work)
	if cleanup != nil {
		defer func() {
			if err := cleanup(); err != nil {
				logf("cleanup: %v", err)
			}
		}()
	}
	if err != nil {
		return nil, err
	}
	ovlMnt := filepath.Join(work, "ovl", "merged")
	for _, d := range []string{"lower", "upper", "work", "merged"} {
		if err := os.MkdirAll(filepath.Join(work, "ovl", d), 0o755); err != nil {
			return nil, err
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", filepath.Join(work, "ovl", "lower"), filepath.Join(work, "ovl", "upper"), filepath.Join(work, "ovl", "work"))
	if err := unix.Mount("overlay", ovlMnt, "overlay", 0, opts); err != nil {
		return nil, fmt.Errorf("mount overlayfs: %w", err)
	}
	defer unix.Unmount(ovlMnt, unix.MNT_DETACH)
	mnts := map[string]string{sideObd: obdMnt, sideOvl: ovlMnt}

	// Space first, on the fresh layer; the file is removed afterwards.
	if err := measureSpace(cfg, obdMnt, ovlMnt, filepath.Join(work, "rw"), filepath.Join(work, "ovl", "upper"), &r.Space); err != nil {
		return nil, err
	}

	if !cfg.skipFio {
		jobs := []struct {
			name, unit string
			target     float64
			args       func(dir string) []string
			value      func(fioResult) float64
		}{
			{"randwrite-4k", "IOPS", 0.5, func(dir string) []string {
				return []string{"--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--direct=1", fmt.Sprintf("--iodepth=%d", cfg.depth),
					fmt.Sprintf("--size=%dM", cfg.fileMiB), fmt.Sprintf("--runtime=%d", int(cfg.randTime.Seconds())), "--time_based",
					"--filename=" + filepath.Join(dir, "fio.rand")}
			}, func(f fioResult) float64 { return f.Write.IOPS }},
			{"seqwrite-1m", "MB/s", 0.5, func(dir string) []string {
				return []string{"--rw=write", "--bs=1M", "--ioengine=libaio", "--direct=1", "--iodepth=4", "--end_fsync=1",
					fmt.Sprintf("--size=%dM", cfg.fileMiB), "--filename=" + filepath.Join(dir, "fio.seq")}
			}, func(f fioResult) float64 { return f.Write.BWBytes / 1e6 }},
		}
		for _, job := range jobs {
			res := fioSide{Unit: job.unit, Target: job.target, Runs: map[string][]float64{}, Medians: map[string]float64{}}
			for i := range cfg.runs {
				order := []string{sideObd, sideOvl}
				if i%2 == 1 {
					order[0], order[1] = order[1], order[0]
				}
				for _, side := range order {
					if job.name == "seqwrite-1m" {
						os.Remove(filepath.Join(mnts[side], "fio.seq"))
					}
					if err := measure.DropCaches(); err != nil {
						return nil, err
					}
					f, err := runFio(ctx, job.name, job.args(mnts[side]))
					if err != nil {
						return nil, fmt.Errorf("%s on %s: %w", job.name, side, err)
					}
					v := job.value(f)
					res.Runs[side] = append(res.Runs[side], v)
					logf("%s %s run %d: %.0f %s", job.name, side, i+1, v, job.unit)
				}
			}
			for side, vs := range res.Runs {
				res.Medians[side] = measure.Median(vs)
			}
			res.Ratio = res.Medians[sideObd] / res.Medians[sideOvl]
			r.Fio[job.name] = res
			for _, side := range []string{sideObd, sideOvl} {
				os.Remove(filepath.Join(mnts[side], "fio.rand"))
				os.Remove(filepath.Join(mnts[side], "fio.seq"))
			}
		}
	}
	r.Load[1] = measure.LoadAvg()
	return r, nil
}

// mountObd converts a one-layer image and mounts it with a writable layer in work/rw, as a container in dir mode
// gets it.
func mountObd(ctx context.Context, cfg config, work string) (string, func() error, error) {
	logf("converting a one-layer image (virtual size %d GiB)", cfg.vsizeGiB)
	blob, err := convertBase(ctx, work, int64(cfg.vsizeGiB)<<30)
	if err != nil {
		return "", nil, err
	}
	level := slog.LevelWarn
	if cfg.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	c, err := cache.Open(cache.Options{Dir: filepath.Join(work, "cache"), CapacityBytes: 1 << 30, Logger: log})
	if err != nil {
		return "", nil, err
	}
	fl := device.NewFuseLoop(log)
	m := mounter.New(mounter.Options{
		Frontend: fl, StateDir: filepath.Join(work, "state"), Cache: c, Logger: log,
		Registry: func(string) (*registry.Client, error) { return nil, errors.New("the image's layer is local") },
	})
	const id = "bench-writable"
	target := filepath.Join(work, "obd-mnt")
	cleanup := func() error {
		return errors.Join(m.Unmount(context.Background(), id, target), c.Close())
	}
	layers := []snapshotter.Layer{{LocalPath: blob}}
	start := time.Now()
	dev, err := m.MountWritable(ctx, id, layers, "", snapshotter.WritableLayer{Dir: filepath.Join(work, "rw")}, target)
	if err != nil {
		return "", cleanup, fmt.Errorf("mount the writable layer: %w", err)
	}
	logf("writable layer attached on %s, mounted at %s in %s", dev, target, time.Since(start).Round(time.Millisecond))
	return target, cleanup, nil
}

// convertBase converts an image of one small layer into an overlaybd layer blob in work and returns its path.
func convertBase(ctx context.Context, work string, vsize int64) (string, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range []struct{ name, body string }{{"etc/hostname", "bench\n"}, {"etc/motd", "a writable layer\n"}} {
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Mode: 0o644, Size: int64(len(f.body)), Typeflag: tar.TypeReg}); err != nil {
			return "", err
		}
		tw.Write([]byte(f.body))
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	layoutDir := filepath.Join(work, "src")
	lay, err := image.CreateLayout(layoutDir)
	if err != nil {
		return "", err
	}
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}}
	if _, err := lay.WriteImage("base", [][]byte{buf.Bytes()}, ocispec.MediaTypeImageLayer, cfg); err != nil {
		return "", err
	}
	src, err := image.OpenLocalSource(image.Ref{Transport: image.TransportOCI, Path: layoutDir, Tag: "base"}, image.DefaultPlatform())
	if err != nil {
		return "", err
	}
	defer src.Close()
	res, err := convert.ConvertImage(ctx, src, convert.ImageOptions{VirtualSize: vsize, OCI: true, WorkDir: work})
	if err != nil {
		return "", fmt.Errorf("convert: %w", err)
	}
	defer res.Cleanup()
	out := filepath.Join(work, "base.blob")
	return out, os.Rename(res.Blobs[0].Path, out)
}

// fioResult is the part of fio's JSON output read here.
type fioResult struct {
	Write struct {
		IOPS    float64 `json:"iops"`
		BWBytes float64 `json:"bw_bytes"`
	} `json:"write"`
}

func runFio(ctx context.Context, name string, args []string) (fioResult, error) {
	cmd := exec.CommandContext(ctx, "fio", append([]string{"--name=" + name, "--output-format=json", "--group_reporting"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fioResult{}, fmt.Errorf("fio: %w: %s", err, stderr.String())
	}
	var parsed struct {
		Jobs []fioResult `json:"jobs"`
	}
	// fio may print notes before the JSON.
	if i := bytes.IndexByte(out, '{'); i > 0 {
		out = out[i:]
	}
	if err := json.Unmarshal(out, &parsed); err != nil || len(parsed.Jobs) != 1 {
		return fioResult{}, fmt.Errorf("fio output: %v (%d jobs)", err, len(parsed.Jobs))
	}
	return parsed.Jobs[0], nil
}

// measureSpace writes a file of non-zero data on both sides, rewrites it in place and then by replacing it,
// reading the writable layer's data file size after each step.
func measureSpace(cfg config, obdMnt, ovlMnt, rwDir, upper string, sp *space) error {
	n := int64(cfg.rewriteMiB) << 20
	sp.FileBytes, sp.Target = n, 1.5
	dataFile := filepath.Join(rwDir, snapshotter.WritableDataFile)
	settled := func() (int64, error) { return settle(obdMnt, dataFile) }
	var err error
	if sp.Empty, err = settled(); err != nil {
		return err
	}
	rng := rand.New(rand.NewPCG(1, 2))
	payload := make([]byte, n)
	for i := range payload {
		payload[i] = byte(rng.Uint32()) | 1
	}
	for _, mnt := range []string{obdMnt, ovlMnt} {
		path := filepath.Join(mnt, "rewritten.bin")
		if err := writeSynced(path, payload, 0); err != nil {
			return err
		}
		if mnt == obdMnt {
			if sp.FirstWrite, err = settled(); err != nil {
				return err
			}
		}
		for i := range cfg.rewrites {
			if err := writeSynced(path, payload, byte(i)); err != nil {
				return err
			}
			if mnt == obdMnt {
				n, err := settled()
				if err != nil {
					return err
				}
				sp.InPlace = append(sp.InPlace, n)
			}
		}
		for i := range cfg.rewrites {
			tmp := path + ".new"
			if err := writeSynced(tmp, payload, byte(100+i)); err != nil {
				return err
			}
			if err := os.Rename(tmp, path); err != nil {
				return err
			}
			if mnt == obdMnt {
				n, err := settled()
				if err != nil {
					return err
				}
				sp.Replaced = append(sp.Replaced, n)
			}
		}
	}
	sp.UpperBytes = allocated(filepath.Join(upper, "rewritten.bin"))
	for _, mnt := range []string{obdMnt, ovlMnt} {
		if err := os.Remove(filepath.Join(mnt, "rewritten.bin")); err != nil {
			return err
		}
	}
	sp.Index = allocated(filepath.Join(rwDir, snapshotter.WritableIndexFile))
	sp.LiveBytes = n + sp.Empty
	last := max(sp.InPlace[len(sp.InPlace)-1], sp.Replaced[len(sp.Replaced)-1])
	sp.Ratio = float64(last) / float64(sp.LiveBytes)
	sp.UpstreamLike = sp.Empty + n*int64(1+2*cfg.rewrites)
	sp.Explanation = "live bytes = the file plus the data file before it was written (journal, filesystem metadata); " +
		"ratio = the larger data file after the last rewrite (in place or by rename) over the live bytes. " +
		"append_only_bytes_estimate is what an append-only layer (upstream's default) would hold: every write kept."
	return nil
}

// writeSynced writes payload (its first byte set to tag, so every rewrite differs) to path and fsyncs it.
func writeSynced(path string, payload []byte, tag byte) error {
	payload[0] = tag | 1
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(payload); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// settle syncs the filesystem at mnt and returns the size of the data file once it stops changing: ext4 sends the
// discards of freed blocks when the transaction that freed them commits, after the sync that commits it returns.
func settle(mnt, dataFile string) (int64, error) {
	prev := int64(-1)
	for range 50 {
		if err := syncfs(mnt); err != nil {
			return 0, err
		}
		n := allocated(dataFile)
		if n == prev {
			return n, nil
		}
		prev = n
		time.Sleep(200 * time.Millisecond)
	}
	return prev, nil
}

func syncfs(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

// allocated is the space a file takes on disk.
func allocated(path string) int64 {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return 0
	}
	return st.Blocks * 512
}

func (r *report) print(w io.Writer) {
	fmt.Fprintf(w, "%s — %s, kernel %s, %d CPUs, load %.2f → %.2f\n\n", r.Command, r.Date, r.Kernel, r.CPUs, r.Load[0], r.Load[1])
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if len(r.Fio) > 0 {
		fmt.Fprintln(tw, "fio job\tobd dir\toverlayfs\tobd/overlayfs\ttarget")
		for _, name := range []string{"randwrite-4k", "seqwrite-1m"} {
			f, ok := r.Fio[name]
			if !ok {
				continue
			}
			fmt.Fprintf(tw, "%s, %s (median of %d)\t%.0f\t%.0f\t%.2f\t≥ %.1f %s\n", name, f.Unit, len(f.Runs[sideObd]), f.Medians[sideObd], f.Medians[sideOvl],
				f.Ratio, f.Target, met(f.Ratio >= f.Target))
		}
		fmt.Fprintln(tw)
	}
	sp := r.Space
	fmt.Fprintf(tw, "writable_data of a %s file rewritten %d times\tbytes\n", units.Bytes(sp.FileBytes), len(sp.InPlace))
	fmt.Fprintf(tw, "  before the file (journal, metadata)\t%s\n", units.Bytes(sp.Empty))
	fmt.Fprintf(tw, "  after the first write\t%s\n", units.Bytes(sp.FirstWrite))
	if len(sp.InPlace) > 0 {
		fmt.Fprintf(tw, "  after %d rewrites in place\t%s\n", len(sp.InPlace), units.Bytes(sp.InPlace[len(sp.InPlace)-1]))
		fmt.Fprintf(tw, "  after %d more by write + rename\t%s\n", len(sp.Replaced), units.Bytes(sp.Replaced[len(sp.Replaced)-1]))
	}
	fmt.Fprintf(tw, "  over live data (%s)\t%.2f× (target ≤ %.1f %s)\n", units.Bytes(sp.LiveBytes), sp.Ratio, sp.Target, met(sp.Ratio <= sp.Target))
	fmt.Fprintf(tw, "  an append-only layer would hold\t%s\n", units.Bytes(sp.UpstreamLike))
	fmt.Fprintf(tw, "  overlayfs upper file\t%s\n", units.Bytes(sp.UpperBytes))
	tw.Flush()
}

func met(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}
