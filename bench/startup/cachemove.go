package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/obdproject/obd/bench/internal/measure"
	"github.com/obdproject/obd/internal/cacheclient"
	"github.com/obdproject/obd/internal/cachesnap"
	"github.com/obdproject/obd/internal/pull"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/internal/units"
)

// cacheMove is how fast a warm cache moves between nodes: obd cache export and import against tar of the cache
// directory (export: tar -c of the directory; import: tar -x into an empty one), each from a cold page cache;
// tar -x and the import also on memory just freed (freshPages).
type cacheMove struct {
	SnapshotBytes int64   `json:"snapshotBytes"` // the snapshot file of the whole image
	CacheDirBytes int64   `json:"cacheDirBytes"` // the tar of the cache directory
	ExportMBps    float64 `json:"exportMBps"`    // MB (10⁶ bytes) of snapshot per second, median of 3
	TarMBps       float64 `json:"tarMBps"`       // MB of cache-directory tar per second, median of 3
	UntarMBps     float64 `json:"untarMBps"`     // median over the runs of the imported-cache case
	ImportMBps    float64 `json:"importMBps"`    // likewise
}

// exportSnapshot fills a fresh node's cache with the whole image (over loopback), runs the app once (the node
// learns its start), exports the cache to a snapshot file and tars the cache directory, timing both; obdImported imports that snapshot on a fresh node in every run.
func (b *bench) exportSnapshot() error {
	if err := b.reset(true); err != nil {
		return err
	}
	res, err := pull.Pull(b.ctx, b.c, b.obdLoopRef, pull.Options{PlainHTTP: true, Credentials: noCredentials})
	if err != nil {
		return err
	}
	req := status.WarmRequest{ImageRef: res.Image.Name(), All: true}
	for _, l := range b.im.Info.OBDLayers {
		req.Layers = append(req.Layers, status.WarmLayer{Digest: l.Digest, Size: l.Size})
	}
	sc := status.NewClient(b.sb.StatusSocket, time.Minute)
	last, err := sc.Warm(b.ctx, req, nil)
	if err == nil && last.Error != "" {
		err = fmt.Errorf("%s", last.Error)
	}
	if err != nil {
		return fmt.Errorf("warm the cache: %w", err)
	}
	// The app runs once on this node, which learns its start: the snapshot carries it to the fresh node.
	if _, err := b.runOnly(snapshotter.Name, res.Image.Name()); err != nil {
		return fmt.Errorf("run on the exporting node: %w", err)
	}
	dir := filepath.Join(b.sb.Dir, "cache-move")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b.snapshot = filepath.Join(dir, "snapshot.tar")
	cacheTar := filepath.Join(dir, "cache-dir.tar")
	var export, tarc []float64
	for range 3 {
		d, err := timed(func() error { // as obd cache export --to FILE does
			return (&cacheclient.Client{Status: sc}).Export(b.ctx, io.Discard, nil, b.snapshot, nil)
		})
		if err != nil {
			return fmt.Errorf("export: %w", err)
		}
		export = append(export, d)
		// GNU tar with --sparse: the cache's data files may have holes. The daemon runs and may write a state
		// file meanwhile, which tar reports with exit status 1 ("file changed as we read it"): the copy may be torn,
		// which obd cache export avoids, but the time is what is compared.
		d, err = timed(func() error {
			err := runQuiet("tar", "--sparse", "--warning=no-file-changed", "-cf", cacheTar, "-C", b.sb.CacheDir(), ".")
			if ee := (*exec.ExitError)(nil); errors.As(err, &ee) && ee.ExitCode() == 1 {
				err = nil
			}
			return err
		})
		if err != nil {
			return err
		}
		tarc = append(tarc, d)
	}
	b.cacheTar = cacheTar
	b.move.SnapshotBytes, b.move.CacheDirBytes = fileSize(b.snapshot), fileSize(cacheTar)
	b.move.ExportMBps = float64(b.move.SnapshotBytes) / 1e6 / median(export)
	b.move.TarMBps = float64(b.move.CacheDirBytes) / 1e6 / median(tarc)
	logf("cache snapshot %s: export %.0f MB/s (tar of the cache directory, %s: %.0f MB/s)",
		units.Bytes(b.move.SnapshotBytes), b.move.ExportMBps, units.Bytes(b.move.CacheDirBytes), b.move.TarMBps)
	return nil
}

