package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"

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
	mux.HandleFunc("GET "+status.PathCacheExportFile, a.export)
	mux.HandleFunc("POST "+status.PathCacheImport, a.importSnapshot)
	mux.HandleFunc("POST "+status.PathCacheImportFile, a.importSnapshot)
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
	c, m, ok := a.ready(w)
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
	// The snapshot is written in one pass into the caller's file when the daemon sees it, else into a temporary
	// file streamed as the answer.
	f, into, ok := sharedFile(w, r, status.PathCacheExportFile, os.O_WRONLY)
	if !ok {
		return
	}
	var err error
	if f == nil {
		if f, err = os.CreateTemp("", "obd-cache-export-"); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer os.Remove(f.Name())
	}
	defer f.Close()
	idx, n, err := exportSnapshot(r.Context(), c, keys, m.LearnedStarts(), f)
	if err != nil {
		status := http.StatusInternalServerError
		if errors.Is(err, cachesnap.ErrEmpty) {
			status = http.StatusNotFound
		}
		http.Error(w, err.Error(), status)
		return
	}
	a.o.log.Info("exported cache snapshot", "blobs", len(idx.Blobs), "file", into)
	if into != "" {
		writeJSON(w, status.ExportResult{Blobs: len(idx.Blobs), Blocks: idx.Blocks(), DataBytes: n})
		return
	}
	w.Header().Set("Content-Type", "application/x-tar")
	if _, err = f.Seek(0, io.SeekStart); err == nil {
		_, err = io.Copy(w, f)
	}
	if err != nil {
		// The answer is under way: cut it, so the client sees a broken snapshot, never a short one.
		a.o.log.Warn("cache export failed", "err", err)
		panic(http.ErrAbortHandler)
	}
}

// exportSnapshot writes a snapshot file of the cached blocks of keys (of every cached blob when there is none) into
// f, each blob taken while reads and evictions go on, with the starts of images that have a layer among them, and
// returns its index and data bytes.
func exportSnapshot(ctx context.Context, c *cache.Cache, keys []digest.Digest, starts []trace.Start, f *os.File) (cachesnap.Index, int64, error) {
	if err := f.Truncate(0); err != nil {
		return cachesnap.Index{}, 0, err
	}
	cached := map[digest.Digest]int{}
	all := len(keys) == 0
	for _, b := range c.Blobs() {
		cached[b.Digest] = int(b.Blocks)
		if all {
			keys = append(keys, b.Digest)
		}
	}
	limits := make([]int, len(keys))
	for k, d := range keys {
		limits[k] = cached[d] // a blob cached since is exported as it was when the export began
	}
	exported := map[digest.Digest]bool{}
	for k, d := range keys {
		exported[d] = limits[k] > 0
	}
	var taken []trace.Start
	for _, st := range starts {
		if slices.ContainsFunc(st.Layers, func(l trace.StartLayer) bool { return exported[l.Digest] || exported[digest.Digest(l.Target)] }) {
			taken = append(taken, st)
		}
	}
	return cachesnap.WriteSeekable(f, limits, taken, func(k int) cachesnap.ExportFunc {
		return func(begin func(int64) (io.Writer, error)) (cache.ExportedBlob, digest.Digest, error) {
			if err := ctx.Err(); err != nil {
				return cache.ExportedBlob{}, "", err
			}
			if limits[k] == 0 {
				return cache.ExportedBlob{}, "", nil
			}
			var w io.Writer
			e, dg, err := c.ExportBlob(keys[k], writerFunc(func(p []byte) (int, error) { return w.Write(p) }), limits[k],
				func(n int64) (err error) {
					w, err = begin(n)
					return err
				})
			return e, dg, err
		}
	})
}

