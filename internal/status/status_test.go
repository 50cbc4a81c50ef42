package status

import (
	"context"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/testenv"
)

func TestClient(t *testing.T) {
	dir := testenv.SocketDir(t)
	ctx := context.Background()

	missing := filepath.Join(dir, "missing.sock")
	if err := NewClient(missing, time.Second).Healthz(ctx); !errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing socket: %v", err)
	}

	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := NewClient(stale, time.Second).Status(ctx); !errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), "stopped") {
		t.Errorf("stale socket: %v", err)
	}

	live := filepath.Join(dir, "live.sock")
	l, err = net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "metadata store closed", http.StatusServiceUnavailable)
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte(`{"version":"v1","pid":3,"images":[{"id":"1"}]}`))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(l)
	}()
	defer func() {
		srv.Close()
		<-done
	}()
	c := NewClient(live, time.Second)
	if err := c.Healthz(ctx); err == nil || errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), "metadata store closed") {
		t.Errorf("unhealthy daemon: %v", err)
	}
	st, err := c.Status(ctx)
	if err != nil || st.Version != "v1" || st.PID != 3 || len(st.Images) != 1 {
		t.Errorf("status %+v, %v", st, err)
	}
}

func TestHitRatio(t *testing.T) {
	if HitRatio(0, 0) != nil {
		t.Error("ratio of nothing")
	}
	if r := HitRatio(3, 1); r == nil || *r != 0.75 {
		t.Errorf("HitRatio(3, 1) = %v", r)
	}
	if Version() == "" || GoVersion() == "" {
		t.Error("no version")
	}
}
