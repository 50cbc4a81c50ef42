package mounter

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/obdproject/obd/internal/atomicfile"
	"github.com/obdproject/obd/trace"
)

// recording records an image's layer reads into a trace file with upstream's protocol: while it runs, PATH.lock
// exists; removing it (or detaching the image) writes the trace to PATH and creates PATH.ok.
type recording struct {
	path string
	r    *trace.Recorder
	log  *slog.Logger
	stop chan struct{}
	once sync.Once
	done chan struct{}
	// wrote is set once the trace is written: the recording is over.
	wrote atomic.Bool
}

// written reports whether the recording is over: its trace is written.
func (rc *recording) written() bool { return rc.wrote.Load() }

// lockPollInterval is how often a recording looks for the removal of its lock file.
const lockPollInterval = 200 * time.Millisecond

func newRecording(path string, log *slog.Logger) *recording {
	rc := &recording{path: path, r: trace.NewRecorder(), log: log, stop: make(chan struct{}), done: make(chan struct{})}
	if err := os.WriteFile(path+".lock", nil, 0o644); err != nil {
		log.Warn("cannot create the trace's lock file: the trace is written when the image is detached", "path", path, "err", err)
	}
	log.Info("recording the image's layer reads", "trace", path)
	go func() {
		defer close(rc.done)
		t := time.NewTicker(lockPollInterval)
		defer t.Stop()
		for {
			select {
			case <-rc.stop:
				return
			case <-t.C:
				if _, err := os.Stat(path + ".lock"); errors.Is(err, os.ErrNotExist) {
					rc.write()
					return
				}
			}
		}
	}()
	return rc
}

// finish ends the recording (the image is detached) and writes the trace if the lock did not already.
func (rc *recording) finish() {
	close(rc.stop)
	<-rc.done
	rc.write()
	_ = os.Remove(rc.path + ".lock")
}

// write writes the trace once: PATH, then obd's PATH.times.json (when each record was first read), then PATH.ok.
func (rc *recording) write() {
	rc.once.Do(func() {
		defer rc.wrote.Store(true)
		recs, at, dropped := rc.r.Records()
		var buf bytes.Buffer
		err := trace.Encode(&buf, recs)
		if err == nil {
			err = atomicfile.Write(rc.path, buf.Bytes(), 0o644)
		}
		if err == nil {
			var times []byte
			if times, err = json.Marshal(trace.NewTimes(rc.r.Started(), at, dropped)); err == nil {
				err = atomicfile.Write(rc.path+trace.TimesSuffix, times, 0o644)
			}
		}
		if err == nil {
			err = os.WriteFile(rc.path+".ok", nil, 0o644)
		}
		if err != nil {
			rc.log.Error("cannot write the recorded trace", "trace", rc.path, "err", err)
			return
		}
		rc.log.Info("recorded trace written", "trace", rc.path, "records", len(recs), "dropped", dropped)
	})
}
