package device

import (
	"errors"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/testenv"
)

// readLog records the calls of a ReadObserver.
type readLog struct {
	mu    sync.Mutex
	start []string // device ids
	reads []observedRead
}

type observedRead struct {
	off, length int64
	n           int
	err         error
}

func (l *readLog) observe(id string, off, length int64) func(int, error) {
	l.mu.Lock()
	l.start = append(l.start, id)
	l.mu.Unlock()
	return func(n int, err error) {
		l.mu.Lock()
		l.reads = append(l.reads, observedRead{off, length, n, err})
		l.mu.Unlock()
	}
}

func (l *readLog) get() ([]string, []observedRead) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.start...), append([]observedRead(nil), l.reads...)
}

func TestReadObserver(t *testing.T) {
	needSystem(t)
	var obs readLog
	log, _ := testLogger(t)
	b := &failingBackend{Backend: &memBackend{data: make([]byte, 4<<20)}}
	id := uniqueID(t, 0)
	dev := attach(t, NewFuseLoop(log, WithReadObserver(obs.observe)), id, b, AttachOptions{ReadOnly: true, StateDir: t.TempDir()})

	fd, err := unix.Open(dev.Path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	testenv.Within(t, 30*time.Second, "O_DIRECT reads", func() {
		if _, err := unix.Pread(fd, alignedBuffer(8192), 1<<20); err != nil {
			t.Errorf("read: %v", err)
		}
		b.fail.Store(true)
		if _, err := unix.Pread(fd, alignedBuffer(4096), 2<<20); !errors.Is(err, syscall.EIO) {
			t.Errorf("read of a failing backend: %v, want EIO", err)
		}
	})
	ids, reads := obs.get()
	if len(ids) != len(reads) || len(reads) < 2 {
		t.Fatalf("observer: %d starts, reads %+v", len(ids), reads)
	}
	var ok, failed bool
	for i, r := range reads {
		if ids[i] != id {
			t.Errorf("read of device %q, want %q", ids[i], id)
		}
		switch {
		case r.err == nil && r.off >= 1<<20 && r.off < 1<<20+8192 && r.n == int(r.length):
			ok = true
		case r.err != nil && r.off <= 2<<20 && r.off+r.length > 2<<20 && r.n == 0:
			failed = true
		}
	}
	if !ok || !failed {
		t.Errorf("observed reads %+v: want the served read with a nil error and the failed one with its error", reads)
	}
}
