package node

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"

	"github.com/containerd/log"
)

// levelTrace is the slog level of log level "trace": containerd's trace lines (the daemon's own code logs none).
const levelTrace = slog.LevelDebug - 4

// ParseLevel returns the slog level of a [snapshotter] log_level: trace, debug, info, warn or error (containerd's
// names, so also warning, fatal and panic).
func ParseLevel(name string) (slog.Level, error) {
	switch strings.ToLower(name) {
	case "trace":
		return levelTrace, nil
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error", "fatal", "panic":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("log level %q: want trace, debug, info, warn or error", name)
}

// RouteContainerdLog sends the lines that containerd's libraries log (github.com/containerd/log, a process-wide
// logrus logger) to l's handler, at the levels l has enabled when it is called, so that the daemon writes one log
// format. Call it once, at start-up.
func RouteContainerdLog(l *slog.Logger) {
	ctx := context.Background()
	level := log.ErrorLevel
	for _, lv := range []struct {
		slog slog.Level
		log  log.Level
	}{{slog.LevelWarn, log.WarnLevel}, {slog.LevelInfo, log.InfoLevel}, {slog.LevelDebug, log.DebugLevel}, {levelTrace, log.TraceLevel}} {
		if l.Enabled(ctx, lv.slog) {
			level = lv.log
		}
	}
	log.L.Logger.SetLevel(level)
	log.L.Logger.SetOutput(io.Discard)
	log.L.Logger.AddHook(slogHook{l.Handler()})
}

// slogHook is a logrus hook that hands every entry to a slog handler.
type slogHook struct{ h slog.Handler }

func (slogHook) Levels() []log.Level {
	return []log.Level{log.PanicLevel, log.FatalLevel, log.ErrorLevel, log.WarnLevel, log.InfoLevel, log.DebugLevel, log.TraceLevel}
}

func (h slogHook) Fire(e *log.Entry) error {
	level := slog.LevelError
	switch e.Level {
	case log.WarnLevel:
		level = slog.LevelWarn
	case log.InfoLevel:
		level = slog.LevelInfo
	case log.DebugLevel:
		level = slog.LevelDebug
	case log.TraceLevel:
		level = levelTrace
	}
	ctx := e.Context
	if ctx == nil {
		ctx = context.Background()
	}
	if !h.h.Enabled(ctx, level) {
		return nil
	}
	r := slog.NewRecord(e.Time, level, e.Message, 0)
	for _, k := range slices.Sorted(maps.Keys(e.Data)) {
		r.AddAttrs(slog.Any(k, e.Data[k]))
	}
	return h.h.Handle(ctx, r)
}
