package device

// The benchmarks compare a FuseLoop device with plain loop devices over the same file, reading the block devices
// with O_DIRECT so that no page cache above the device plays. "plain" (losetup's default) and FuseLoop, whose
// backend is the *os.File read with pread, both read the file through its warm page cache: their ratio is the
// cost of the frontend. "plain-dio" reads the file with direct I/O, from the disk, for reference.
//
//	go test -run='^$' -bench=. -benchtime=2s ./internal/device/

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const benchDiskSize = 256 << 20

// benchDevices returns the device nodes of a plain loop device and a FuseLoop device over one 256 MiB file of
// random data; both are removed when the benchmark ends.
func benchDevices(b *testing.B) map[string]string {
	needSystem(b)
	dir := b.TempDir()
	path := filepath.Join(dir, "disk.img")
	data := make([]byte, benchDiskSize)
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < len(data); i += 8 {
		v := r.Uint64()
		for j := range 8 {
			data[i+j] = byte(v >> (8 * j))
		}
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		b.Fatal(err)
	}

	devs := map[string]string{}
	for name, flags := range map[string]uint32{"plain": 0, "plain-dio": unix.LO_FLAGS_DIRECT_IO} {
		idx := plainLoop(b, path, flags)
		devs[name] = loopPath(idx)
	}
	f := NewFuseLoop(nil)
	dev := attach(b, f, uniqueID(b, 0), openFileBackend(b, path), AttachOptions{ReadOnly: true, StateDir: b.TempDir()})
	devs["fuseloop"] = dev.Path
	return devs
}

// plainLoop sets up a read-only loop device on path with the extra loop flags, removed when the benchmark ends.
func plainLoop(b *testing.B, path string, flags uint32) int {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	cfg := unix.LoopConfig{Fd: uint32(fd), Size: loopSectorSize}
	cfg.Info.Flags = unix.LO_FLAGS_READ_ONLY | flags
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(ctl)
	for {
		idx, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err == nil {
			err = loopConfigure(idx, &cfg)
		}
		if err == unix.EBUSY {
			continue
		}
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			if err := loopClear(context.Background(), idx, 5*time.Second); err != nil {
				b.Error(err)
			}
		})
		return idx
	}
}

// BenchmarkSequentialRead reads the device in 1 MiB O_DIRECT reads, one at a time.
func BenchmarkSequentialRead(b *testing.B) {
	devs := benchDevices(b)
	for _, name := range []string{"plain", "plain-dio", "fuseloop"} {
		b.Run(name, func(b *testing.B) {
			fd, err := unix.Open(devs[name], unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer unix.Close(fd)
			buf := alignedBuffer(1 << 20)
			b.SetBytes(int64(len(buf)))
			var off int64
			for b.Loop() {
				if _, err := unix.Pread(fd, buf, off); err != nil {
					b.Fatal(err)
				}
				off = (off + int64(len(buf))) % benchDiskSize
			}
		})
	}
}

// BenchmarkRandomRead4K reads 4 KiB blocks at random offsets with O_DIRECT, 32 reads in flight.
func BenchmarkRandomRead4K(b *testing.B) {
	const depth = 32
	devs := benchDevices(b)
	for _, name := range []string{"plain", "plain-dio", "fuseloop"} {
		b.Run(name, func(b *testing.B) {
			fd, err := unix.Open(devs[name], unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer unix.Close(fd)
			b.SetBytes(4096)
			var left atomic.Int64
			left.Store(int64(b.N))
			var wg sync.WaitGroup
			b.ResetTimer()
			start := time.Now()
			for w := range depth {
				wg.Go(func() {
					r := rand.New(rand.NewPCG(uint64(w), 3))
					buf := alignedBuffer(4096)
					for left.Add(-1) >= 0 {
						if _, err := unix.Pread(fd, buf, int64(r.IntN(benchDiskSize/4096))*4096); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "IOPS")
		})
	}
}

// BenchmarkAttachMount measures Attach plus an ext4 mount of a small image (ns/op), and reports the Go heap and
// goroutines that an idle attached device holds after it has served some reads.
func BenchmarkAttachMount(b *testing.B) {
	mkfs := needSystem(b)
	img := loadImage(b, makeImage(b, mkfs, testFiles(5), 64))
	state := b.TempDir()
	f := NewFuseLoop(nil)
	ctx := context.Background()

	b.Run("memory", func(b *testing.B) {
		const n = 16
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		goroutines := runtime.NumGoroutine()
		for b.Loop() {
			ids := make([]string, n)
			for i := range n {
				ids[i] = uniqueID(b, i)
				dev, err := f.Attach(ctx, ids[i], img, AttachOptions{ReadOnly: true, StateDir: state})
				if err != nil {
					b.Fatal(err)
				}
				if err := readSome(dev.Path); err != nil {
					b.Fatal(err)
				}
			}
			runtime.GC()
			runtime.GC() // the second one empties the sync.Pools that hold request buffers
			runtime.ReadMemStats(&after)
			b.ReportMetric(float64(int64(after.HeapInuse)-int64(before.HeapInuse))/n, "heap-B/device")
			b.ReportMetric(float64(runtime.NumGoroutine()-goroutines)/n, "goroutines/device")
			for _, id := range ids {
				if err := f.Detach(ctx, id); err != nil {
					b.Fatal(err)
				}
			}
		}
	})

	b.Run("latency", func(b *testing.B) {
		target := filepath.Join(b.TempDir(), "mnt")
		if err := os.Mkdir(target, 0o755); err != nil {
			b.Fatal(err)
		}
		var detach time.Duration
		i := 0
		for b.Loop() {
			id := uniqueID(b, i)
			i++
			dev, err := f.Attach(ctx, id, img, AttachOptions{ReadOnly: true, StateDir: state})
			if err != nil {
				b.Fatal(err)
			}
			if err := dev.Mount(ctx, target, "ext4", []string{"ro"}); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			start := time.Now()
			if err := f.Detach(ctx, id); err != nil {
				b.Fatal(err)
			}
			detach += time.Since(start)
			b.StartTimer()
		}
		b.ReportMetric(float64(detach.Milliseconds())/float64(b.N), "detach-ms/op")
	})
}

// readSome reads 1 MiB and 32 random 4 KiB blocks of the device in parallel, with O_DIRECT.
func readSome(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if _, err := unix.Pread(fd, alignedBuffer(1<<20), 0); err != nil {
		return err
	}
	errs := make(chan error, 32)
	for i := range 32 {
		go func() {
			_, err := unix.Pread(fd, alignedBuffer(4096), int64(i)*1<<20)
			errs <- err
		}()
	}
	for range 32 {
		if e := <-errs; e != nil {
			err = fmt.Errorf("read %s: %w", path, e)
		}
	}
	return err
}
