package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/testenv"
)

// metric returns the value of a series of o's registry, as the text format names it (name{label="value",…} with
// the labels sorted); a histogram's value is its count; a missing series is 0.
func metric(t *testing.T, o *ops, series string) float64 {
	t.Helper()
	mfs, err := o.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			name := mf.GetName()
			if len(labels) > 0 {
				name += "{" + strings.Join(labels, ",") + "}"
			}
			if name != series {
				continue
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				return float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return 0
}

func testOps(t testing.TB, mod func(*config.Config)) (*ops, *testenv.Buffer) {
	t.Helper()
	cfg := config.Default()
	cfg.Audit.SlowReadMS, cfg.Audit.HungReadMS = 20, 100
	if mod != nil {
		mod(&cfg)
	}
	var logs testenv.Buffer
	o, err := newOps(cfg, "/etc/obd/obd.toml", slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.close() })
	o.reads.known = func() map[string]string { return map[string]string{"7": "registry.test/app:obd"} }
	return o, &logs
}

func TestDeviceReadsAndAuditLog(t *testing.T) {
	o, logs := testOps(t, nil)
	// A fast read, a slow one, a failed one.
	o.reads.observe("7", 0, 4096)(4096, nil)
	done := o.reads.observe("7", 8192, 512)
	time.Sleep(30 * time.Millisecond)
	done(512, nil)
	o.reads.observe("7", 1<<20, 4096)(0, errors.New("layer sha256:ab: registry unavailable"))

	// A read that hangs: the watcher writes one audit line for it, and the gauge counts it.
	hung := o.reads.observe("7", 1<<30, 131072)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { o.reads.watch(ctx) })
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), "device read hung") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := metric(t, o, "obd_device_hung_reads"); got != 1 {
		t.Errorf("obd_device_hung_reads = %v, want 1", got)
	}
	counts, all := o.reads.counts()
	if c := counts["7"]; c.reads != 3 || c.errors != 1 || c.slow != 1 || c.inflight != 1 || c.hung != 1 || all.reads != 3 {
		t.Errorf("counts %+v, all %+v", c, all)
	}
	time.Sleep(250 * time.Millisecond) // more watch rounds: the hung read is reported once
	hung(131072, nil)
	cancel()
	wg.Wait()

	if got := metric(t, o, "obd_device_reads_total"); got != 4 {
		t.Errorf("obd_device_reads_total = %v, want 4", got)
	}
	if got := metric(t, o, "obd_device_read_errors_total"); got != 1 {
		t.Errorf("obd_device_read_errors_total = %v, want 1", got)
	}
	if got := metric(t, o, "obd_device_slow_reads_total"); got < 2 {
		t.Errorf("obd_device_slow_reads_total = %v, want the slow and the hung read", got)
	}
	audit := logs.String()
	if n := strings.Count(audit, "device read hung"); n != 1 {
		t.Errorf("%d hung lines, want 1:\n%s", n, audit)
	}
	for _, line := range strings.Split(strings.TrimSpace(audit), "\n") {
		if !strings.Contains(line, "image=registry.test/app:obd") || !strings.Contains(line, "image_id=7") || !strings.Contains(line, "audit=true") {
			t.Errorf("audit line does not name the image: %s", line)
		}
	}
	if !strings.Contains(audit, `msg="slow device read"`) || !strings.Contains(audit, "offset=8192 length=512") || strings.Contains(audit, "offset=0 ") {
		t.Errorf("audit log:\n%s\nwant the slow read (and not the fast one)", audit)
	}
}

func TestAuditLogFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log", "audit.log")
	o, logs := testOps(t, func(c *config.Config) { c.Audit.Path, c.Audit.SlowReadMS = path, 1 })
	done := o.reads.observe("7", 4096, 4096)
	time.Sleep(5 * time.Millisecond)
	done(4096, nil)
	o.close()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "slow device read") || !strings.Contains(string(b), "image=registry.test/app:obd") {
		t.Errorf("audit file: %q", b)
	}
	if logs.String() != "" {
		t.Errorf("audit lines also in the daemon log: %s", logs)
	}

	if _, err := newOps(func() config.Config { c := config.Default(); c.Audit.Path = "/proc/no/such/audit.log"; return c }(), "obd.toml", slog.New(slog.DiscardHandler)); err == nil ||
		!strings.Contains(err.Error(), "audit.path") {
		t.Errorf("unwritable audit path: %v", err)
	}
}

func TestRegistryAndGRPCMetrics(t *testing.T) {
	o, _ := testOps(t, nil)
	o.observeRegistry("blob_range", http.StatusPartialContent, 4096, 3*time.Millisecond, nil)
	o.observeRegistry("blob_range", http.StatusServiceUnavailable, 5, time.Millisecond, nil)
	o.observeRegistry("blob_range", 0, 0, time.Millisecond, io.ErrUnexpectedEOF)
	if got := metric(t, o, `obd_registry_bytes_total{op="blob_range"}`); got != 4101 {
		t.Errorf("obd_registry_bytes_total = %v", got)
	}
	for class, want := range map[string]float64{"2xx": 0, "5xx": 1, "error": 1} {
		if got := metric(t, o, `obd_registry_errors_total{class="`+class+`",op="blob_range"}`); got != want {
			t.Errorf("obd_registry_errors_total{class=%q} = %v, want %v", class, got, want)
		}
	}

	info := &grpc.UnaryServerInfo{FullMethod: "/containerd.services.snapshots.v1.Snapshots/Prepare"}
	handler := func(err error) grpc.UnaryHandler {
		return func(context.Context, any) (any, error) { return nil, err }
	}
	ctx := context.Background()
	o.unaryInterceptor(ctx, nil, info, handler(nil))
	o.unaryInterceptor(ctx, nil, info, handler(grpcstatus.Error(codes.AlreadyExists, "target snapshot exists")))
	o.unaryInterceptor(ctx, nil, info, handler(grpcstatus.Error(codes.Unknown, "mount image registry.test/app:obd: layer sha256:ab: 401")))
	if got := metric(t, o, `obd_grpc_requests_total{method="Prepare"}`); got != 3 {
		t.Errorf("obd_grpc_requests_total = %v, want 3", got)
	}
	if got := metric(t, o, `obd_grpc_errors_total{code="Unknown",method="Prepare"}`); got != 1 {
		t.Errorf("obd_grpc_errors_total{code=Unknown} = %v", got)
	}
}

func TestMetricsPortInUse(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	o, _ := testOps(t, func(c *config.Config) { c.Metrics.Address = busy.Addr().String() })
	dir := testenv.SocketDir(t)
	sc := config.Snapshotter{Address: filepath.Join(dir, "sn.sock")}
	stop, err := o.startServers(context.Background(), nil, sc)
	if err == nil {
		stop()
		t.Fatal("metrics served on a port in use")
	}
	if !strings.Contains(err.Error(), busy.Addr().String()) || !strings.Contains(err.Error(), "[metrics] address") {
		t.Errorf("error %q: want the address and the key to change", err)
	}
	if _, err := os.Stat(sc.StatusSocket()); !os.IsNotExist(err) {
		t.Errorf("status socket left behind: %v", err)
	}
}
