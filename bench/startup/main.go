// Command startup is obd's headline benchmark: how long a container from a real ≥300 MB image (python3 + numpy +
// scipy from Debian packages) takes until its app prints "ready", pulled over a shaped link (default 100 Mbit/s
// and 20 ms RTT) from a private registry — containerd's overlayfs (full pull and unpack) against obd (lazy pull
// of the overlaybd image), cold and warm — and how many bytes each case fetched.
//
//	go run ./bench/startup [--bandwidth 100mbit] [--rtt 20ms] [--runs 3]   # as root
//
// It prints a table and writes bench/results/startup.json and startup.svg. See bench/README.md and
// docs/benchmarks.md for the method.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/obdproject/obd/internal/sandbox"
	"github.com/obdproject/obd/internal/testimage"
	"github.com/obdproject/obd/zfile"
)

type config struct {
	bandwidth        string
	rateBits         int64
	rtt              time.Duration
	cc               string
	runs             int
	fetchKB, blockKB int
	fsType           string // of the overlaybd image
	obdTOML          string // more obd.toml for every case
	out              string
	work             string
	rebuild          bool
	snapshotter      string
	// snapshotterGiven: --snapshotter named a binary (else it was built from the tree)
	snapshotterGiven bool
	name             string
	pigz             bool
	cases            map[string]bool
	workload         *workload
	zfile            zfile.Options // Algorithm and BlockSize of the converted layers
	logs             string
	args             []string
}

func main() {
	if spec := os.Getenv(delayLineEnv); spec != "" {
		os.Exit(runDelayLine(spec))
	}
	var c config
	flag.StringVar(&c.bandwidth, "bandwidth", "100mbit", "bandwidth of the shaped link to the registry (e.g. 100mbit, 1gbit; 0 for unshaped)")
	flag.DurationVar(&c.rtt, "rtt", 20*time.Millisecond, "round-trip time of the shaped link (each forwarded packet is held for half of it; 0: no delay)")
	flag.StringVar(&c.cc, "cc", "cubic", "TCP congestion control of the registry side, the sender of every download (cubic, bbr, reno: net.ipv4.tcp_available_congestion_control)")
	flag.IntVar(&c.runs, "runs", 3, "measured runs of each case; the table shows medians")
	flag.IntVar(&c.blockKB, "block-kb", 0, "obd-snapshotter's cache block size in KiB ([cache] block_size_kb; 0: its default)")
	flag.StringVar(&c.obdTOML, "obd-toml", "", "more obd.toml for obd-snapshotter in every case: tables other than [snapshotter], [cache] and [registry], e.g. '[prefetch]\\nconcurrency = 4'")
	flag.IntVar(&c.fetchKB, "fetch-kb", 0, "the least a cache miss of obd-snapshotter fetches, in KiB ([cache] fetch_kb; 0: its default)")
	flag.StringVar(&c.out, "out", filepath.Join("bench", "results"), "directory for the result files NAME.json and NAME.svg ('' for none)")
	flag.StringVar(&c.work, "work", filepath.Join(os.TempDir(), "obd-bench-startup"), "cache of the built and converted image")
	flag.BoolVar(&c.rebuild, "rebuild", false, "build and convert the image again even if the cache has it")
	flag.StringVar(&c.snapshotter, "snapshotter", "", "obd-snapshotter binary (default: build ./cmd/obd-snapshotter of this module)")
	flag.StringVar(&c.name, "name", "", "base name of the result files in --out (NAME.json, NAME.svg; default startup, with .WORKLOAD for a workload other than python and .BANDWIDTH for a bandwidth other than 100mbit)")
	flag.BoolVar(&c.pigz, "pigz", false, "give the sandbox's containerd pigz (from the Debian package, on its PATH only) to unpack gzip layers with unpigz")
	flag.StringVar(&c.logs, "logs", "", "copy the registry's, containerd's and obd-snapshotter's logs into this directory at the end")
	flag.StringVar(&c.fsType, "fstype", "ext4", "filesystem of the overlaybd image: ext4 (obd convert's default) or erofs")
	algo := flag.String("zfile", "zstd", "compression of the overlaybd layer blobs: zstd (obd convert's default) or lz4 (upstream's)")
	zfileBlockKB := flag.Int("zfile-block-kb", 64, "ZFile block size of the overlaybd layer blobs in KiB: 4 (upstream's default), 8, 16, 32 or 64 (obd convert's)")
	casesFlag := flag.String("cases", strings.Join(caseKeys(), ","), "cases to measure, comma-separated (a warm case needs its cold case)")
	workloadFlag := flag.String("workload", "python", "what the container runs until it prints ready: python (import numpy, scipy), scipy (numpy and eight scipy subpackages), gcc (g++ -O2 -c of a C++ file) or walk (du -s /usr: a metadata walk)")
	replotFile := flag.String("replot", "", "only recompute the derived figures of a result file (e.g. bench/results/startup.json), rewrite it and its SVG chart, and exit")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: go run ./bench/startup [flags]   (as root)\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if c.obdTOML != "" {
		c.obdTOML = strings.ReplaceAll(c.obdTOML, `\n`, "\n") + "\n"
	}
	if *replotFile != "" {
		if err := replot(*replotFile); err != nil {
			fmt.Fprintln(os.Stderr, "startup:", err)
			os.Exit(1)
		}
		return
	}
	c.args = os.Args[1:]
	c.snapshotterGiven = c.snapshotter != ""
	var err error
	if c.rateBits, err = parseRate(c.bandwidth); err != nil {
		fmt.Fprintln(os.Stderr, "startup:", err)
		os.Exit(2)
	}
	if c.zfile.Algorithm, err = zfile.ParseAlgorithm(*algo); err != nil {
		fmt.Fprintln(os.Stderr, "startup: --zfile:", err)
		os.Exit(2)
	}
	switch *zfileBlockKB {
	case 4, 8, 16, 32, 64:
		c.zfile.BlockSize = *zfileBlockKB << 10
	default:
		fmt.Fprintf(os.Stderr, "startup: --zfile-block-kb %d: want 4, 8, 16, 32 or 64\n", *zfileBlockKB)
		os.Exit(2)
	}
	if c.workload, err = findWorkload(*workloadFlag); err != nil {
		fmt.Fprintln(os.Stderr, "startup:", err)
		os.Exit(2)
	}
	if c.name == "" {
		c.name = "startup"
		if c.workload.name != "python" {
			c.name += "." + c.workload.name
		}
		if c.bandwidth != "100mbit" {
			c.name += "." + c.bandwidth
		}
	}
	if c.cases, err = parseCases(*casesFlag); err != nil {
		fmt.Fprintln(os.Stderr, "startup:", err)
		os.Exit(2)
	}
	if c.runs < 1 || c.rtt < 0 {
		fmt.Fprintln(os.Stderr, "startup: --runs must be at least 1 and --rtt not negative")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // a second Ctrl-C kills at once; the first one cleans up
	}()
	if err := runBench(ctx, &c); err != nil {
		fmt.Fprintln(os.Stderr, "startup:", err)
		os.Exit(1)
	}
}

