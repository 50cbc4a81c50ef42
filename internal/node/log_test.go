package node

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/containerd/log"

	"github.com/obdproject/obd/internal/testenv"
)

func TestParseLevel(t *testing.T) {
	for name, want := range map[string]slog.Level{"trace": levelTrace, "debug": slog.LevelDebug, "info": slog.LevelInfo,
		"warn": slog.LevelWarn, "Warning": slog.LevelWarn, "error": slog.LevelError, "panic": slog.LevelError} {
		if got, err := ParseLevel(name); err != nil || got != want {
			t.Errorf("ParseLevel(%q) = %v, %v; want %v", name, got, err, want)
		}
	}
	if _, err := ParseLevel("loud"); err == nil || !strings.Contains(err.Error(), `"loud"`) {
		t.Errorf("ParseLevel(loud): %v", err)
	}
}

// TestRouteContainerdLog checks that the lines containerd's libraries log reach the daemon's handler, in its
// format and at its level.
func TestRouteContainerdLog(t *testing.T) {
	var buf testenv.Buffer
	RouteContainerdLog(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})))
	ctx := context.Background()
	log.G(ctx).WithError(errors.New("disk full")).WithField("path", "/x").Warn("failed to remove directory")
	log.G(ctx).Debug("not at info")
	got := buf.String()
	if !strings.HasPrefix(got, "time=") || !strings.HasSuffix(got, ` level=WARN msg="failed to remove directory" error="disk full" path=/x`+"\n") {
		t.Errorf("routed lines:\n%s", got)
	}
}
