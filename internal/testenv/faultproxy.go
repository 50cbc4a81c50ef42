package testenv

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// Fault is what a FaultProxy does to a blob range request instead of relaying the registry's answer faithfully.
type Fault string

// The faults of a FaultProxy; each mimics a misbehaving registry, proxy or network.
const (
	FaultWrongRange   Fault = "wrong-range" // 206 with the Content-Range asked for, but the bytes of another offset
	FaultCorrupt      Fault = "corrupt"     // 206 with every byte of the body flipped
	FaultShort        Fault = "short-206"   // 206 with the Content-Range asked for and a complete body one byte short
	FaultLong         Fault = "long-206"    // 206 whose body (chunked, no length) runs past the range asked for
	FaultTruncate     Fault = "truncated"   // 206 announcing the whole range, half the body, then the connection drops
	FaultReset        Fault = "reset"       // the connection is reset before any answer
	FaultHang         Fault = "hang"        // no answer until the client gives up
	FaultUnauthorized Fault = "401"         // 401, as when the registry's credentials were rotated
	FaultUnavailable  Fault = "503"         // 503 Service Unavailable
	FaultNone         Fault = ""            // relay faithfully

	wrongRangeShift = int64(4096) // how far FaultWrongRange moves the range
	longExtra       = 1000        // bytes FaultLong sends past the range
)

// AllFaults lists every Fault but FaultNone.
var AllFaults = []Fault{FaultWrongRange, FaultCorrupt, FaultShort, FaultLong, FaultTruncate, FaultReset, FaultHang,
	FaultUnauthorized, FaultUnavailable}

// FaultProxy is an HTTP proxy on loopback in front of a registry. It relays everything, except that the blob range
// GETs it is told to spoil get a Fault instead. TCP stays end to end per request (it is a reverse proxy on
// loopback: it exists to inject faults, not to model a link).
type FaultProxy struct {
	srv      *httptest.Server
	upstream string
	client   *http.Client
	stop     chan struct{}

	mu    sync.Mutex
	fault Fault
	left  int // range GETs still to spoil; negative: all

	// RangeGets counts the blob range GETs that reached the proxy; Spoiled those that got a fault.
	RangeGets, Spoiled atomic.Int64
}

// NewFaultProxy starts a FaultProxy in front of the registry at upstream (host:port, plain HTTP). It stops when
// the test ends.
func NewFaultProxy(t testing.TB, upstream string) *FaultProxy {
	t.Helper()
	p := &FaultProxy{upstream: upstream, stop: make(chan struct{}), client: &http.Client{
		Transport:     &http.Transport{Proxy: nil, DisableCompression: true},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
	p.srv = httptest.NewServer(http.HandlerFunc(p.serve))
	t.Cleanup(func() {
		close(p.stop) // releases hung requests
		p.srv.Close()
	})
	return p
}

// Host returns the proxy's host:port.
func (p *FaultProxy) Host() string { return strings.TrimPrefix(p.srv.URL, "http://") }

// Spoil makes the next n blob range GETs (all of them when n < 0) get fault f; FaultNone relays faithfully again.
func (p *FaultProxy) Spoil(f Fault, n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fault, p.left = f, n
}

// take returns the fault for the next range GET.
func (p *FaultProxy) take() Fault {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fault == FaultNone || p.left == 0 {
		return FaultNone
	}
	if p.left > 0 {
		p.left--
	}
	return p.fault
}

func (p *FaultProxy) serve(w http.ResponseWriter, r *http.Request) {
	rng := r.Header.Get("Range")
	first, last, isRange := parseByteRange(rng)
	f := FaultNone
	if r.Method == http.MethodGet && isRange && strings.Contains(r.URL.Path, "/blobs/") {
		p.RangeGets.Add(1)
		if f = p.take(); f != FaultNone {
			p.Spoiled.Add(1)
		}
	}
	switch f {
	case FaultReset:
		resetConn(w)
		return
	case FaultHang:
		select {
		case <-r.Context().Done():
		case <-p.stop:
		}
		return
	case FaultUnauthorized:
		w.Header().Set("WWW-Authenticate", `Basic realm="obd-test"`)
		http.Error(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`, http.StatusUnauthorized)
		return
	case FaultUnavailable:
		http.Error(w, "spoiled by the fault proxy", http.StatusServiceUnavailable)
		return
	case FaultWrongRange:
		shift := wrongRangeShift
		if first >= shift {
			shift = -shift
		}
		r.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", first+shift, last+shift))
	}
	resp, body, err := p.relay(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	for k, vs := range resp.Header {
		w.Header()[k] = vs
	}
	if f == FaultNone || resp.StatusCode != http.StatusPartialContent {
		w.WriteHeader(resp.StatusCode)
		_, _ = w.Write(body)
		return
	}
	want := last - first + 1
	w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%s", first, last, totalOf(resp.Header.Get("Content-Range"))))
	switch f {
	case FaultWrongRange:
		// Near the end of the blob the shifted range is shorter: pad it with the bytes it has.
		for len(body) < int(want) && len(body) > 0 {
			body = append(body, body[:min(len(body), int(want)-len(body))]...)
		}
		w.Header().Set("Content-Length", strconv.FormatInt(want, 10))
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(body[:want])
	case FaultCorrupt:
		for i := range body {
			body[i] ^= 0xa5
		}
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(body)
	case FaultShort:
		w.Header().Set("Content-Length", strconv.Itoa(len(body)-1))
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(body[:len(body)-1])
	case FaultLong:
		w.Header().Del("Content-Length")
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(body)
		w.(http.Flusher).Flush() // chunked from here on
		_, _ = w.Write(bytes.Repeat([]byte{0xee}, longExtra))
	case FaultTruncate:
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(body[:len(body)/2])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // drops the connection mid-body
	}
}

// relay sends r to the upstream registry and reads the whole answer.
func (p *FaultProxy) relay(r *http.Request) (*http.Response, []byte, error) {
	out, err := http.NewRequestWithContext(r.Context(), r.Method, "http://"+p.upstream+r.URL.RequestURI(), r.Body)
	if err != nil {
		return nil, nil, err
	}
	out.Header = r.Header.Clone()
	out.ContentLength = r.ContentLength
	resp, err := p.client.Do(out)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}

// resetConn closes the client's connection with a TCP reset.
func resetConn(w http.ResponseWriter) {
	conn, _, err := w.(http.Hijacker).Hijack()
	if err != nil {
		return
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	conn.Close()
}

// parseByteRange parses "bytes=FIRST-LAST".
func parseByteRange(s string) (first, last int64, ok bool) {
	a, b, ok := strings.Cut(strings.TrimPrefix(s, "bytes="), "-")
	if !ok || !strings.HasPrefix(s, "bytes=") {
		return 0, 0, false
	}
	first, err1 := strconv.ParseInt(a, 10, 64)
	last, err2 := strconv.ParseInt(b, 10, 64)
	return first, last, err1 == nil && err2 == nil && first <= last
}

// totalOf returns the total of a Content-Range value ("bytes a-b/total"), or "*".
func totalOf(cr string) string {
	if _, t, ok := strings.Cut(cr, "/"); ok {
		return t
	}
	return "*"
}
