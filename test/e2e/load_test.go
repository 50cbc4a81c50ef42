package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/obdproject/obd/internal/sandbox"
	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/internal/testenv"
)

// TestManyImages pulls and starts containers of many distinct overlaybd images (sharing their base layer) at once
// through containerd, keeps them all running, then removes them: no pull or start fails, and afterwards no loop
// device, mount, descriptor or goroutine of theirs is left in obd-snapshotter. It logs the attach latency (p50,
// p99) and the daemon's memory per attached image. OBD_LOAD_IMAGES sets the number of images (default 12; the
// figures in docs/operations.md are from 100).
func TestManyImages(t *testing.T) {
	n := 12
	if v := os.Getenv("OBD_LOAD_IMAGES"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			t.Fatalf("OBD_LOAD_IMAGES=%q", v)
		}
	}
	sb := startSandbox(t)
	ctx := context.Background()
	bb, err := os.ReadFile(testenv.Tools(t, "busybox")[0])
	if err != nil {
		t.Fatal(err)
	}
	base := tarOf(t, []tarEntry{{name: "bin/", mode: 0o755}, {name: "bin/busybox", body: bb, mode: 0o755},
		{name: "bin/sh", link: "busybox"}, {name: "bin/cat", link: "busybox"}, {name: "bin/sleep", link: "busybox"}})
	refs := make([]string, n)
	start := time.Now()
	var g errgroup.Group
	g.SetLimit(2)
	for i := range n {
		g.Go(func() error {
			src := filepath.Join(t.TempDir(), "src")
			writeLayout(t, src, "v1", [][]byte{base, tarOf(t, []tarEntry{{name: "id.txt", body: []byte(fmt.Sprintf("image %d\n", i))}})})
			plain := fmt.Sprintf("%s/load/app%d:v1", sb.Registry, i)
			refs[i] = fmt.Sprintf("%s/load/app%d:obd", sb.Registry, i)
			pushLayout(t, src, "v1", plain)
			if out, err := exec.Command(bins.obd, "convert", "--vsize", "8", plain, refs[i]).CombinedOutput(); err != nil {
				return fmt.Errorf("convert %s: %v\n%s", plain, err, out)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d images converted in %v", n, time.Since(start).Round(time.Millisecond))

	// A first image started and removed: the daemon's lasting descriptors and goroutines (its registry connection,
	// the device holder's connection and process) are there before the baseline is taken.
	obd(t, sb, "pull", refs[0])
	run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", refs[0], "warmup", "/bin/cat", "/id.txt"))
	run(t, sb.Ctr(ctx, "images", "rm", "--sync", refs[0]))
	waitStatus(t, sb, "no image attached", func(st *status.Status) bool { return len(st.Images) == 0 })
	pid := sb.SnapshotterPID()
	cacheDir := sb.CacheDir()
	fds0, socks0, rss0, gor0 := daemonFDs(t, pid, cacheDir), daemonSockets(pid), daemonRSS(t, pid), goroutines(t, sb.Metrics)

	// Every image pulled and its container started at once, each printing its image's file, then kept running.
	start = time.Now()
	var mu sync.Mutex
	var failures []string
	var wg sync.WaitGroup
	for i, ref := range refs {
		wg.Go(func() {
			fail := func(what string, err error, out []byte) {
				mu.Lock()
				failures = append(failures, fmt.Sprintf("image %d: %s: %v %s", i, what, err, out))
				mu.Unlock()
			}
			args := []string{"pull", ref, "--address", sb.Containerd, "--namespace", sb.Namespace}
			if out, err := exec.Command(bins.obd, args...).CombinedOutput(); err != nil {
				fail("pull", err, out)
				return
			}
			name := fmt.Sprintf("load%d", i)
			out, err := sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", ref, name+"-cat", "/bin/cat", "/id.txt").CombinedOutput()
			if err != nil || string(out) != fmt.Sprintf("image %d\n", i) {
				fail("run", err, out)
				return
			}
			if out, err := sb.Ctr(ctx, "run", "-d", "--snapshotter", "overlaybd", ref, name, "/bin/sleep", "600").CombinedOutput(); err != nil {
				fail("run -d", err, out)
			}
		})
	}
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d of %d images failed:\n%s", len(failures), n, strings.Join(failures, "\n"))
	}
	started := time.Since(start)
	waitStatus(t, sb, fmt.Sprintf("%d images attached", n), func(st *status.Status) bool { return len(st.Images) == n })
	rss1 := daemonRSS(t, pid)
	lat := attachLatencies(t, sb.Log("snapshotter"))
	t.Logf("%d images pulled and started at once in %v; attach latency p50 %v p99 %v (%d attaches); daemon RSS %.1f MiB → %.1f MiB, %.2f MiB per attached image",
		n, started.Round(time.Millisecond), percentile(lat, 50), percentile(lat, 99), len(lat),
		float64(rss0)/(1<<20), float64(rss1)/(1<<20), float64(rss1-rss0)/float64(n)/(1<<20))

	// Containers and images all removed: nothing of theirs is left.
	for i := range refs {
		wg.Go(func() {
			name := fmt.Sprintf("load%d", i)
			sb.Ctr(ctx, "task", "kill", "-s", "KILL", name).Run()
			for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
				if sb.Ctr(ctx, "task", "delete", name).Run() == nil {
					break
				}
			}
			if out, err := sb.Ctr(ctx, "container", "delete", name).CombinedOutput(); err != nil {
				mu.Lock()
				failures = append(failures, fmt.Sprintf("delete %s: %v %s", name, err, out))
				mu.Unlock()
			}
			// An image's device stays attached until the image is removed.
			if out, err := sb.Ctr(ctx, "images", "rm", "--sync", refs[i]).CombinedOutput(); err != nil {
				mu.Lock()
				failures = append(failures, fmt.Sprintf("remove image %s: %v %s", refs[i], err, out))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("removing the containers:\n%s", strings.Join(failures, "\n"))
	}
	waitStatus(t, sb, "no image attached", func(st *status.Status) bool { return len(st.Images) == 0 })
	if loops := loopsOf(t, sb.Dir); len(loops) > 0 {
		t.Errorf("loop devices left: %v", loops)
	}
	if m, err := sandbox.MountsUnder(filepath.Join(sb.Dir, "snapshotter", "devices")); err != nil || len(m) > 0 {
		t.Errorf("device mounts left: %v (%v)", m, err)
	}
	// What a device leaves would be descriptors of its files and goroutines of its server. Idle registry connections
	// (descriptors that are sockets, with two goroutines each) stay in the client's bounded pool: they are counted
	// apart.
	var fds1, socks1, gor1 int
	leaked := func() bool {
		fds1, socks1, gor1 = daemonFDs(t, pid, cacheDir), daemonSockets(pid), goroutines(t, sb.Metrics)
		return fds1-socks1 > fds0-socks0+1 || gor1-2*socks1 > gor0-2*socks0+4
	}
	for deadline := time.Now().Add(20 * time.Second); leaked() && time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
	}
	if leaked() {
		t.Errorf("after removing every image the daemon has %d descriptors (%d sockets) and %d goroutines, %d (%d) and %d before; descriptors: %s",
			fds1, socks1, gor1, fds0, socks0, gor0, strings.Join(fdTargets(pid), " "))
	}
}

// daemonSockets counts the sockets among the descriptors of process pid.
func daemonSockets(pid int) int {
	n := 0
	for _, target := range fdTargets(pid) {
		if strings.HasPrefix(target, "socket:") {
			n++
		}
	}
	return n
}

func daemonFDs(t *testing.T, pid int, cacheDir string) int {
	t.Helper()
	n := 0
	for _, target := range fdTargets(pid) {
		if !strings.HasPrefix(target, cacheDir+"/") {
			n++
		}
	}
	return n
}

// fdTargets lists what the descriptors of process pid are.
func fdTargets(pid int) []string {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if len(ents) == 0 {
		return nil
	}
	var out []string
	for _, e := range ents {
		l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		out = append(out, l)
	}
	return out
}

func daemonRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`VmRSS:\s+(\d+) kB`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no VmRSS in /proc/%d/status", pid)
	}
	kb, _ := strconv.ParseInt(string(m[1]), 10, 64)
	return kb << 10
}

// goroutines reads go_goroutines from the daemon's metrics.
func goroutines(t *testing.T, addr string) int {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	n, ok := parseMetrics(string(b))["go_goroutines"]
	if !ok {
		t.Fatal("no go_goroutines in the metrics")
	}
	return int(n)
}

// attachLatencies returns the attach_ms of every "attached overlaybd image" line of the daemon's log.
func attachLatencies(t *testing.T, log string) []time.Duration {
	var out []time.Duration
	for _, m := range regexp.MustCompile(`msg="attached overlaybd image".* attach_ms=(\d+)`).FindAllStringSubmatch(log, -1) {
		ms, _ := strconv.Atoi(m[1])
		out = append(out, time.Duration(ms)*time.Millisecond)
	}
	slices.Sort(out)
	return out
}

func percentile(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, (len(sorted)*p+99)/100-1)]
}

// loopsOf lists the loop devices whose backing file is under dir.
func loopsOf(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		b, err := os.ReadFile(e)
		if err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), dir+"/") {
			out = append(out, e)
		}
	}
	return out
}
