package mounter

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/prefetch"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/zfile"
)

// treeLayer returns an overlaybd layer blob (ZFile) made by obd's converter from a tar of dirs directories of
// files files each, with incompressible data.
func treeLayer(t *testing.T, dirs, files int) []byte {
	t.Helper()
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	rng := rand.New(rand.NewPCG(1, 2))
	for d := range dirs {
		dir := fmt.Sprintf("pkg/module-%03d", d)
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: dir + "/", Mode: 0o755}); err != nil {
			t.Fatal(err)
		}
		for f := range files {
			data := make([]byte, 256+rng.IntN(2048))
			for i := range data {
				data[i] = byte(rng.Uint32())
			}
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%s/file-%02d.py", dir, f), Mode: 0o644, Size: int64(len(data))}); err != nil {
				t.Fatal(err)
			}
			if _, err := tw.Write(data); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	data, err := os.Create(filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	defer data.Close()
	index, err := os.Create(filepath.Join(dir, "index"))
	if err != nil {
		t.Fatal(err)
	}
	defer index.Close()
	w, err := lsmt.CreateRW(data, index, 64<<30, lsmt.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dev := rwDisk{w}
	if err := ext4.Mkfs(t.Context(), dev, ext4.MkfsOptions{}); err != nil {
		t.Fatal(err)
	}
	fsys, err := ext4.Open(dev, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := convert.Apply(t.Context(), fsys, &tb, convert.ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := fsys.Close(); err != nil {
		t.Fatal(err)
	}
	var commit bytes.Buffer
	if _, err := lsmt.Commit(&commit, w, lsmt.CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(filepath.Join(dir, "blob"))
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

// An image without a recorded start has its filesystem metadata prefetched when it is attached: walking its whole
// tree (every directory and inode) then reads nothing from the registry, where without the prefetch it does.
func TestMetadataPrefetch(t *testing.T) {
	needSystem(t)
	blob := treeLayer(t, 400, 8)
	for _, on := range []bool{true, false} {
		t.Run(fmt.Sprint("metadata=", on), func(t *testing.T) {
			s := newSetup(t)
			reg := newFakeRegistry(t, blob)
			var budget int64
			if on {
				budget = 16 << 20
			}
			// No readahead, and a fetch is one 16 KiB block: every request after the prefetch is a miss.
			m := s.newMounter(mounterOptions{registry: reg, cache: s.openCacheReadahead(16<<10, -1), metadata: budget})
			target := filepath.Join(s.root, "mnt")
			if err := m.Mount(context.Background(), "img", []snapshotter.Layer{reg.layer()}, target); err != nil {
				t.Fatal(err)
			}
			m.mu.Lock()
			job := m.images["img"].prefetch
			m.mu.Unlock()
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