// writerFunc is a function as an io.Writer.
type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// sharedFile opens, with flag, the file a request to filePath names (?file=PATH&dev=D&ino=I: a file of the
// caller's, which the daemon reads or writes directly instead of streaming it through the socket), and returns it
// and its path; no file for a request to another path. When it cannot, it answers the request and reports false:
// 409 when the daemon does not see that very regular file there (a caller in another mount namespace), so that the
// caller streams it instead, 400 for a bad request.
func sharedFile(w http.ResponseWriter, r *http.Request, filePath string, flag int) (*os.File, string, bool) {
	if r.URL.Path != filePath {
		return nil, "", true
	}
	q := r.URL.Query()
	path := q.Get("file")
	dev, err1 := strconv.ParseUint(q.Get("dev"), 10, 64)
	ino, err2 := strconv.ParseUint(q.Get("ino"), 10, 64)
	if err := errors.Join(err1, err2); err != nil || !filepath.IsAbs(path) {
		http.Error(w, fmt.Sprintf("file %q, dev %q, ino %q: want an absolute path and its device and inode numbers", path,
			q.Get("dev"), q.Get("ino")), http.StatusBadRequest)
		return nil, "", false
	}
	// O_NONBLOCK: a FIFO put at the path must not hold the open; it is refused below, as anything but the file.
	f, err := os.OpenFile(path, flag|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		http.Error(w, fmt.Sprintf("%v: %v", status.ErrNotShared, err), http.StatusConflict)
		return nil, "", false
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil || st.Dev != dev || st.Ino != ino || st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		f.Close()
		http.Error(w, fmt.Sprintf("%v: %s is another file here", status.ErrNotShared, path), http.StatusConflict)
		return nil, "", false
	}
	return f, path, true
}

func (a cacheAPI) importSnapshot(w http.ResponseWriter, r *http.Request) {
	c, m, ok := a.ready(w)
	if !ok {
		return
	}
	body := io.Reader(r.Body)
	f, from, ok := sharedFile(w, r, status.PathCacheImportFile, os.O_RDONLY)
	if !ok {
		return
	}
	if f != nil {
		defer f.Close()
		body = f // read straight into the import's buffers
	}
	var out []status.ImportedBlob
	// Each blob's import is finished (its last runs stored, its digest checked) while the next blob's data is read.
	var pending func() error
	finishPending := func() error {
		if pending == nil {
			return nil
		}
		err := pending()
		pending = nil
		return err
	}
	idx, err := cachesnap.ReadTar(body, func(e cachesnap.Entry, data io.Reader) error {
		vr, check := cachesnap.Verified(e, data)
		if e.Whole() && e.Data.Digest == e.Digest {
			// The data is the blob itself: the import checks it against the blob's digest as it streams.
			vr, check = io.LimitReader(data, e.Data.Size), func() error { return nil }
		}
		finish, res, err := c.StartImport(r.Context(), e.ExportedBlob, vr)
		if perr := finishPending(); perr != nil {
			if finish != nil {
				_, _ = finish()
			}
			return perr
		}
		if err != nil {
			return err
		}
		derr := check() // the data was read whole
		pending = func() error {
			res, err = finish()
			if err == nil || errors.Is(err, cache.ErrDigestMismatch) {
				// Damaged blocks failed their sums and were dropped; the data digest tells the same of the whole.
				if derr != nil && !errors.Is(derr, cachesnap.ErrDataDigest) {
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
		}
		return nil
	})
	if perr := finishPending(); err == nil {
		err = perr
	}
	if err != nil {
		a.o.log.Warn("cache import failed", "err", err)
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var kept []trace.Start
	for _, st := range idx.Starts {
		if err := m.KeepLearnedStart(st); err != nil {
			a.o.log.Warn("a start in the cache snapshot is not kept", "err", err)
			continue
		}
		kept = append(kept, st)
	}
	source := r.URL.Query().Get("source")
	if source == "" {
		source = "(unnamed)"
	}
	if err := a.o.imports.record(source, time.Now(), out); err != nil {
		a.o.log.Warn("cache import not recorded", "source", source, "err", err)
	}
	a.o.log.Info("imported cache snapshot", "source", source, "blobs", len(out), "file", from)
	writeJSON(w, out)
	// Decoded after the answer: the import is over once the blocks are in.
	go m.DecodeStarts(context.Background(), kept)
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
