package registry

import (
	"context"
	"net/http"
	"sync"
	"testing"
	"time"
)

// observation is one call of Options.Observer.
type observation struct {
	op     string
	status int
	bytes  int64
	err    error
}

type observations struct {
	mu   sync.Mutex
	list []observation
}

func (o *observations) observe(op string, status int, n int64, d time.Duration, err error) {
	if d < 0 {
		panic("negative duration")
	}
	o.mu.Lock()
	o.list = append(o.list, observation{op, status, n, err})
	o.mu.Unlock()
}

func (o *observations) get() []observation {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]observation(nil), o.list...)
}

func TestObserverSeesEveryAttempt(t *testing.T) {
	f := newFakeRegistry(t)
	_, dg := f.addBlob(70000)
	f.configure(func() {
		f.blobHook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			if n == 2 { // the first range GET (after the HEAD) fails once
				http.Error(w, "busy", http.StatusServiceUnavailable)
				return true
			}
			return false
		}
	})
	var obs observations
	c := testClient(t, func(o *Options) { o.Observer = obs.observe })
	b := mustBlob(t, c, f.host(), "app", dg, -1) // HEAD for the size
	p := make([]byte, 4096)
	if _, err := b.ReadAt(p, 100); err != nil {
		t.Fatal(err)
	}
	got := obs.get()
	if len(got) != 3 {
		t.Fatalf("observer calls %+v, want HEAD, 503, 206", got)
	}
	if got[0].op != "blob_head" || got[0].status != http.StatusOK {
		t.Errorf("first call %+v, want a HEAD with 200", got[0])
	}
	if got[1].op != "blob_range" || got[1].status != http.StatusServiceUnavailable {
		t.Errorf("second call %+v, want a range GET answered 503", got[1])
	}
	if got[2].op != "blob_range" || got[2].status != http.StatusPartialContent || got[2].bytes != 4096 || got[2].err != nil {
		t.Errorf("third call %+v, want a range GET of 4096 bytes answered 206", got[2])
	}
	var total int64
	for _, o := range got {
		total += o.bytes
	}
	if st := b.Stats(); total < st.BytesFetched || st.BytesFetched < int64(len(p)) { // the observer also counts error bodies
		t.Errorf("observer counted %d bytes, blob stats %+v", total, st)
	}
}

func TestObserverSeesUnansweredRequests(t *testing.T) {
	var obs observations
	c := testClient(t, func(o *Options) {
		o.Observer = obs.observe
		o.RetryBudget = 300 * time.Millisecond
	})
	// Nothing listens on port 1 of loopback.
	b, err := c.Blob(context.Background(), "127.0.0.1:1", "app", "sha256:"+fakeHex, 10)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.ReadAt(make([]byte, 5), 0); err == nil {
		t.Fatal("read from a dead registry succeeded")
	}
	got := obs.get()
	if len(got) == 0 {
		t.Fatal("no observer call for a refused connection")
	}
	for _, o := range got {
		if o.status != 0 || o.err == nil || o.op != "blob_range" {
			t.Errorf("observer call %+v, want status 0 with an error", o)
		}
	}
}

const fakeHex = "0000000000000000000000000000000000000000000000000000000000000000"

func TestObserverManifest(t *testing.T) {
	f := newFakeRegistry(t)
	f.configure(func() {
		f.manifests["v1"] = fakeManifest{mediaType: "application/vnd.oci.image.manifest.v1+json", data: []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}`)}
	})
	var obs observations
	c := testClient(t, func(o *Options) { o.Observer = obs.observe })
	if _, _, err := c.Resolve(context.Background(), f.host(), "app", "v1"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Resolve(context.Background(), f.host(), "app", "missing"); err == nil {
		t.Fatal("resolved a missing tag")
	}
	got := obs.get()
	if len(got) != 2 || got[0].op != "manifest" || got[0].status != 200 || got[0].bytes == 0 || got[1].status != 404 {
		t.Errorf("observer calls %+v, want a manifest 200 with bytes and a 404", got)
	}
}
