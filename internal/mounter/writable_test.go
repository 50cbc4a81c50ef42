package mounter

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/device"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/lsmt"
)

// helloLocal returns an image of one local layer: hello-world's layer converted by obd into a 1 GiB ext4 (the
// upstream-converted fixture's filesystem fails e2fsck on its own, which the checks here need clean).
func helloLocal(t *testing.T) []snapshotter.Layer {
	t.Helper()
	gz, err := os.Open(helloLayerBlob)
	if err != nil {
		t.Fatal(err)
	}
	defer gz.Close()
	zr, err := gzip.NewReader(gz)
	if err != nil {
		t.Fatal(err)
	}
	w := appliedLayer(t, 1<<30, zr)
	out := filepath.Join(t.TempDir(), "layer.commit")
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := lsmt.Commit(f, w, lsmt.CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	return []snapshotter.Layer{{LocalPath: out}}
}

// rwDisk is a writable layer as an ext4.Device: the few bytes libext2fs writes on their own become a
// read-modify-write of their sectors.
type rwDisk struct{ *lsmt.RW }

func (d rwDisk) Size() int64 { return d.VirtualSize() }

func (d rwDisk) WriteAt(p []byte, off int64) (int, error) {
	start, end := off/lsmt.SectorSize*lsmt.SectorSize, (off+int64(len(p))+lsmt.SectorSize-1)/lsmt.SectorSize*lsmt.SectorSize
	buf := make([]byte, end-start)
	if _, err := d.RW.ReadAt(buf, start); err != nil && err != io.EOF {
		return 0, err
	}
	copy(buf[off-start:], p)
	if _, err := d.RW.WriteAt(buf, start); err != nil {
		return 0, err
	}
	return len(p), nil
}

// fsck runs e2fsck -fn on the device of a writable layer attached without a mount (dev mode) and fails the test
// unless the filesystem is clean.
func fsck(t *testing.T, dev string) {
	t.Helper()
	out, err := exec.Command("e2fsck", "-fn", dev).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", dev, err, out)
	}
}

