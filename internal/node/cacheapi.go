package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/cachesnap"
	"github.com/obdproject/obd/internal/mounter"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/trace"
)

// cacheAPI serves obd cache's requests on the status socket: list, evict, prune, warm, export and import.
type cacheAPI struct {
	o *ops
}

// register adds the cache routes to mux.
func (a cacheAPI) register(mux *http.ServeMux) {
	mux.HandleFunc("GET "+status.PathCacheBlobs, a.blobs)
	mux.HandleFunc("POST "+status.PathCacheEvict, a.evict)
	mux.HandleFunc("POST "+status.PathCachePrune, a.prune)
	mux.HandleFunc("POST "+status.PathCacheWarm, a.warm)
	mux.HandleFunc("GET "+status.PathCacheExport, a.export)
	mux.HandleFunc("POST "+status.PathCacheImport, a.importSnapshot)
}

// ready answers 503 when the node has no cache (yet); it reports whether the request can go on.
func (a cacheAPI) ready(w http.ResponseWriter) (*cache.Cache, *mounter.Mounter, bool) {
	if a.o.cache == nil || a.o.mounter == nil {
		http.Error(w, "this node has no block cache", http.StatusServiceUnavailable)
		return nil, nil, false
	}
	return a.o.cache, a.o.mounter, true
}

// inUse maps the blobs of attached images to their references.
func (a cacheAPI) inUse(m *mounter.Mounter) map[digest.Digest][]string {
	use := map[digest.Digest][]string{}
	for _, img := range m.Images() {
		for _, l := range img.Layers {
			if l.Digest != "" && !slices.Contains(use[l.Digest], img.ImageRef) {
				use[l.Digest] = append(use[l.Digest], img.ImageRef)
			}
		}
	}
	return use
}

func (a cacheAPI) blobs(w http.ResponseWriter, _ *http.Request) {
	c, m, ok := a.ready(w)
	if !ok {
		return
	}
	use := a.inUse(m)
	out := []status.CacheBlob{}
	for _, b := range c.Blobs() {
		out = append(out, status.CacheBlob{Digest: b.Digest.String(), Size: b.Size, CachedBytes: b.CachedBytes, Blocks: b.Blocks,
			TotalBlocks: b.TotalBlocks, LastUse: b.LastUse, Images: use[b.Digest]})
	}
	writeJSON(w, out)
}

func (a cacheAPI) evict(w http.ResponseWriter, r *http.Request) {
	c, _, ok := a.ready(w)
	if !ok {
		return
	}
	var req status.EvictRequest
	if !readJSON(w, r, &req) {
		return
	}
	var keys []digest.Digest
	for _, s := range req.Digests {
		d, err := digest.Parse(s)
		if err != nil {
			http.Error(w, fmt.Sprintf("blob %q: %v", s, err), http.StatusBadRequest)
			return
		}
		keys = append(keys, d)
	}
	res, ok := evictBlobs(w, c, keys)
	if !ok {
		return
	}
	a.o.log.Info("evicted blobs from the cache", "blobs", res.Blobs, "bytes", res.FreedBytes)
	writeJSON(w, res)
}

func (a cacheAPI) prune(w http.ResponseWriter, r *http.Request) {
	c, m, ok := a.ready(w)
	if !ok {
		return
	}
	var req status.PruneRequest
	if !readJSON(w, r, &req) {
		return
	}
	keep := a.inUse(m)
	for _, s := range req.Keep {
		keep[digest.Digest(s)] = nil
	}
	var drop []digest.Digest
	for _, b := range c.Blobs() {
		if _, ok := keep[b.Digest]; !ok {
			drop = append(drop, b.Digest)
		}
	}
	res, ok := evictBlobs(w, c, drop)
	if !ok {
		return
	}
	a.o.log.Info("pruned the cache", "blobs", res.Blobs, "bytes", res.FreedBytes)
	writeJSON(w, res)
}

// evictBlobs evicts keys from c; on an error it answers 500 and reports false.
func evictBlobs(w http.ResponseWriter, c *cache.Cache, keys []digest.Digest) (status.EvictResult, bool) {
	var res status.EvictResult
	for _, k := range keys {
		freed, err := c.EvictBlob(k)
		res.FreedBytes += freed
		if freed > 0 {
			res.Blobs++
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return res, false
		}
	}
	return res, true
}

