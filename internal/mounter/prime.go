package mounter

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/fsmeta"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/trace"
)

// A start whose blocks are all decoded ahead still waits for the device: each page the container faults in is a
// read of the loop device, served through FUSE by the daemon, one after another (a warm python start: 564 reads).
// So when a start begins, the daemon also reads what the start is known to read into the kernel's page cache, while
// runc creates the container: the ranges of the disk that hold the start's layer reads (lsmt.Stack.Shows), in the
// order they were first read. File data is read through the file that holds it (an ext4 file's pages are cached
// under its inode: fsmeta.Layout.Files finds it, and a file handle opens it, so no path is needed), the rest
// (inodes, directories, extent trees) through the block device, whose page cache ext4 reads its metadata from.
// The reads are posix_fadvise(WILLNEED): the kernel issues them at once, in parallel, and the container's faults
// find the pages or wait for the read already under way.
//
// Only ranges whose blocks are local are read (as for the decoding ahead): a cold start is the prefetch's business.
// At most Options.PredecodeBytes are read. A start primed so is learned as what it read and what was primed: the
// page cache hides the container's own reads.

// primedTotal counts the bytes primed by every Mounter of the process.
var primedTotal struct{ files, meta atomic.Int64 }

// PrimedTotals returns the bytes of file data and of filesystem metadata that the process primed.
func PrimedTotals() (files, metadata int64) { return primedTotal.files.Load(), primedTotal.meta.Load() }

// priming is the priming of the page cache with a start of an image.
type priming struct {
	cancel context.CancelFunc
	done   chan struct{}

	files, stale, fileBytes, metaBytes atomic.Int64
	err                                atomic.Pointer[string]
}

func (p *priming) info() *PrimeInfo {
	info := &PrimeInfo{Files: p.files.Load(), FileBytes: p.fileBytes.Load(), MetadataBytes: p.metaBytes.Load(), Running: true}
	select {
	case <-p.done:
		info.Running = false
	default:
	}
	if e := p.err.Load(); e != nil {
		info.Error = *e
	}
	return info
}

func (p *priming) fail(err error) {
	s := err.Error()
	p.err.Store(&s)
}

// stop stops the priming and waits for it: it holds files of the image's filesystem open.
func (p *priming) stop() {
	p.cancel()
	<-p.done
}

// primePlan is what a start primes: device ranges in the order they were first read, and the file extents of
// the filesystem that lie in them.
type primePlan struct {
	ranges []fsmeta.Extent
	recs   []int               // for each range, the index of the first record that reads it
	files  []fsmeta.FileExtent // sorted by offset
}

// startPriming primes the page cache with the device ranges of recs (see above) in the background. The decoding
// ahead pre (nil for none) decodes the start's blocks: the plan is made once it has loaded the blocks kept on
// disk, and each range is read once the blocks of the record it comes from are decoded, so that every block is
// decoded once, there. It returns nil when the image cannot be primed: not ext4, writable, or mounted nowhere by
// the daemon. planOnly (an attach, which decodes the start ahead of its first container) only plans: the files
// the start reads are found then, not while the first container is being created. The caller holds the image's
// lock.
func (m *Mounter) startPriming(id string, img *mounted, recs []trace.Record, pre *predecoding, planOnly bool) *priming {
	if img.stack == nil || img.fs.name != "ext4" || img.upper != nil || (len(img.targets) == 0 && !planOnly) || len(recs) == 0 ||
		!m.opts.PrimePageCache || m.opts.PredecodeBytes <= 0 {
		return nil
	}
	var target string // the goroutine runs without the image's lock
	if !planOnly {
		target = slices.Sorted(maps.Keys(img.targets))[0]
	}
	dev := img.dev.Path
	ctx, cancel := context.WithTimeout(context.Background(), LearnWindow)
	p := &priming{cancel: cancel, done: make(chan struct{})}
	log := m.opts.Logger.With("image", id)
	disk := diskAhead{caches: img.caches(), opened: img.opened, recs: recs}
	go func() {
		defer close(p.done)
		defer cancel()
		start := time.Now()
		plan := planRanges(img.stack, &disk, m.opts.PredecodeBytes)
		if len(plan.ranges) == 0 {
			return
		}
		if planOnly {
			if err := img.planOnly(ctx, pre, dev, plan.ranges, m.opts.PredecodeBytes); err != nil && ctx.Err() == nil {
				log.Info("cannot plan the priming of the page cache with the image's start", "err", err)
			} else if err == nil {
				log.Debug("planned the priming of the page cache with the image's start", "took", time.Since(start).Round(time.Millisecond))
			}
			return
		}
		fs, err := openPrimed(target, dev)
		if err != nil {
			p.fail(err)
			log.Warn("cannot prime the page cache with the image's start", "err", err)
			return
		}
		defer fs.close()
		if plan.files, err = img.planFiles(ctx, pre, fs.bdev, plan.ranges, m.opts.PredecodeBytes); err != nil {
			if ctx.Err() == nil {
				p.fail(err)
				log.Warn("cannot prime the page cache with the image's start", "err", err)
			}
			return
		}
		planned := time.Since(start)
		ready := func(i int) bool { return pre == nil || pre.decoded(ctx, i) }
		if err := fs.prime(ctx, plan, ready, p); err != nil {
			p.fail(err)
			log.Warn("priming the page cache with the image's start failed", "err", err, "file_bytes", p.fileBytes.Load(), "metadata_bytes", p.metaBytes.Load())
			return
		}
		log.Info("primed the page cache with the image's start", "files", p.files.Load(), "file_bytes", p.fileBytes.Load(),
			"metadata_bytes", p.metaBytes.Load(), "stale_files", p.stale.Load(), "planned", planned.Round(time.Millisecond),
			"took", time.Since(start).Round(time.Millisecond))
	}()
	return p
}