func writeSynced(t *testing.T, path string, data []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestWritableLayer: a container's writable layer over an image (dir mode) takes writes, renames, hard links and
// deletes; keeps them across a detach; stays within its quota with ENOSPC for every writer; keeps its
// data file near the live data when a file is rewritten; is clean for e2fsck when attached as a bare device (dev
// mode); and, sealed, stacks on the image as a read-only layer with the same tree.
func TestWritableLayer(t *testing.T) {
	s := newSetup(t)
	m := s.newMounter(mounterOptions{})
	layers := helloLocal(t)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	const quota = 24 << 20
	wl := snapshotter.WritableLayer{Dir: filepath.Join(s.root, "rw"), Quota: quota}
	target := filepath.Join(s.root, "mnt")
	s.mounted = append(s.mounted, mountedImage{m, "c1", target})
	dev, err := m.MountWritable(ctx, "c1", layers, "", wl, target)
	if err != nil {
		t.Fatalf("MountWritable: %v", err)
	}
	if !strings.HasPrefix(dev, "/dev/loop") {
		t.Fatalf("device %q", dev)
	}
	if got, err := os.ReadFile(filepath.Join(target, "hello")); err != nil || !bytes.Equal(got, helloBinary(t)) {
		t.Fatalf("/hello through the writable layer: %v", err)
	}
	payload := bytes.Repeat([]byte("obd writable "), 100_000)
	writeSynced(t, filepath.Join(target, "a"), payload)
	if err := os.Rename(filepath.Join(target, "a"), filepath.Join(target, "b")); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(filepath.Join(target, "b"), filepath.Join(target, "c")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(target, "hello")); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(target, "d", "e"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeSynced(t, filepath.Join(target, "d", "e", "f"), []byte("small"))

	// Rewriting a file keeps the data file near the live data: discards punch the old blocks out.
	info := func() *WritableInfo {
		for _, img := range m.Images() {
			if img.ID == "c1" && img.Writable != nil {
				return img.Writable
			}
		}
		t.Fatal("Images lists no writable layer c1")
		return nil
	}
	rewrite := bytes.Repeat([]byte{0xA5}, 4<<20)
	writeSynced(t, filepath.Join(target, "rewritten"), rewrite)
	before := info().DataBytes
	for i := range 10 {
		rewrite[0] = byte(i)
		writeSynced(t, filepath.Join(target, "rewritten"), rewrite)
	}
	root := mustOpen(t, target)
	if err := unix.Syncfs(int(root.Fd())); err != nil {
		t.Fatal(err)
	}
	root.Close()
	// ext4 issues the discards of freed blocks once the journal commit that freed them is done, after syncfs
	// returns: give them a moment.
	after := info().DataBytes
	for deadline := time.Now().Add(10 * time.Second); after-before > 2<<20 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
		after = info().DataBytes
	}
	t.Logf("writable data: %d bytes after the first write of a 4 MiB file, %d after 10 rewrites", before, after)
	if after-before > 2<<20 {
		t.Errorf("10 rewrites of a 4 MiB file grew the writable data by %d bytes", after-before)
	}

	// The quota: free space is about the quota, and a writer gets ENOSPC past it, root included.
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err != nil {
		t.Fatal(err)
	}
	if avail := int64(st.Bavail) * st.Bsize; avail > quota || avail < quota-8<<20 {
		t.Errorf("%d bytes available to unprivileged writers with a quota of %d", avail, quota)
	}
	out, err := exec.CommandContext(ctx, "dd", "if=/dev/urandom", "of="+filepath.Join(target, "big"), "bs=1M", "count=64", "conv=fsync").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "No space left on device") {
		t.Errorf("writing 64 MiB as root with a quota of 24 MiB: %v\n%s", err, out)
	}
	if err := os.Remove(filepath.Join(target, quotaFile)); err == nil {
		t.Error("the quota file could be removed")
	}
	if err := os.Remove(filepath.Join(target, "big")); err != nil {
		t.Fatal(err)
	}

	// Detach and attach again: everything is kept.
	if err := m.Unmount(ctx, "c1", target); err != nil {
		t.Fatal(err)
	}
	if _, err := m.MountWritable(ctx, "c1", layers, "", wl, target); err != nil {
		t.Fatal(err)
	}
	checkTree := func(root string) {
		t.Helper()
		if got, err := os.ReadFile(filepath.Join(root, "b")); err != nil || !bytes.Equal(got, payload) {
			t.Errorf("b after reattach: %v", err)
		}
		var sb, sc unix.Stat_t
		if unix.Stat(filepath.Join(root, "b"), &sb) != nil || unix.Stat(filepath.Join(root, "c"), &sc) != nil || sb.Ino != sc.Ino || sb.Nlink != 2 {
			t.Errorf("hard link b/c lost: %+v %+v", sb, sc)
		}
		if _, err := os.Stat(filepath.Join(root, "hello")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("deleted /hello: %v", err)
		}
		if got, err := os.ReadFile(filepath.Join(root, "d", "e", "f")); err != nil || string(got) != "small" {
			t.Errorf("d/e/f: %q %v", got, err)
		}
		if _, err := os.Stat(filepath.Join(root, quotaFile)); err != nil {
			t.Errorf("quota file: %v", err)
		}
	}
	checkTree(target)
	if err := m.Unmount(ctx, "c1", target); err != nil {
		t.Fatal(err)
	}

	// Dev mode: the bare device, which another process mounts or checks.
	dev, err = m.MountWritable(ctx, "c1", layers, "", wl, "")
	if err != nil {
		t.Fatal(err)
	}
	fsck(t, dev)
	if err := m.Unmount(ctx, "c1", ""); err != nil {
		t.Fatal(err)
	}

	// Sealed, the layer stacks on the image read-only.
	sealed := filepath.Join(s.root, "sealed.commit")
	if err := m.SealWritable(ctx, "c1", layers, wl, sealed); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(wl.Dir, snapshotter.WritableDataFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("writable data left after sealing: %v", err)
	}
	f, err := os.Open(sealed)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fst, _ := f.Stat()
	if _, err := lsmt.Open(f, fst.Size()); err != nil {
		t.Fatalf("sealed layer: %v", err)
	}
	ro := filepath.Join(s.root, "ro")
	if err := s.mount(m, "sealed", append(layers, snapshotter.Layer{LocalPath: sealed}), ro); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(ro, quotaFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the sealed layer keeps the quota file: %v", err)
	}
	if _, err := os.ReadFile(filepath.Join(ro, "b")); err != nil {
		t.Errorf("b in the sealed layer: %v", err)
	}
}

