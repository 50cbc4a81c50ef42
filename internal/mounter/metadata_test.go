package mounter

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/prefetch"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/testenv"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/zfile"
)

// treeFiles calls add for a tree of dirs directories of files files each, with incompressible data.
func treeFiles(dirs, files int, add func(name string, data []byte, dir bool)) {
	rng := rand.New(rand.NewPCG(1, 2))
	for d := range dirs {
		dir := fmt.Sprintf("pkg/module-%03d", d)
		add(dir, nil, true)
		for f := range files {
			data := make([]byte, 256+rng.IntN(2048))
			for i := range data {
				data[i] = byte(rng.Uint32())
			}
			add(fmt.Sprintf("%s/file-%02d.py", dir, f), data, false)
		}
	}
}

// treeLayer returns an overlaybd layer blob (ZFile) made by obd's converter from a tar of treeFiles.
func treeLayer(t *testing.T, dirs, files int) []byte {
	t.Helper()
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	treeFiles(dirs, files, func(name string, data []byte, dir bool) {
		h := &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data))}
		if dir {
			h.Typeflag, h.Name, h.Mode = tar.TypeDir, name+"/", 0o755
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
		}
	})
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return zfileBlob(t, appliedLayer(t, 64<<30, &tb))
}

// appliedLayer returns a writable layer of a fresh ext4 of vsize bytes (obd's mkfs) with the tar r applied by obd's
// converter, not committed.
func appliedLayer(t *testing.T, vsize int64, r io.Reader) *lsmt.RW {
	t.Helper()
	w := newLayerRW(t, vsize)
	dev := rwDisk{w}
	if err := ext4.Mkfs(t.Context(), dev, ext4.MkfsOptions{}); err != nil {
		t.Fatal(err)
	}
	fsys, err := ext4.Open(dev, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := convert.Apply(t.Context(), fsys, r, convert.ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := fsys.Close(); err != nil {
		t.Fatal(err)
	}
	return w
}

// scatteredLayer returns an overlaybd layer blob (ZFile) of the ext4 image mke2fs makes of treeFiles: its
// directory blocks lie among the files' data, as in images converted by upstream or an older obd.
func scatteredLayer(t *testing.T, dirs, files int) []byte {
	t.Helper()
	src := t.TempDir()
	treeFiles(dirs, files, func(name string, data []byte, dir bool) {
		p := filepath.Join(src, name)
		var err error
		if dir {
			err = os.MkdirAll(p, 0o755)
		} else {
			err = os.WriteFile(p, data, 0o644)
		}
		if err != nil {
			t.Fatal(err)
		}
	})
	img := filepath.Join(t.TempDir(), "fs.img")
	if out, err := exec.Command(testenv.Tools(t, "mke2fs")[0], "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "^has_journal", "-d", src, img, "256M").CombinedOutput(); err != nil {
		t.Fatalf("mke2fs: %v\n%s", err, out)
	}
	return imageLayer(t, img)
}

// imageLayer returns an overlaybd layer blob (ZFile) holding the disk image img: its non-zero 4 KiB blocks.
func imageLayer(t *testing.T, img string) []byte {
	t.Helper()
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	size := (int64(len(b)) + 4095) / 4096 * 4096
	b = append(b, make([]byte, size-int64(len(b)))...)
	w := newLayerRW(t, size)
	for off := 0; off < len(b); off += 4096 {
		if blk := b[off : off+4096]; !bytes.Equal(blk, make([]byte, 4096)) {
			if _, err := w.WriteAt(blk, int64(off)); err != nil {
				t.Fatal(err)
			}
		}
	}
	return zfileBlob(t, w)
}

func newLayerRW(t *testing.T, vsize int64) *lsmt.RW {
	t.Helper()
	dir := t.TempDir()
	data, err := os.Create(filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { data.Close() })
	index, err := os.Create(filepath.Join(dir, "index"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { index.Close() })
	w, err := lsmt.CreateRW(data, index, vsize, lsmt.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// zfileBlob commits w and compresses it into a ZFile blob.
func zfileBlob(t *testing.T, w *lsmt.RW) []byte {
	t.Helper()
	var commit bytes.Buffer
	if _, err := lsmt.Commit(&commit, w, lsmt.CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(filepath.Join(t.TempDir(), "blob"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := convert.WriteLayer(out, &commit, true, false, zfile.Options{}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out.Name())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// mountMetadata serves blob from a registry and mounts it as image "img" with a metadata prefetch bound of budget
// bytes, a cache without readahead and 16 KiB fetches (every request after the prefetch is a miss); it returns the
// image's prefetch job (nil for none).
func mountMetadata(t *testing.T, blob []byte, budget int64) (*Mounter, *fakeRegistry, string, *prefetch.Job) {
	t.Helper()
	s := newSetup(t)
	reg := newFakeRegistry(t, blob)
	m := s.newMounter(mounterOptions{registry: reg, cache: s.openCacheReadahead(16<<10, -1), metadata: budget})
	target := filepath.Join(s.root, "mnt")
	if err := m.Mount(context.Background(), "img", []snapshotter.Layer{reg.layer()}, target); err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	job := m.images["img"].prefetch
	m.mu.Unlock()
	return m, reg, target, job
}

// An image without a recorded start has its filesystem metadata prefetched when it is attached: walking its whole
// tree (every directory and inode) then reads nothing from the registry, where without the prefetch it does.
func TestMetadataPrefetch(t *testing.T) {
	needSystem(t)
	blob := treeLayer(t, 400, 8)
	for _, on := range []bool{true, false} {
		t.Run(fmt.Sprint("metadata=", on), func(t *testing.T) {
			var budget int64
			if on {
				budget = 16 << 20
			}
			m, reg, target, job := mountMetadata(t, blob, budget)
			if on != (job != nil) {
				t.Fatalf("metadata prefetch started: %v, want %v", job != nil, on)
			}
			if job != nil {
				job.Wait()
				p := m.Images()[0].Prefetch
				if p == nil || p.What != prefetch.WhatMetadata || p.Err != "" || p.Ranges == 0 || p.DoneRanges != p.Ranges {
					t.Fatalf("prefetch progress %+v", p)
				}
				t.Logf("metadata prefetch: %d ranges, %d bytes", p.Ranges, p.Bytes)
				// The metadata lies together in the blob: far less than the blob's file data.
				if p.Bytes > int64(len(blob))/8 {
					t.Fatalf("the metadata prefetch fetched %d bytes of a %d-byte blob", p.Bytes, len(blob))
				}
			}
			before := reg.requests.Load()
			paths := 0
			err := filepath.WalkDir(filepath.Join(target, "pkg"), func(p string, d fs.DirEntry, err error) error {
				if err == nil {
					_, err = d.Info()
					paths++
				}
				return err
			})
			if err != nil || paths != 1+400*9 {
				t.Fatalf("walk: %d paths, %v", paths, err)
			}
			walked := reg.requests.Load() - before
			t.Logf("walk of %d paths: %d registry requests; blob %d bytes", paths, walked, len(blob))
			if on && walked != 0 {
				t.Fatalf("walking the tree after the metadata prefetch made %d registry requests", walked)
			}
			if !on && walked == 0 {
				t.Fatal("walking the tree without a metadata prefetch made no registry request: the test cannot tell")
			}
			// File data is not prefetched.
			before = reg.requests.Load()
			if _, err := readWithin(t, filepath.Join(target, "pkg/module-030/file-03.py"), time.Minute); err != nil {
				t.Fatal(err)
			}
			if reg.requests.Load() == before {
				t.Fatal("reading a file made no registry request: its data was prefetched too")
			}
			if err := m.Unmount(context.Background(), "img", target); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// An image whose directories lie among file data (converted by upstream, or before obd's metadata zone) has only its
// inode tables prefetched: fetching its directories would fetch most of the file data with them.
func TestMetadataPrefetchScattered(t *testing.T) {
	needSystem(t)
	blob := scatteredLayer(t, 400, 8)
	m, reg, target, job := mountMetadata(t, blob, 16<<20)
	if job == nil {
		t.Fatal("no metadata prefetch")
	}
	job.Wait()
	p := m.Images()[0].Prefetch
	t.Logf("metadata prefetch: %d ranges, %d bytes of a %d-byte blob", p.Ranges, p.Bytes, len(blob))
	if p.Err != "" || p.Ranges == 0 || p.Bytes > int64(len(blob))/8 {
		t.Fatalf("prefetch progress %+v: want the inode tables only", p)
	}
	before := reg.requests.Load()
	if _, err := os.ReadDir(filepath.Join(target, "pkg/module-200")); err != nil {
		t.Fatal(err)
	}
	if reg.requests.Load() == before {
		t.Fatal("listing a directory made no registry request: the scattered directories were prefetched")
	}
	if err := m.Unmount(context.Background(), "img", target); err != nil {
		t.Fatal(err)
	}
}
