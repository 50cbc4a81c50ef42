package main

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"

	digest "github.com/opencontainers/go-digest"
)

// blobRegistry is a minimal read-only OCI distribution registry on 127.0.0.1 serving blob files: GET/HEAD
// /v2/<repo>/blobs/<digest> with Range support (http.ServeContent), and /v2/. It counts what it serves.
type blobRegistry struct {
	Host  string // 127.0.0.1:port
	blobs map[digest.Digest]string
	srv   *http.Server
	done  chan struct{}

	requests, bytes atomic.Int64
}

// startRegistry serves blobs (digest → file) until Close.
func startRegistry(blobs map[digest.Digest]string) (*blobRegistry, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &blobRegistry{Host: ln.Addr().String(), blobs: blobs, done: make(chan struct{})}
	r.srv = &http.Server{Handler: r, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		defer close(r.done)
		if err := r.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logf("registry: %v", err)
		}
	}()
	return r, nil
}

func (r *blobRegistry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.requests.Add(1)
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		http.Error(w, "read-only registry", http.StatusMethodNotAllowed)
		return
	}
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	if req.URL.Path == "/v2/" || req.URL.Path == "/v2" {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte("{}"))
		return
	}
	rest, ok := strings.CutPrefix(req.URL.Path, "/v2/")
	_, ds, ok2 := strings.Cut(rest, "/blobs/")
	dg, err := digest.Parse(ds)
	path, known := r.blobs[dg]
	if !ok || !ok2 || err != nil || !known {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(`{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}`))
		return
	}
	f, err := os.Open(path)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Docker-Content-Digest", dg.String())
	w.Header().Set("Cache-Control", "max-age=31536000")
	http.ServeContent(&countingWriter{ResponseWriter: w, n: &r.bytes}, req, "", time.Time{}, f)
}

// Close stops the server.
func (r *blobRegistry) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := r.srv.Shutdown(ctx)
	if err != nil {
		err = r.srv.Close()
	}
	<-r.done
	return err
}

// countingWriter counts the body bytes written.
type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	c.n.Add(int64(n))
	return n, err
}