// obdImported runs on a fresh node (empty cache, daemon restarted): it imports the snapshot, pulls the image's
// metadata through the link and runs the workload. Its time to ready is the run's, as for the warm cases; the
// import and the pull are reported beside it.
//
// Before the import, the run times tar -x of the cache directory's tar into an empty directory, the import's
// baseline, under the same conditions: its input out of the page cache, and memory just freed for the page cache
// it fills (freshPages).
func (b *bench) obdImported() (sample, error) {
	into := filepath.Join(filepath.Dir(b.cacheTar), "untar")
	if err := os.MkdirAll(into, 0o755); err != nil {
		return sample{}, err
	}
	if err := freshPages(into, 2*fileSize(b.cacheTar)); err != nil {
		return sample{}, err
	}
	untar, err := timed(func() error { return runQuiet("tar", "-xf", b.cacheTar, "-C", into) })
	if err != nil {
		return sample{}, err
	}
	if err := os.RemoveAll(into); err != nil {
		return sample{}, err
	}
	if err := freshPages(filepath.Dir(b.cacheTar), 2*fileSize(b.snapshot)); err != nil {
		return sample{}, err
	}
	sc := status.NewClient(b.sb.StatusSocket, time.Minute)
	var res []status.ImportedBlob
	d, err := timed(func() error {
		f, err := cachesnap.Open(b.ctx, b.snapshot, nil) // as obd cache import FILE does
		if err != nil {
			return err
		}
		defer f.Close()
		res, err = sc.Import(b.ctx, b.snapshot, f)
		return err
	})
	if err != nil {
		return sample{}, fmt.Errorf("import: %w", err)
	}
	for _, r := range res {
		if r.Error != "" || r.Dropped > 0 || !r.Verified {
			return sample{}, fmt.Errorf("import: blob %s: %+v", r.Digest, r)
		}
	}
	// The import is not part of the start: the case starts from a warm cache and a cold page cache.
	if err := measure.DropCaches(); err != nil {
		return sample{}, err
	}
	b.markUsage(true)
	smp, err := b.obdStart(b.obdRef)
	if err != nil {
		return smp, err
	}
	smp.Seconds = smp.RunSeconds
	smp.ImportSeconds, smp.UntarSeconds = d, untar
	return smp, nil
}

// freshPages writes then removes a file of n bytes in dir, and drops the page cache. On a virtual machine that
// reports free memory to its host (virtio-balloon free page reporting, as here), memory freed seconds ago is
// faulted in again on its next use, which writes into the page cache at a fifth of the speed of memory freed just
// before: whichever of two page-cache-filling commands is measured first on just-freed memory wins by up to 5×.
// Both sides of a comparison call this first, then read their input from disk.
func freshPages(dir string, n int64) error {
	f, err := os.CreateTemp(dir, ".pages-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	buf := make([]byte, 1<<20)
	for left := n; left > 0; left -= int64(len(buf)) {
		if _, err := f.Write(buf[:min(int64(len(buf)), left)]); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Remove(f.Name()); err != nil {
		return err
	}
	return measure.DropCaches()
}

func timed(f func() error) (float64, error) {
	if err := measure.DropCaches(); err != nil {
		return 0, err
	}
	start := time.Now()
	err := f()
	return time.Since(start).Seconds(), err
}

func runQuiet(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w\n%s", name, err, out)
	}
	return nil
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}
