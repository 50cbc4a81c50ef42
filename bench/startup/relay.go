package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// relay is a TCP relay that holds every chunk of data it forwards, in each direction, for a fixed delay before
// writing it on: a propagation delay of 2×delay per round trip, with no effect on throughput (chunks are released in
// order as they fall due, and a bounded queue per direction keeps memory flat). It listens inside a network
// namespace and dials its upstream from the host's namespace.
type relay struct {
	ln       net.Listener
	upstream string
	delay    time.Duration
	mu       sync.Mutex
	conns    map[net.Conn]bool
	wg       sync.WaitGroup
	closed   bool
}

const (
	relayChunk = 64 << 10
	relayQueue = 64 // chunks per direction: at most 4 MiB in flight inside the relay
)

var chunkPool = sync.Pool{New: func() any { b := make([]byte, relayChunk); return &b }}

// startRelay listens on addr inside the network namespace at nsPath and forwards each connection to upstream.
func startRelay(nsPath, addr, upstream string, delay time.Duration) (*relay, error) {
	ln, err := listenInNetns(nsPath, addr)
	if err != nil {
		return nil, err
	}
	r := &relay{ln: ln, upstream: upstream, delay: delay, conns: map[net.Conn]bool{}}
	r.wg.Add(1)
	go r.serve()
	return r, nil
}

// listenInNetns opens a listening socket in another network namespace: the socket belongs to the namespace of the
// thread that created it, and keeps it after the thread switches back.
func listenInNetns(nsPath, addr string) (net.Listener, error) {
	runtime.LockOSThread()
	orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer orig.Close()
	target, err := os.Open(nsPath)
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("setns %s: %w", nsPath, err)
	}
	ln, lerr := net.Listen("tcp", addr)
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		// The thread stays locked and in the wrong namespace: the runtime ends it when this goroutine exits.
		if ln != nil {
			ln.Close()
		}
		return nil, fmt.Errorf("setns back to the host namespace: %w", err)
	}
	runtime.UnlockOSThread()
	return ln, lerr
}

// Addr is the relay's listening address.
func (r *relay) Addr() string { return r.ln.Addr().String() }

func (r *relay) serve() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		if !r.track(c, true) {
			c.Close()
			return
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			defer r.track(c, false)
			r.handle(c)
		}()
	}
}

func (r *relay) track(c net.Conn, add bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if add {
		if r.closed {
			return false
		}
		r.conns[c] = true
	} else {
		delete(r.conns, c)
	}
	return true
}

func (r *relay) handle(down net.Conn) {
	defer down.Close()
	up, err := net.DialTimeout("tcp", r.upstream, 10*time.Second)
	if err != nil {
		return
	}
	if !r.track(up, true) {
		up.Close()
		return
	}
	defer r.track(up, false)
	defer up.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); r.pipe(up, down) }()
	go func() { defer wg.Done(); r.pipe(down, up) }()
	wg.Wait()
}

type chunk struct {
	buf *[]byte
	n   int
	due time.Time
}

// pipe copies src to dst, each chunk no earlier than delay after it was read. At src's EOF it half-closes dst;
// on a write error it closes src so the reader stops.
func (r *relay) pipe(dst, src net.Conn) {
	q := make(chan chunk, relayQueue)
	go func() {
		defer close(q)
		for {
			b := chunkPool.Get().(*[]byte)
			n, err := src.Read(*b)
			if n > 0 {
				q <- chunk{buf: b, n: n, due: time.Now().Add(r.delay)}
			} else {
				chunkPool.Put(b)
			}
			if err != nil {
				return
			}
		}
	}()
	failed := false
	for c := range q {
		if !failed {
			if d := time.Until(c.due); d > 0 {
				time.Sleep(d)
			}
			if _, err := dst.Write((*c.buf)[:c.n]); err != nil {
				failed = true
				src.Close()
			}
		}
		chunkPool.Put(c.buf)
	}
	if tc, ok := dst.(*net.TCPConn); ok && !failed {
		tc.CloseWrite()
	}
}

// Close stops accepting, closes every connection and waits for the relay's goroutines.
func (r *relay) Close() error {
	r.mu.Lock()
	r.closed = true
	err := r.ln.Close()
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

var _ io.Closer = (*relay)(nil)
