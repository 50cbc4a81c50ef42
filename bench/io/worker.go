package main

// The load generator runs in a child process (this binary with workerArg first), so that the process measured —
// the one serving FUSE, whose CPU profile and memory are reported — does not also run the readers, and its Go
// scheduler is not shared with 32 goroutines blocked in pread.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"sync"
	"time"

	"github.com/obdproject/obd/bench/internal/measure"
	"golang.org/x/sys/unix"
)

const workerArg = "__io_worker"

// workerResult is what a worker prints.
type workerResult struct {
	Direct  bool    `json:"direct"` // O_DIRECT was used
	Bytes   int64   `json:"bytes"`
	Ops     int64   `json:"ops"`
	Seconds float64 `json:"seconds"`
	SHA256  string  `json:"sha256,omitempty"`
	P50us   float64 `json:"p50_us,omitempty"`
	P99us   float64 `json:"p99_us,omitempty"`
	Load1   float64 `json:"-"` // the 1-minute load average when the run started (set by the parent)
}

// workerMain is the child process: seq FILE reads the file once in order, rand FILE reads random blocks from
// several threads for a while; it prints a workerResult as JSON. drop drops the page cache.
func workerMain(args []string) error {
	if len(args) == 1 && args[0] == "drop" {
		return measure.DropCaches()
	}
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	bs := fs.Int("bs", 1<<20, "read size")
	depth := fs.Int("depth", 32, "concurrent readers (rand)")
	dur := fs.Duration("duration", 5*time.Second, "how long to read (rand)")
	hash := fs.Bool("hash", false, "compute the SHA-256 of what is read (seq)")
	direct := fs.Bool("direct", true, "use O_DIRECT when the file system allows it")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 2 {
		return errors.New("usage: worker seq|rand FILE")
	}
	fd, dio, err := openRead(fs.Arg(1), *direct)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var res workerResult
	switch fs.Arg(0) {
	case "seq":
		res, err = readSequential(fd, *bs, *hash)
	case "rand":
		res, err = readRandom(fd, *bs, *depth, *dur)
	default:
		err = fmt.Errorf("unknown worker %q", fs.Arg(0))
	}
	if err != nil {
		return err
	}
	res.Direct = dio
	return json.NewEncoder(os.Stdout).Encode(res)
}

// openRead opens path for reading, with O_DIRECT if direct and the file system supports it (probed with one
// aligned read).
func openRead(path string, direct bool) (fd int, dio bool, err error) {
	if direct {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
		if err == nil {
			buf := alignedBuffer(4096)
			if _, err = unix.Pread(fd, buf, 0); err == nil {
				return fd, true, nil
			}
			unix.Close(fd)
		}
		if !errors.Is(err, unix.EINVAL) {
			return -1, false, &os.PathError{Op: "open O_DIRECT", Path: path, Err: err}
		}
	}
	fd, err = unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, false, &os.PathError{Op: "open", Path: path, Err: err}
	}
	return fd, false, nil
}

// alignedBuffer returns n bytes of anonymous memory, page-aligned for O_DIRECT.
func alignedBuffer(n int) []byte {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		panic(err)
	}
	return b
}

func fileSize(fd int) (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, err
	}
	return st.Size, nil
}

func readSequential(fd, bs int, hash bool) (workerResult, error) {
	size, err := fileSize(fd)
	if err != nil {
		return workerResult{}, err
	}
	buf := alignedBuffer(bs)
	h := sha256.New()
	start := time.Now()
	var off int64
	var ops int64
	for off < size {
		n, err := unix.Pread(fd, buf, off)
		if err != nil {
			return workerResult{}, fmt.Errorf("read at %d: %w", off, err)
		}
		if n == 0 {
			return workerResult{}, fmt.Errorf("read at %d: unexpected end of file (size %d)", off, size)
		}
		if hash {
			h.Write(buf[:n])
		}
		off += int64(n)
		ops++
	}
	res := workerResult{Bytes: off, Ops: ops, Seconds: time.Since(start).Seconds()}
	if hash {
		res.SHA256 = hex.EncodeToString(h.Sum(nil))
	}
	return res, nil
}

func readRandom(fd, bs, depth int, dur time.Duration) (workerResult, error) {
	size, err := fileSize(fd)
	if err != nil {
		return workerResult{}, err
	}
	blocks := size / int64(bs)
	if blocks == 0 {
		return workerResult{}, fmt.Errorf("file of %d bytes is smaller than one %d-byte read", size, bs)
	}
	var wg sync.WaitGroup
	lats := make([][]time.Duration, depth)
	errs := make([]error, depth)
	start := time.Now()
	deadline := start.Add(dur)
	for w := range depth {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 0x4a4d))
			buf := alignedBuffer(bs)
			l := make([]time.Duration, 0, 1<<16)
			for {
				t := time.Now()
				if t.After(deadline) {
					break
				}
				if _, err := unix.Pread(fd, buf, r.Int64N(blocks)*int64(bs)); err != nil {
					errs[w] = err
					break
				}
				l = append(l, time.Since(t))
			}
			lats[w] = l
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return workerResult{}, err
	}
	all := slices.Concat(lats...)
	slices.Sort(all)
	res := workerResult{Ops: int64(len(all)), Bytes: int64(len(all)) * int64(bs), Seconds: elapsed.Seconds()}
	if len(all) > 0 {
		res.P50us = float64(all[len(all)/2].Microseconds())
		res.P99us = float64(all[len(all)*99/100].Microseconds())
	}
	return res, nil
}

// runWorker runs a worker child process and returns its result.
func runWorker(ctx context.Context, args ...string) (workerResult, error) {
	self, err := os.Executable()
	if err != nil {
		return workerResult{}, err
	}
	cmd := exec.CommandContext(ctx, self, append([]string{workerArg}, args...)...)
	cmd.Stderr = os.Stderr
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.Output()
	if err != nil {
		return workerResult{}, fmt.Errorf("worker %v: %w", args, err)
	}
	var res workerResult
	if err := json.Unmarshal(out, &res); err != nil {
		return workerResult{}, fmt.Errorf("worker %v: bad output %q: %w", args, out, err)
	}
	return res, nil
}
