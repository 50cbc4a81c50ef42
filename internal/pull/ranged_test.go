package pull

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/registry"
)

// blobServer serves one blob with range requests and counts them and how many ran at once.
type blobServer struct {
	data             []byte
	requests, active atomic.Int64
	mu               sync.Mutex
	maxActive        int64
	fail             atomic.Bool
	// slowFirst holds the request for the blob's first bytes until it is closed.
	slowFirst chan struct{}
	// doneBeforeFirst counts the requests answered while the first one was held.
	doneBeforeFirst atomic.Int64
}

func (s *blobServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasPrefix(r.URL.Path, "/v2/repo/blobs/") {
		http.NotFound(w, r)
		return
	}
	n := s.active.Add(1)
	defer s.active.Add(-1)
	s.mu.Lock()
	s.maxActive = max(s.maxActive, n)
	s.mu.Unlock()
	s.requests.Add(1)
	if s.slowFirst != nil {
		if strings.HasPrefix(r.Header.Get("Range"), "bytes=0-") {
			<-s.slowFirst
		} else {
			defer s.doneBeforeFirst.Add(1)
		}
	}
	time.Sleep(5 * time.Millisecond) // let requests overlap
	if s.fail.Load() {
		http.Error(w, "not found", http.StatusNotFound)
		return
	}
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(s.data))
}

func TestRangedReader(t *testing.T) {
	data := make([]byte, 10<<20+123)
	rand.Read(data)
	srv := &blobServer{data: data}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	host := strings.TrimPrefix(ts.URL, "http://")
	c, err := registry.New(registry.Options{PlainHTTP: true, RetryBudget: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b, err := c.Blob(context.Background(), host, "repo", digest.FromBytes(data), int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}

	var progress atomic.Int64
	r := newRangedReader(context.Background(), b, 1<<20, 3, 2, func(n int64) { progress.Add(n) })
	got, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	if !bytes.Equal(got, data) {
		t.Fatal("the ranged download differs from the blob")
	}
	if n := srv.requests.Load(); n != 11 {
		t.Errorf("%d range requests for 11 chunks", n)
	}
	if srv.maxActive < 2 || srv.maxActive > 3 {
		t.Errorf("%d requests ran at once, want 2 to 3", srv.maxActive)
	}
	if progress.Load() != int64(len(data)) {
		t.Errorf("progress reported %d of %d bytes", progress.Load(), len(data))
	}

	// A slow request does not hold the others up: while the first chunk is held, the requests that finish are
	// replaced until the chunks ahead of the reader fill the window (3 in flight + 2 waiting).
	slow := &blobServer{data: data, slowFirst: make(chan struct{})}
	ts2 := httptest.NewServer(slow)
	defer ts2.Close()
	b2, err := c.Blob(context.Background(), strings.TrimPrefix(ts2.URL, "http://"), "repo", digest.FromBytes(data), int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	r = newRangedReader(context.Background(), b2, 1<<20, 3, 2, nil)
	done := make(chan []byte)
	go func() {
		got, _ := io.ReadAll(r)
		done <- got
	}()
	for deadline := time.Now().Add(10 * time.Second); slow.doneBeforeFirst.Load() < 4 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // no more may start
	if n := slow.doneBeforeFirst.Load(); n != 4 {
		t.Errorf("%d requests finished while the first was held, want 4 (2 in flight beside it and 2 ahead)", n)
	}
	close(slow.slowFirst)
	if got := <-done; !bytes.Equal(got, data) {
		t.Fatal("the ranged download with a slow first chunk differs from the blob")
	}
	r.Close()

	// A failing chunk fails the stream; it never ends as if complete.
	srv.fail.Store(true)
	r = newRangedReader(context.Background(), b, 1<<20, 3, 2, nil)
	if _, err := io.ReadAll(r); err == nil {
		t.Fatal("a failed range ended the stream without an error")
	}
	r.Close()

	// Close in the middle stops the requests in flight and returns.
	srv.fail.Store(false)
	r = newRangedReader(context.Background(), b, 1<<20, 3, 2, nil)
	if _, err := io.ReadFull(r, make([]byte, 1<<20+1)); err != nil {
		t.Fatal(err)
	}
	r.Close()
	// A cancelled context ends the stream with its error.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r = newRangedReader(ctx, b, 1<<20, 3, 2, nil)
	if _, err := io.ReadAll(r); err == nil {
		t.Fatal("a cancelled download ended without an error")
	}
	r.Close()
}