// planRanges plans the priming of the local ranges of disk's records on stack: at most max bytes, in whole pages.
func planRanges(stack *lsmt.Stack, disk *diskAhead, max int64) *primePlan {
	const page = 4096
	seen := map[int64]bool{}
	plan := &primePlan{}
	var total int64
	for i, rec := range disk.recs {
		if _, _, ok := disk.local(i); !ok || total >= max {
			continue
		}
		stack.Shows(int(rec.Layer), rec.Offset, int64(rec.Count), func(at, n int64) {
			for pg := at / page * page; pg < at+n && total < max; pg += page {
				if seen[pg] {
					continue
				}
				seen[pg] = true
				total += page
				if k := len(plan.ranges) - 1; k >= 0 && plan.ranges[k].End() == pg && plan.recs[k] == i {
					plan.ranges[k].Len += page
				} else {
					plan.ranges = append(plan.ranges, fsmeta.Extent{Off: pg, Len: page})
					plan.recs = append(plan.recs, i)
				}
			}
		})
	}
	return plan
}

// planFiles returns the file extents that lie in ranges: those the image's last plan found when it covers ranges,
// else those the inode tables within ranges, or local (at most maxTables bytes of them), name
// (fsmeta.Layout.Files). The tables are read through the block device bdev, into its page cache, where the
// filesystem reads them too: once the decoding ahead pre has loaded the blocks kept on disk, which hold most of
// them (a start larger than the decoding's pool is decoded for seconds: the plan does not wait for it to end). One
// plan is made at a time: a start waits for the plan its attach is making.
func (img *mounted) planFiles(ctx context.Context, pre *predecoding, bdev *os.File, ranges []fsmeta.Extent, maxTables int64) ([]fsmeta.FileExtent, error) {
	want := fsmeta.Merge(slices.Clone(ranges))
	img.primeMu.Lock()
	defer img.primeMu.Unlock()
	if last := img.primed; last != nil && covers(last.want, want) {
		return last.files, nil
	}
	if pre != nil {
		select {
		case <-pre.loaded:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	r := ctxReader{ctx, bdev}
	layout, err := fsmeta.ReadLayout(r, img.stack.VirtualSize())
	if err != nil {
		return nil, err
	}
	// The inode tables the kernel read at mount, before any start was recorded, are in no record: their local
	// parts stand in for them.
	meta := fsmeta.Merge(append(slices.Clone(want), img.localParts(layout.Tables(), maxTables)...))
	files, err := layout.Files(r, want, meta)
	if err != nil {
		return nil, err
	}
	img.primed = &primedFiles{want: want, files: files}
	return files, nil
}

// localParts returns the parts of the disk extents es whose bytes are local, at most max bytes, first ones
// first: cached, or in a layer without a cache. Reading them costs decoding, never a fetch. Holes are left out.
func (img *mounted) localParts(es []fsmeta.Extent, max int64) []fsmeta.Extent {
	var out []fsmeta.Extent
	caches := img.caches()
	for _, e := range es {
		img.stack.Locate(e.Off, e.Len, func(p lsmt.Piece) {
			if max <= 0 || p.Reader != 0 || p.Layer >= len(img.opened) {
				return
			}
			if _, _, ok := localRange(caches[p.Layer], img.opened[p.Layer], p.Offset, p.Length); !ok {
				return
			}
			n := min(p.Length, max)
			out = append(out, fsmeta.Extent{Off: p.At, Len: n})
			max -= n
		})
	}
	return out
}

// planOnly makes the plan of planFiles for ranges and keeps it, reading through the image's block device dev.
func (img *mounted) planOnly(ctx context.Context, pre *predecoding, dev string, ranges []fsmeta.Extent, maxTables int64) error {
	bdev, err := os.Open(dev)
	if err != nil {
		return err
	}
	defer bdev.Close()
	_, err = img.planFiles(ctx, pre, bdev, ranges, maxTables)
	return err
}

// ctxReader reads r until ctx ends.
type ctxReader struct {
	ctx context.Context
	r   io.ReaderAt
}

func (c ctxReader) ReadAt(p []byte, off int64) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.ReadAt(p, off)
}

// primedFiles are the file extents found for the last plan of an image, and what that plan asked for.
type primedFiles struct {
	want  []fsmeta.Extent
	files []fsmeta.FileExtent
}

// covers reports whether the merged extents have hold every byte of want (merged too).
func covers(have, want []fsmeta.Extent) bool {
	for _, w := range want {
		i, _ := slices.BinarySearchFunc(have, w.Off, func(e fsmeta.Extent, off int64) int { return cmp.Compare(e.End(), off+1) })
		if i == len(have) || have[i].Off > w.Off || have[i].End() < w.End() {
			return false
		}
	}
	return true
}

// primedFS is an image's filesystem being primed: its mount's root, which opens its files by handle, and its block
// device.
type primedFS struct {
	root, bdev *os.File
}

func openPrimed(target, dev string) (*primedFS, error) {
	root, err := os.Open(target)
	if err != nil {
		return nil, err
	}
	bdev, err := os.Open(dev)
	if err != nil {
		root.Close()
		return nil, err
	}
	return &primedFS{root: root, bdev: bdev}, nil
}

func (p *primedFS) close() {
	p.root.Close()
	p.bdev.Close()
}

// prime reads the plan's ranges into the page cache, each once ready reports that the record it comes from can be
// read (false: stop), and counts what it read in st.
func (fs *primedFS) prime(ctx context.Context, plan *primePlan, ready func(rec int) bool, st *priming) error {
	meta := func(off, n int64) error {
		st.metaBytes.Add(n)
		primedTotal.meta.Add(n)
		return unix.Fadvise(int(fs.bdev.Fd()), off, n, unix.FADV_WILLNEED)
	}
	opened := map[uint32]bool{}
	for k, r := range plan.ranges {
		if !ready(plan.recs[k]) || ctx.Err() != nil {
			return nil // the image is being unmounted, or its start is long over
		}
		pos := r.Off
		i, _ := slices.BinarySearchFunc(plan.files, r.Off, func(e fsmeta.FileExtent, off int64) int { return cmp.Compare(e.End(), off+1) })
		for ; i < len(plan.files) && plan.files[i].Off < r.End(); i++ {
			fe := plan.files[i]
			a, b := max(r.Off, fe.Off), min(r.End(), fe.End())
			if b <= a {
				continue
			}
			if a > pos {
				if err := meta(pos, a-pos); err != nil {
					return err
				}
			}
			pos = b
			switch err := primeFile(int(fs.root.Fd()), fe, fe.Logical+a-fe.Off, b-a); {
			case errors.Is(err, unix.ESTALE), errors.Is(err, unix.ENOENT):
				st.stale.Add(1) // the inode is not the file the tables named: a damaged image
				continue
			case err != nil:
				return err
			}
			if !opened[fe.Ino] {
				opened[fe.Ino] = true
				st.files.Add(1)
			}
			st.fileBytes.Add(b - a)
			primedTotal.files.Add(b - a)
		}
		if pos < r.End() {
			if err := meta(pos, r.End()-pos); err != nil {
				return err
			}
		}
	}
	return nil
}

// fileIDIno32Gen is the file handle type of ext4's inodes: a 32-bit inode number and its generation.
const fileIDIno32Gen = 1

// primeFile reads n bytes at off of the file of fe into the page cache, opening it by its handle on the
// filesystem of mountFD. The handle is opened as a path first: an inode that is not a regular file there (whose
// open could reach a device's driver) fails with ESTALE, as a stale handle does, and is never opened for reading.
func primeFile(mountFD int, fe fsmeta.FileExtent, off, n int64) error {
	var h [8]byte
	binary.NativeEndian.PutUint32(h[0:], fe.Ino)
	binary.NativeEndian.PutUint32(h[4:], fe.Gen)
	pfd, err := unix.OpenByHandleAt(mountFD, unix.NewFileHandle(fileIDIno32Gen, h[:]), unix.O_PATH|unix.O_CLOEXEC)
	if err != nil {
		return fmt.Errorf("open inode %d: %w", fe.Ino, err)
	}
	defer unix.Close(pfd)
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return fmt.Errorf("stat inode %d: %w", fe.Ino, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return fmt.Errorf("inode %d is not a regular file: %w", fe.Ino, unix.ESTALE)
	}
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", pfd), unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return fmt.Errorf("open inode %d: %w", fe.Ino, err)
	}
	defer unix.Close(fd)
	if err := unix.Fadvise(fd, off, n, unix.FADV_WILLNEED); err != nil {
		return fmt.Errorf("read ahead inode %d: %w", fe.Ino, err)
	}
	return nil
}