func mustOpen(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// crashChildEnv makes the test binary the writer process of TestWritableCrash.
const crashChildEnv = "OBD_WRITABLE_CRASH_CHILD"

// TestWritableCrash kills (SIGKILL) the process that serves a writable layer while another one writes and
// fsyncs files into it, as when the daemon dies under a container, then attaches the layer again: the filesystem
// mounts (its journal replayed), every file whose fsync returned is intact, and e2fsck finds it clean.
func TestWritableCrash(t *testing.T) {
	if root := os.Getenv(crashChildEnv); root != "" {
		crashServer(t, root)
		return
	}
	s := newSetup(t)
	target := filepath.Join(s.root, "mnt")
	wl := filepath.Join(s.root, "rw")
	ready := filepath.Join(s.root, "ready")
	cmd := exec.Command(os.Args[0], "-test.run=^TestWritableCrash$")
	// The child is killed before its test ends, so it cannot remove its temporary directories: they go under root.
	childTmp := filepath.Join(s.root, "tmp")
	if err := os.Mkdir(childTmp, 0o700); err != nil {
		t.Fatal(err)
	}
	cmd.Env = append(os.Environ(), crashChildEnv+"="+s.root, "TMPDIR="+childTmp)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	defer func() {
		if !killed {
			cmd.Process.Kill()
			cmd.Wait()
		}
	}()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(ready); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server did not attach the layer in a minute:\n%s", out.String())
		}
	}
	// Write and fsync files; the server is killed after the 20th, while writes go on.
	var synced []string
	writeErr := make(chan error, 1)
	go func() {
		for i := range 5000 {
			name := "f" + strconv.Itoa(i)
			f, err := os.Create(filepath.Join(target, name))
			if err == nil {
				_, err = f.Write(crashPayload(name))
				if err == nil {
					err = f.Sync()
				}
				f.Close()
			}
			os.WriteFile(filepath.Join(target, "unsynced"+strconv.Itoa(i)), crashPayload("x"), 0o644)
			if err != nil {
				writeErr <- err
				return
			}
			synced = append(synced, name)
			if i == 20 {
				cmd.Process.Kill()
			}
		}
		writeErr <- nil
	}()
	select {
	case err := <-writeErr:
		t.Logf("writes after the kill failed: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("writes into the killed server's layer neither failed nor finished in a minute")
	}
	cmd.Wait()
	killed = true
	if len(synced) < 20 {
		t.Fatalf("only %d files fsynced before the kill:\n%s", len(synced), out.String())
	}
	// Its filesystem is left mounted on a device whose server is gone.
	if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
		t.Logf("unmount the dead server's filesystem: %v", err)
	}

	m := s.newMounter(mounterOptions{})
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	layers := helloLocal(t)
	s.mounted = append(s.mounted, mountedImage{m, "crash", target})
	if _, err := m.MountWritable(ctx, "crash", layers, "", snapshotter.WritableLayer{Dir: wl}, target); err != nil {
		t.Fatalf("attach the layer again after the crash: %v\nserver:\n%s", err, out.String())
	}
	for _, name := range synced {
		got, err := os.ReadFile(filepath.Join(target, name))
		if err != nil || !bytes.Equal(got, crashPayload(name)) {
			t.Errorf("fsynced file %s after the crash: %d bytes, %v", name, len(got), err)
		}
	}
	t.Logf("%d fsynced files intact", len(synced))
	if err := m.Unmount(ctx, "crash", target); err != nil {
		t.Fatal(err)
	}
	dev, err := m.MountWritable(ctx, "crash", layers, "", snapshotter.WritableLayer{Dir: wl}, "")
	if err != nil {
		t.Fatal(err)
	}
	s.mounted = append(s.mounted, mountedImage{m, "crash", ""})
	fsck(t, dev)
}

// crashPayload is the content of a file the crash test writes: 200 KiB named after the file.
func crashPayload(name string) []byte {
	return bytes.Repeat([]byte(name+"\n"), 200<<10/(len(name)+1))
}

// crashServer serves a writable layer under root, mounted at root/mnt, until it is killed; root/ready tells
// that it is mounted.
func crashServer(t *testing.T, root string) {
	m := New(Options{Frontend: device.NewFuseLoop(testLogger(t)), StateDir: filepath.Join(root, "state"), Logger: testLogger(t)})
	layers := helloLocal(t)
	if _, err := m.MountWritable(context.Background(), "crash", layers, "", snapshotter.WritableLayer{Dir: filepath.Join(root, "rw")}, filepath.Join(root, "mnt")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "ready"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Minute)
}

// FuzzParseSuperblock: any 1,024 bytes give a superblock whose counts are consistent, or an error.
func FuzzParseSuperblock(f *testing.F) {
	sb := make([]byte, 1024)
	sb[0x38], sb[0x39] = 0x53, 0xEF
	sb[0x4], sb[0xC], sb[0x18] = 100, 50, 2
	f.Add(sb)
	f.Add(make([]byte, 1024))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := parseSuperblock(b)
		if err != nil {
			return
		}
		if s.blocks <= 0 || s.freeBlocks < 0 || s.freeBlocks > s.blocks || s.blockSize < 1024 || s.blockSize > 64<<10 {
			t.Fatalf("inconsistent superblock %+v", s)
		}
		if j := journalSize(s); j < 4 || j > 64 {
			t.Fatalf("journal of %d MiB", j)
		}
	})
}