func parseCases(s string) (map[string]bool, error) {
	m := map[string]bool{}
	for _, k := range strings.Split(s, ",") {
		k = strings.TrimSpace(k)
		if findCase(k) == nil {
			return nil, fmt.Errorf("--cases: unknown case %q (cases: %s)", k, strings.Join(caseKeys(), ", "))
		}
		m[k] = true
	}
	for _, c := range cases {
		if m[c.key] && c.after != "" && !m[c.after] {
			return nil, fmt.Errorf("--cases: %s needs %s (it runs on the state the cold case left)", c.key, c.after)
		}
	}
	return m, nil
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// required lists the programs the benchmark runs: the sandbox's, iproute2's, iptables' and apt's.
var required = append([]string{"ip", "tc", "iptables-legacy", "apt-get", "dpkg-deb"}, sandbox.Required...)

func checkPrerequisites() error {
	if os.Geteuid() != 0 {
		return errors.New("the benchmark creates network namespaces, mounts filesystems and runs containers: run it as root")
	}
	var missing []string
	for _, t := range required {
		if _, err := exec.LookPath(t); err != nil {
			missing = append(missing, t)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing programs: %s — run 'make deps' (Debian packages; iproute2 for ip and tc) and 'apt-get install iptables' (iptables-legacy)", strings.Join(missing, ", "))
	}
	if _, err := os.Stat("/proc/sys/vm/drop_caches"); err != nil {
		return fmt.Errorf("cannot drop the page cache: %w", err)
	}
	return nil
}

// providePigz extracts Debian's pigz package into dir and puts its binaries (pigz, unpigz: containerd looks for
// unpigz) first on this process's PATH, which the sandbox's containerd inherits.
func providePigz(ctx context.Context, dir string) error {
	debs, err := testimage.Fetch(ctx, []string{"pigz"}, testimage.DefaultCacheDir(), logf)
	if err != nil {
		return err
	}
	root := filepath.Join(dir, "pigz")
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0].Path, root).CombinedOutput(); err != nil {
		return fmt.Errorf("dpkg-deb -x %s: %v: %s", debs[0].Path, err, out)
	}
	bin := filepath.Join(root, "usr", "bin")
	if _, err := os.Stat(filepath.Join(bin, "unpigz")); err != nil {
		return fmt.Errorf("the pigz package has no unpigz: %w", err)
	}
	return os.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
}

// gitState names the commit of the working tree, with "+dirty" when it has changes.
func gitState(ctx context.Context) string {
	rev, err := exec.CommandContext(ctx, "git", "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return ""
	}
	s := strings.TrimSpace(string(rev))
	if out, err := exec.CommandContext(ctx, "git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(out) > 0 {
		s += "+dirty"
	}
	return s
}

// buildSnapshotter builds obd-snapshotter from the module the benchmark runs in.
func buildSnapshotter(ctx context.Context, dir string) (string, error) {
	out := filepath.Join(dir, "obd-snapshotter")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "github.com/obdproject/obd/cmd/obd-snapshotter")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build obd-snapshotter: %v\n%s", err, b)
	}
	return out, nil
}
