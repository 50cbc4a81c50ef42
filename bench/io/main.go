// Command io measures the read path of a lazily mounted obd image against a plain loop device over the same ext4.
//
// It builds a one-layer image with a big file of realistic data (about 2× compressible), converts it with
// internal/convert, serves the blobs from an in-process registry on 127.0.0.1 and mounts the image with
// internal/mounter (FUSE + loop frontend, block cache in a temp dir) — the node daemon's code path. The baseline is
// the same disk exported with image.ExportRaw to a sparse file on a plain read-only loop device. It then measures
// sequential and random O_DIRECT reads of the big file on both (page cache dropped before each run), the latency
// of mounter.Mount with a warm and a cold cache, and the memory an attached image costs; it prints a table, writes
// JSON and CPU profiles of the obd read path. Needs root, /dev/fuse and loop devices.
//
//	go run ./bench/io [flags]        # see bench/README.md
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// config are the command-line flags.
type config struct {
	fileMiB, vsizeGiB, smallFiles int
	runs, seqRuns                 int
	randTime                      time.Duration
	depth                         int
	attachRuns, coldRuns, images  int
	workDir, imageDir, out        string
	profile, plainDIO             bool
	only                          string
	verbose                       bool
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == workerArg {
		if err := workerMain(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "io worker:", err)
			os.Exit(1)
		}
		return
	}
	// Sample the heap finely enough to see per-image allocations (the default is one sample per 512 KiB).
	runtime.MemProfileRate = 16 << 10
	var cfg config
	flag.IntVar(&cfg.fileMiB, "file-mib", 512, "size of the big file in MiB")
	flag.IntVar(&cfg.vsizeGiB, "vsize-gib", 4, "virtual size of the image's disk in GiB")
	flag.IntVar(&cfg.smallFiles, "small-files", 200, "number of small text files next to the big file")
	flag.IntVar(&cfg.runs, "runs", 5, "random-read runs per side (the median is reported; at least 3)")
	flag.IntVar(&cfg.seqRuns, "seq-runs", 9, "sequential-read runs per side (short, so more of them; at least 3)")
	flag.DurationVar(&cfg.randTime, "rand-time", 5*time.Second, "duration of one random-read run")
	flag.IntVar(&cfg.depth, "depth", 32, "concurrent readers in the random-read runs")
	flag.IntVar(&cfg.attachRuns, "attach-runs", 10, "Mount+Unmount cycles with a warm cache")
	flag.IntVar(&cfg.coldRuns, "cold-runs", 5, "Mount+Unmount cycles with an empty cache")
	flag.IntVar(&cfg.images, "images", 8, "images attached at once for the memory measurement")
	flag.StringVar(&cfg.workDir, "work", "", "directory for the temporary files (default $TMPDIR); needs ~5× the file size")
	flag.StringVar(&cfg.imageDir, "image-dir", "", "keep the built and converted image here and reuse it on the next run (default: a temp dir)")
	flag.StringVar(&cfg.out, "out", "bench/results/io.json", "JSON results; the table goes next to it (.txt), and the profiles (.seq.pprof, .rand.pprof, .mem.pprof)")
	flag.BoolVar(&cfg.plainDIO, "plain-dio", true, "also measure the raw file on a loop device with direct I/O (the baseline is buffered, like mount -o loop)")
	flag.BoolVar(&cfg.profile, "profile", true, "profile the obd process during one extra sequential and one extra random run")
	flag.StringVar(&cfg.only, "only", "seq,rand,attach,mem", "measurements to run (comma-separated subset of seq,rand,attach,mem)")
	flag.BoolVar(&cfg.verbose, "v", false, "log what the mounter, device and cache do")
	summarize := flag.String("summarize", "", "only print the read-path summary of a CPU profile written by an earlier run, and exit")
	flag.Parse()
	if *summarize != "" {
		r := &report{Profiles: []profileSummary{summarizeProfile(*summarize, 0)}}
		r.printProfiles(os.Stdout)
		return
	}
	if cfg.runs < 3 || cfg.seqRuns < 3 {
		fmt.Fprintln(os.Stderr, "io: -runs and -seq-runs must be at least 3")
		os.Exit(2)
	}

	// The first Ctrl-C (SIGINT, SIGTERM, SIGHUP) stops the measurements; the cleanup always runs, and further
	// signals are only logged so that it can finish.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	signal.Ignore(syscall.SIGPIPE) // a closed stdout or stderr (| head) must not kill the run before its cleanup
	go func() {
		for s := range sigs {
			logf("%v: stopping; cleaning up mounts, loop devices and temp files", s)
			cancel()
		}
	}()
	var cl cleanups
	rep, err := run(ctx, cfg, &cl)
	if cerr := cl.run(); cerr != nil {
		logf("cleanup: %v", cerr)
		if err == nil {
			err = cerr
		}
	}
	if rep != nil {
		out := cfg.out
		if !rep.Complete {
			// Keep the last complete results; a partial run goes next to them.
			out = strings.TrimSuffix(out, filepath.Ext(out)) + ".incomplete" + filepath.Ext(out)
		}
		if werr := rep.write(out); werr != nil {
			logf("%v", werr)
			if err == nil {
				err = werr
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "io:", err)
		os.Exit(1)
	}
}

var logStart = time.Now()

// logf prints a progress line to stderr.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(logStart).Seconds(), fmt.Sprintf(format, args...))
}

// cleanups runs registered undo steps in reverse order, once, even after a failure or an interrupt.
type cleanups struct {
	mu  sync.Mutex
	fns []cleanup
}

type cleanup struct {
	what string
	fn   func() error
}

func (c *cleanups) add(what string, fn func() error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.fns = append(c.fns, cleanup{what, fn})
}

func (c *cleanups) run() error {
	c.mu.Lock()
	fns := c.fns
	c.fns = nil
	c.mu.Unlock()
	var errs []error
	for i := len(fns) - 1; i >= 0; i-- {
		if err := fns[i].fn(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", fns[i].what, err))
		}
	}
	return errors.Join(errs...)
}

// preflight checks what the benchmark needs.
func preflight() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (FUSE, loop devices, mount, drop_caches): run it with sudo or as root")
	}
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("%s is missing: this host cannot attach obd devices", p)
		}
	}
	return dropCaches()
}

// dropCaches writes dirty pages back and drops the page cache, dentries and inodes. A child process does it, so
// that the kernel time it takes does not show in this process's CPU profiles.
func dropCaches() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if out, err := exec.Command(self, workerArg, "drop").CombinedOutput(); err != nil {
		return fmt.Errorf("drop page cache: %v: %s", err, out)
	}
	return nil
}

// quietLogger logs warnings and errors of the obd packages, or everything with -v.
func quietLogger(verbose bool) *slog.Logger {
	level := slog.LevelWarn
	if verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

// write writes the JSON report to path and the table to path with .txt instead of .json.
func (r *report) write(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return err
	}
	txt := strings.TrimSuffix(path, filepath.Ext(path)) + ".txt"
	var sb strings.Builder
	r.print(&sb)
	if err := os.WriteFile(txt, []byte(sb.String()), 0o644); err != nil {
		return err
	}
	r.print(os.Stdout)
	logf("wrote %s and %s", path, txt)
	return nil
}
