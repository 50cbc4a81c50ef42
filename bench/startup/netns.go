package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// inNetns runs f on an OS thread switched into the named network namespace (ip netns): a socket f opens belongs
// to that namespace for its lifetime, whichever thread uses it later. A thread that cannot be switched back stays
// locked to its goroutine and the runtime discards it when the goroutine exits.
func inNetns(ns string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		target, err := os.Open(filepath.Join("/run/netns", ns))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		ferr := f()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("setns back from %s: %w", ns, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// frontDoor is the registry's address on the far side of the router: it listens inside the registry namespace
// and splices each connection, unchanged and without delay, to the registry on the host's loopback (dialled from
// the host's namespace). A client's TCP connection ends at this socket, so both ends of it see the whole path.
type frontDoor struct {
	ln       net.Listener
	upstream string
	mu       sync.Mutex
	conns    map[net.Conn]bool
	closed   bool
	wg       sync.WaitGroup
}

// openFrontDoor listens on addr inside the network namespace ns and forwards each connection to upstream.
func openFrontDoor(ns, addr, upstream string) (*frontDoor, error) {
	var ln net.Listener
	if err := inNetns(ns, func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		if ln != nil {
			ln.Close()
		}
		return nil, err
	}
	d := &frontDoor{ln: ln, upstream: upstream, conns: map[net.Conn]bool{}}
	d.wg.Add(1)
	go d.serve()
	return d, nil
}

func (d *frontDoor) serve() {
	defer d.wg.Done()
	for {
		c, err := d.ln.Accept()
		if err != nil {
			return
		}
		if !d.track(c, true) {
			c.Close()
			return
		}
		d.wg.Add(1)
		go func() {
			defer d.wg.Done()
			defer d.track(c, false)
			defer c.Close()
			d.handle(c)
		}()
	}
}

func (d *frontDoor) track(c net.Conn, add bool) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !add {
		delete(d.conns, c)
		return true
	}
	if d.closed {
		return false
	}
	d.conns[c] = true
	return true
}

func (d *frontDoor) handle(down net.Conn) {
	up, err := net.DialTimeout("tcp", d.upstream, 10*time.Second)
	if err != nil {
		return
	}
	if !d.track(up, true) {
		up.Close()
		return
	}
	defer d.track(up, false)
	defer up.Close()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); splice(up, down) }()
	go func() { defer wg.Done(); splice(down, up) }()
	wg.Wait()
}

// splice copies src to dst and half-closes dst at src's end; on an error it closes both, which ends the other
// direction too.
func splice(dst, src net.Conn) {
	if _, err := io.Copy(dst, src); err != nil {
		src.Close()
		dst.Close()
		return
	}
	if tc, ok := dst.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
}

// Close stops accepting, closes every connection and waits for the front door's goroutines.
func (d *frontDoor) Close() error {
	d.mu.Lock()
	d.closed = true
	err := d.ln.Close()
	for c := range d.conns {
		c.Close()
	}
	d.mu.Unlock()
	d.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}
