package e2e

import (
	"bufio"
	"context"
	"crypto/md5"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/testenv"
)

// TestDaemonCrashUnderLoad kills obd-snapshotter with SIGKILL while a container reads its lazily pulled image, and
// starts it again; later it upgrades it (stop, then start another build) the same way: the container's reads wait
// while no daemon runs and go on, none fails, and the data is right. A second daemon on the same root refuses to
// start.
func TestDaemonCrashUnderLoad(t *testing.T) {
	sb := startSandbox(t)
	ctx := context.Background()
	bb, err := os.ReadFile(testenv.Tools(t, "busybox")[0])
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 24<<20)
	rand.Read(data)
	sum := md5.Sum(data)
	src := filepath.Join(t.TempDir(), "src")
	layers := [][]byte{
		tarOf(t, []tarEntry{{name: "bin/", mode: 0o755}, {name: "bin/busybox", body: bb, mode: 0o755}, {name: "bin/sh", link: "busybox"}}),
		tarOf(t, []tarEntry{{name: "data.bin", body: data, mode: 0o644}}),
	}
	writeLayout(t, src, "v1", layers)
	plain := sb.Registry + "/survive:v1"
	lazy := sb.Registry + "/survive:obd"
	pushLayout(t, src, "v1", plain)
	run(t, exec.Command(bins.obd, "convert", "--vsize", "8", plain, lazy))
	obd(t, sb, "pull", lazy)

	// The container reads the file 64 KiB at a time, every read a first one (fetched through the daemon), and
	// prints a line per MiB, then the file's MD5.
	script := `i=0; while [ $i -lt 384 ]; do
  busybox dd if=/data.bin of=/dev/null bs=64k count=1 skip=$i 2>/dev/null || echo "FAIL $i"
  i=$((i+1)); [ $((i % 16)) -eq 0 ] && echo "MiB $((i / 16))"; busybox usleep 20000
done; busybox md5sum /data.bin`
	cmd := sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", lazy, "survive1", "/bin/sh", "-c", script)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1024)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	var out []string
	var last time.Time
	var longest time.Duration // between two lines of the container
	next := func(what string) string {
		t.Helper()
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("the container ended while waiting for %s; it printed:\n%s", what, strings.Join(out, "\n"))
			}
			if !last.IsZero() {
				longest = max(longest, time.Since(last))
			}
			last = time.Now()
			out = append(out, l)
			return l
		case <-time.After(60 * time.Second):
			t.Fatalf("no %s within 60s; the container printed:\n%s", what, strings.Join(out, "\n"))
		}
		return ""
	}
	for next("the first MiB") != "MiB 2" {
	}

	if err := sb.KillSnapshotter(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	time.Sleep(time.Second)
	if err := sb.StartSnapshotter(ctx); err != nil {
		t.Fatal(err)
	}
	for next("reads after the restart") != "MiB 10" {
	}

	// An upgrade: the daemon stops (SIGTERM) and a new build starts; the holder process is the old build's.
	upgraded := filepath.Join(t.TempDir(), "obd-snapshotter-new")
	run(t, exec.Command("cp", bins.snapshotter, upgraded))
	if err := sb.StopSnapshotter(); err != nil {
		t.Fatal(err)
	}
	sb.SetSnapshotterBinary(upgraded)
	time.Sleep(500 * time.Millisecond)
	if err := sb.StartSnapshotter(ctx); err != nil {
		t.Fatal(err)
	}
	for {
		l := next("the rest of the reads")
		if strings.Contains(l, "data.bin") {
			break
		}
	}
	resumed := time.Since(killed)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("container: %v\n%s", err, strings.Join(out, "\n"))
	}
	text := strings.Join(out, "\n")
	if strings.Contains(text, "FAIL") || strings.Contains(text, "rror") {
		t.Fatalf("reads failed across the daemon's crash:\n%s", text)
	}
	if want := hex.EncodeToString(sum[:]) + "  /data.bin"; !strings.Contains(text, want) {
		t.Fatalf("container read other data: want %q in\n%s", want, text)
	}
	if log := sb.Log("snapshotter"); !strings.Contains(log, "resumed device whose server had died") {
		t.Errorf("the upgraded daemon did not resume the device; its log:\n%s", log)
	}
	t.Logf("the container read 24 MiB across a daemon crash with 1s down and an upgrade with 0.5s down, no read failed; longest pause between its lines %v (%v without a crash), done %v after the kill",
		longest.Round(time.Millisecond), (16 * 20 * time.Millisecond), resumed.Round(time.Millisecond))

	t.Run("second daemon on the same root refuses", func(t *testing.T) {
		c := exec.Command(bins.snapshotter, "--config", sb.ConfigFile(), "--address", filepath.Join(t.TempDir(), "second.sock"))
		o, err := c.CombinedOutput()
		if err == nil || !strings.Contains(string(o), "root in use") {
			t.Fatalf("second daemon: %v\n%s", err, o)
		}
	})
}