func (a cacheAPI) warm(w http.ResponseWriter, r *http.Request) {
	_, m, ok := a.ready(w)
	if !ok {
		return
	}
	var req status.WarmRequest
	if !readJSON(w, r, &req) {
		return
	}
	layers := make([]snapshotter.Layer, len(req.Layers))
	for i, l := range req.Layers {
		d, err := digest.Parse(l.Digest)
		if err != nil || l.Size <= 0 {
			http.Error(w, fmt.Sprintf("layer %d: digest %q, size %d", i, l.Digest, l.Size), http.StatusBadRequest)
			return
		}
		layers[i] = snapshotter.Layer{Digest: d, Size: l.Size, ImageRef: req.ImageRef}
	}
	opts := mounter.WarmOptions{All: req.All}
	if !req.All {
		recs, err := trace.Decode(req.Trace)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		opts.Trace = recs
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	flusher, _ := w.(http.Flusher)
	send := func(p status.WarmProgress) {
		if enc.Encode(p) == nil && flusher != nil {
			flusher.Flush()
		}
	}
	opts.Progress = func(done, total int64) { send(status.WarmProgress{DoneBytes: done, TotalBytes: total}) }
	a.o.log.Info("warming the cache", "image", req.ImageRef, "layers", len(layers), "all", req.All)
	res, err := m.Warm(r.Context(), layers, opts)
	last := status.WarmProgress{DoneBytes: res.Done, TotalBytes: res.Bytes, Verified: res.Verified, Done: true, Full: errors.Is(err, cache.ErrFull)}
	if err != nil {
		last.Error = err.Error()
		a.o.log.Warn("warming the cache failed", "image", req.ImageRef, "err", err)
	}
	send(last)
}

func (a cacheAPI) export(w http.ResponseWriter, r *http.Request) {
	c, _, ok := a.ready(w)
	if !ok {
		return
	}
	var keys []digest.Digest
	for _, s := range r.URL.Query()["digest"] {
		d, err := digest.Parse(s)
		if err != nil {
			http.Error(w, fmt.Sprintf("blob %q: %v", s, err), http.StatusBadRequest)
			return
		}
		keys = append(keys, d)
	}
	if len(keys) == 0 {
		for _, b := range c.Blobs() {
			keys = append(keys, b.Digest)
		}
	}
	dir, err := os.MkdirTemp("", "obd-cache-export-")
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer os.RemoveAll(dir)
	idx, files, err := exportBlobs(r.Context(), c, keys, dir)
	if err != nil {
		status := http.StatusInternalServerError
		if errors.Is(err, cachesnap.ErrEmpty) {
			status = http.StatusNotFound
		}
		http.Error(w, err.Error(), status)
		return
	}
	w.Header().Set("Content-Type", "application/x-tar")
	err = cachesnap.WriteTar(w, idx, func(e cachesnap.Entry) (io.ReadCloser, error) { return os.Open(files[e.Digest]) })
	if err != nil {
		// The answer is under way: cut it, so the client sees a broken snapshot, never a short one.
		a.o.log.Warn("cache export failed", "err", err)
		panic(http.ErrAbortHandler)
	}
	a.o.log.Info("exported cache snapshot", "blobs", len(idx.Blobs))
}

// exportBlobs writes the cached blocks of keys to files in dir, each taken while reads and evictions go on.
func exportBlobs(ctx context.Context, c *cache.Cache, keys []digest.Digest, dir string) (cachesnap.Index, map[digest.Digest]string, error) {
	idx := cachesnap.Index{MediaType: cachesnap.MediaTypeIndex}
	files := map[digest.Digest]string{}
	for _, k := range keys {
		if err := ctx.Err(); err != nil {
			return idx, nil, err
		}
		path := fmt.Sprintf("%s/%d", dir, len(files))
		f, err := os.Create(path)
		if err != nil {
			return idx, nil, err
		}
		dg := digest.Canonical.Digester()
		e, err := c.ExportBlob(k, io.MultiWriter(f, dg.Hash()))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return idx, nil, err
		}
		if len(e.Blocks) == 0 {
			continue // evicted meanwhile
		}
		files[k] = path
		idx.Blobs = append(idx.Blobs, cachesnap.Entry{ExportedBlob: e,
			Data: ocispec.Descriptor{MediaType: cachesnap.MediaTypeBlocks, Digest: dg.Digest(), Size: e.DataSize()}})
	}
	if len(idx.Blobs) == 0 {
		return idx, nil, cachesnap.ErrEmpty
	}
	return idx, files, nil
}

func (a cacheAPI) importSnapshot(w http.ResponseWriter, r *http.Request) {
	c, _, ok := a.ready(w)
	if !ok {
		return
	}
	var out []status.ImportedBlob
	_, err := cachesnap.ReadTar(r.Body, func(e cachesnap.Entry, data io.Reader) error {
		vr, check := cachesnap.Verified(e, data)
		if e.Whole() && e.Data.Digest == e.Digest {
			// The data is the blob itself: ImportBlob checks it against the blob's digest as it streams.
			vr, check = io.LimitReader(data, e.Data.Size), func() error { return nil }
		}
		res, err := c.ImportBlob(r.Context(), e.ExportedBlob, vr)
		if err == nil || errors.Is(err, cache.ErrDigestMismatch) {
			// Damaged blocks failed their sums and were dropped; the data digest tells the same of the whole.
			if derr := check(); derr != nil && !errors.Is(derr, cachesnap.ErrDataDigest) {
				return derr
			} else if err == nil && derr != nil && res.Dropped == 0 {
				err = derr // damage the sums did not catch: impossible unless the sums are forged too
			}
		}
		ib := status.ImportedBlob{Digest: e.Digest.String(), Imported: res.Imported, Present: res.Present,
			Dropped: res.Dropped, Full: res.Full, Verified: res.Verified}
		if err != nil {
			ib.Error = err.Error()
			if !errors.Is(err, cache.ErrDigestMismatch) && !errors.Is(err, cachesnap.ErrDataDigest) {
				return err
			}
		}
		out = append(out, ib)
		return nil
	})
	if err != nil {
		a.o.log.Warn("cache import failed", "err", err)
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	source := r.URL.Query().Get("source")
	if source == "" {
		source = "(unnamed)"
	}
	if err := a.o.imports.record(source, time.Now(), out); err != nil {
		a.o.log.Warn("cache import not recorded", "source", source, "err", err)
	}
	a.o.log.Info("imported cache snapshot", "source", source, "blobs", len(out))
	writeJSON(w, out)
}

// readJSON decodes a request body of at most 64 MiB into v, answering 400 when it cannot.
func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<20)).Decode(v); err != nil {
		http.Error(w, "request: "+err.Error(), http.StatusBadRequest)
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}
