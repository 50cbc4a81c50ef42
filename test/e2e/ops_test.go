package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/status"
)

// TestOperability runs a lazily pulled container, then checks what an operator sees: the Prometheus metrics,
// 'obd status' and 'obd health' against the sandbox's daemons.
func TestOperability(t *testing.T) {
	sb := startSandbox(t)
	ctx := context.Background()
	ref := sb.Registry + "/hello:obd"
	pushLayout(t, helloLayout, "amd64-converted", ref)
	obd(t, sb, "pull", ref)
	if out := run(t, sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", ref, "hello-ops")); !strings.Contains(out, helloOutput) {
		t.Fatalf("hello-world printed %q", out)
	}

	t.Run("metrics", func(t *testing.T) {
		resp, err := http.Get("http://" + sb.Metrics + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		m := parseMetrics(string(body))
		for _, name := range []string{
			`obd_registry_bytes_total{op="blob_range"}`,
			`obd_registry_requests_total{class="2xx",op="blob_range"}`,
			`obd_cache_misses_total`,
			`obd_cache_fetched_bytes_total`,
			`obd_device_reads_total`,
			`obd_device_read_bytes_total`,
			`obd_device_read_duration_seconds_count`,
			`obd_grpc_requests_total{method="Prepare"}`,
			`obd_grpc_request_duration_seconds_count{method="Prepare"}`,
			`obd_images{mode="lazy",state="attached"}`,
		} {
			if m[name] <= 0 {
				t.Errorf("metric %s = %v, want > 0", name, m[name])
			}
		}
		if t.Failed() {
			t.Logf("metrics:\n%s", body)
		}
	})

	t.Run("obd status", func(t *testing.T) {
		out := run(t, exec.Command(bins.obd, "status", "--json", "--socket", sb.StatusSocket))
		var st status.Status
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		var img *status.Image
		for i := range st.Images {
			if st.Images[i].ImageRef == ref {
				img = &st.Images[i]
			}
		}
		if img == nil {
			t.Fatalf("obd status lists no image %s:\n%s", ref, out)
		}
		if img.Mode != status.ModeLazy || img.State != status.StateAttached || img.BytesFetched <= 0 || img.Reads <= 0 ||
			len(img.Layers) != 1 || img.Layers[0].Source != "remote" || img.CacheHitRatio == nil || img.Device == "" {
			t.Errorf("image %+v: want a lazy attached image with bytes fetched, reads, cache counters and a device", *img)
		}
		if st.Cache.UsedBytes <= 0 || st.Config.Address != sb.SnapshotterSocket || st.Reads.Total <= 0 {
			t.Errorf("status header %+v / %+v / %+v", st.Config, st.Cache, st.Reads)
		}
		table := run(t, exec.Command(bins.obd, "status", "--socket", sb.StatusSocket))
		if !strings.Contains(table, ref) || !strings.Contains(table, "lazy") || !strings.Contains(table, "attached") {
			t.Errorf("obd status printed:\n%s", table)
		}
		t.Logf("obd status:\n%s", table)
	})

	t.Run("obd health", func(t *testing.T) {
		cmd := exec.Command(bins.obd, "health", "-v", "--config", sb.ConfigFile(), "--containerd-config", filepath.Join(sb.Dir, "containerd.toml"),
			"--containerd-address", sb.Containerd, "--credentials", filepath.Join(sb.Dir, "no-credentials.json"))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("obd health against the sandbox: %v\n%s", err, out)
		}
		for _, want := range []string{"snapshotter status", "containerd", "1 lazy"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("obd health printed no %q:\n%s", want, out)
			}
		}
		t.Logf("obd health:\n%s", out)
	})
}

// parseMetrics reads the samples of a Prometheus text exposition: series (name and labels as printed) → value.
func parseMetrics(text string) map[string]float64 {
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}
