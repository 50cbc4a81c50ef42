package mounter

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/snapshotter"
)

// waitDownload waits until the image's only layer leaves the waiting and downloading states and returns its info.
func waitDownload(t *testing.T, m *Mounter) LayerInfo {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		l := m.Images()[0].Layers[0]
		if l.Download == DownloadVerified || l.Download == DownloadFailed {
			return l
		}
		if time.Now().After(deadline) {
			t.Fatalf("download still %q after a minute", l.Download)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// With background download, the whole blob comes into the cache and is checked against its digest: the registry
// can then go away and every file still reads.
func TestBackgroundDownload(t *testing.T) {
	blob, err := os.ReadFile(blobPath())
	if err != nil {
		t.Fatal(err)
	}
	s := newSetup(t)
	reg := newFakeRegistry(t, blob)
	m := s.newMounter(mounterOptions{registry: reg, cache: s.openCache(16 << 10), download: true})
	target := filepath.Join(s.root, "mnt")
	if err := s.mount(m, "dl", []snapshotter.Layer{reg.layer()}, target); err != nil {
		t.Fatal(err)
	}
	l := waitDownload(t, m)
	if l.Download != DownloadVerified || l.DownloadedBytes != int64(len(blob)) {
		t.Fatalf("layer %+v: want the blob downloaded and verified", l)
	}
	reg.down.Store(true)
	if b, err := readWithin(t, filepath.Join(target, "hello"), time.Minute); err != nil || !bytes.Equal(b, helloBinary(t)) {
		t.Fatalf("read with the registry gone after the download: %v", err)
	}
	if reg.unavail.Load() != 0 {
		t.Fatalf("%d reads went to the registry after the download", reg.unavail.Load())
	}
	if err := m.Unmount(context.Background(), "dl", target); err != nil {
		t.Fatal(err)
	}
}

// A blob whose bytes do not match its digest (here one flipped byte in the tar padding at its end, which no read
// checks) is never marked verified, and its blocks are dropped.
func TestBackgroundDownloadCorruptBlob(t *testing.T) {
	blob, err := os.ReadFile(blobPath())
	if err != nil {
		t.Fatal(err)
	}
	s := newSetup(t)
	reg := newFakeRegistry(t, blob)
	reg.corruptAt.Store(int64(len(blob) - 1))
	c := s.openCache(16 << 10)
	m := s.newMounter(mounterOptions{registry: reg, cache: c, download: true})
	target := filepath.Join(s.root, "mnt")
	if err := s.mount(m, "dl", []snapshotter.Layer{reg.layer()}, target); err != nil {
		t.Fatal(err)
	}
	l := waitDownload(t, m)
	if l.Download != DownloadFailed || !bytes.Contains([]byte(l.DownloadError), []byte("digest")) {
		t.Fatalf("layer %+v: want the download failed on its digest", l)
	}
	if reg.corrupted.Load() != 1 {
		t.Fatalf("the corrupt byte was served %d times", reg.corrupted.Load())
	}
	if b, err := readWithin(t, filepath.Join(target, "hello"), time.Minute); err != nil || !bytes.Equal(b, helloBinary(t)) {
		t.Fatalf("read after a failed download: %v", err)
	}
	if err := m.Unmount(context.Background(), "dl", target); err != nil {
		t.Fatal(err)
	}
}
