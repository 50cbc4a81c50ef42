package status

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Paths of the cache API on the status socket (obd cache). They change the node's cache: the socket is root's.
const (
	PathCacheBlobs  = "/cache/blobs"  // GET: []CacheBlob
	PathCacheEvict  = "/cache/evict"  // POST EvictRequest: EvictResult
	PathCachePrune  = "/cache/prune"  // POST PruneRequest: EvictResult
	PathCacheWarm   = "/cache/warm"   // POST WarmRequest: WarmProgress lines (JSON), the last with Done or Error
	PathCacheExport = "/cache/export" // GET ?digest=D (repeated; none: all): a snapshot file (cachesnap tar)
	PathCacheImport = "/cache/import" // POST a snapshot file (?source=WHERE names it in the import log): []ImportedBlob
	// The same with a file of the caller's that the daemon sees too, named by ?file=PATH&dev=D&ino=I: the daemon
	// writes the snapshot into it (ExportResult) or reads it (no body). 409: the daemon does not see that file.
	PathCacheExportFile = "/cache/export-file"
	PathCacheImportFile = "/cache/import-file"
)

// ErrNotShared means the daemon does not see a caller's file at its path (it runs in another mount namespace, or
// predates the file paths): the caller streams the file instead.
var ErrNotShared = errors.New("the daemon does not see the file")

// ExportResult says what an export into a file wrote.
type ExportResult struct {
	Blobs     int   `json:"blobs"`
	Blocks    int   `json:"blocks"`
	DataBytes int64 `json:"data_bytes"`
}

// CacheBlob is a blob in the node's block cache.
type CacheBlob struct {
	Digest      string    `json:"digest"`
	Size        int64     `json:"size"`
	CachedBytes int64     `json:"cached_bytes"`
	Blocks      int64     `json:"blocks"`
	TotalBlocks int64     `json:"total_blocks"`
	LastUse     time.Time `json:"last_use"`
	// Images are the attached images whose layer it is.
	Images []string `json:"images,omitempty"`
}

// EvictRequest names blobs to drop from the cache.
type EvictRequest struct {
	Digests []string `json:"digests"`
}

// PruneRequest drops every cached blob that is neither in Keep nor a layer of an attached image.
type PruneRequest struct {
	Keep []string `json:"keep"`
}

// EvictResult says what an eviction freed.
type EvictResult struct {
	Blobs      int   `json:"blobs"`
	FreedBytes int64 `json:"freed_bytes"`
}

// WarmLayer is an overlaybd layer blob of an image to warm.
type WarmLayer struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
}

// WarmRequest asks the daemon to fill its cache with an image's blocks: whole blobs (All) or the ranges of a
// trace file (upstream's format).
type WarmRequest struct {
	ImageRef string      `json:"image_ref"`
	Layers   []WarmLayer `json:"layers"`
	All      bool        `json:"all,omitempty"`
	Trace    []byte      `json:"trace,omitempty"`
}

// WarmProgress is one line of a warm's answer.
type WarmProgress struct {
	DoneBytes  int64  `json:"done_bytes"`
	TotalBytes int64  `json:"total_bytes"`
	Verified   int    `json:"verified,omitempty"` // blobs checked against their digest (All)
	Done       bool   `json:"done,omitempty"`
	Full       bool   `json:"full,omitempty"` // the cache's bound stopped it
	Error      string `json:"error,omitempty"`
}

// ImportedBlob says what an import did with one blob of a snapshot.
type ImportedBlob struct {
	Digest   string `json:"digest"`
	Imported int64  `json:"imported_blocks"`
	Present  int64  `json:"present_blocks"`
	Dropped  int64  `json:"dropped_blocks"`
	Full     bool   `json:"full,omitempty"`
	Verified bool   `json:"verified,omitempty"`
	Error    string `json:"error,omitempty"`
}

// CacheImport is a cache snapshot imported on this node (the last import of each source), and how it matches
// what the node holds now.
type CacheImport struct {
	Source string    `json:"source"`
	Time   time.Time `json:"time"`
	Blobs  []string  `json:"blobs"`
	// Blocks were stored or present already; Dropped failed their sums.
	Blocks  int64 `json:"blocks"`
	Dropped int64 `json:"dropped_blocks"`
	// CachedBlobs of Blobs are in the cache now; ImageBlobs are layers of images pulled on the node.
	CachedBlobs int `json:"cached_blobs"`
	ImageBlobs  int `json:"image_blobs"`
}

// Import loads a snapshot file into the daemon's cache: the daemon reads it directly when it sees the same file,
// else it is streamed. source names it in the node's import log.
func (c *Client) Import(ctx context.Context, source string, snapshot io.Reader) ([]ImportedBlob, error) {
	query := "?source=" + url.QueryEscape(source)
	var body io.ReadCloser
	var err error
	if f, ok := snapshot.(*os.File); ok {
		if q, qerr := fileQuery(f); qerr == nil {
			body, err = c.Stream(ctx, http.MethodPost, PathCacheImportFile+query+"&"+q, http.NoBody)
			if errors.Is(err, ErrNotShared) {
				body, err = nil, nil
			}
		}
	}
	if body == nil && err == nil {
		body, err = c.Stream(ctx, http.MethodPost, PathCacheImport+query, snapshot)
	}
	if err != nil {
		return nil, err
	}
	defer body.Close()
	var res []ImportedBlob
	if err := json.NewDecoder(body).Decode(&res); err != nil {
		return nil, fmt.Errorf("status endpoint %s: import: %w", c.Socket, err)
	}
	return res, nil
}

// ExportFile asks the daemon to write a snapshot file into f, an empty file it sees too; query selects the blobs
// (PathCacheExport's). It fails with ErrNotShared when the daemon does not see f: stream the export then.
func (c *Client) ExportFile(ctx context.Context, query url.Values, f *os.File) (ExportResult, error) {
	q, err := fileQuery(f)
	if err != nil {
		return ExportResult{}, err
	}
	path := PathCacheExportFile + "?" + q
	if len(query) > 0 {
		path += "&" + query.Encode()
	}
	body, err := c.Stream(ctx, http.MethodGet, path, nil)
	if err != nil {
		return ExportResult{}, err
	}
	defer body.Close()
	var res ExportResult
	if err := json.NewDecoder(body).Decode(&res); err != nil {
		return res, fmt.Errorf("status endpoint %s: export: %w", c.Socket, err)
	}
	return res, nil
}

// fileQuery names a file to the daemon: its absolute path, device and inode.
func fileQuery(f *os.File) (string, error) {
	path, err := filepath.Abs(f.Name())
	if err != nil {
		return "", err
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return "", err
	}
	return url.Values{"file": {path}, "dev": {strconv.FormatUint(st.Dev, 10)}, "ino": {strconv.FormatUint(st.Ino, 10)}}.Encode(), nil
}

// CacheBlobs lists the node's cached blobs.
func (c *Client) CacheBlobs(ctx context.Context) ([]CacheBlob, error) {
	b, err := c.get(ctx, PathCacheBlobs)
	if err != nil {
		return nil, err
	}
	var out []CacheBlob
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("status endpoint %s: %w", c.Socket, err)
	}
	return out, nil
}

// Evict drops blobs from the cache.
func (c *Client) Evict(ctx context.Context, req EvictRequest) (EvictResult, error) {
	var res EvictResult
	return res, c.postJSON(ctx, PathCacheEvict, req, &res)
}

// Prune drops the cached blobs no image uses.
func (c *Client) Prune(ctx context.Context, req PruneRequest) (EvictResult, error) {
	var res EvictResult
	return res, c.postJSON(ctx, PathCachePrune, req, &res)
}

// Warm fills the cache with an image's blocks; progress sees each line of the answer. It returns the last.
func (c *Client) Warm(ctx context.Context, req WarmRequest, progress func(WarmProgress)) (WarmProgress, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return WarmProgress{}, err
	}
	resp, err := c.Stream(ctx, http.MethodPost, PathCacheWarm, bytes.NewReader(body))
	if err != nil {
		return WarmProgress{}, err
	}
	defer resp.Close()
	dec := json.NewDecoder(resp)
	var last WarmProgress
	for {
		var p WarmProgress
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			return last, fmt.Errorf("status endpoint %s: warm: %w", c.Socket, err)
		}
		last = p
		if progress != nil {
			progress(p)
		}
	}
	if !last.Done {
		return last, fmt.Errorf("status endpoint %s: warm: the answer ended before the warm did", c.Socket)
	}
	return last, nil
}

// Stream sends a request whose answer may take long and be large (no timeout beyond ctx) and returns its body when
// the daemon answers 200.
func (c *Client) Stream(ctx context.Context, method, path string, body io.Reader) (io.ReadCloser, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://obd-snapshotter"+path, body)
	if err != nil {
		return nil, err
	}
	hc := *c.http
	hc.Timeout = 0
	resp, err := hc.Do(req)
	if err != nil {
		return nil, c.dialError(err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if (resp.StatusCode == http.StatusConflict || resp.StatusCode == http.StatusNotFound) &&
			(strings.HasPrefix(path, PathCacheExportFile+"?") || strings.HasPrefix(path, PathCacheImportFile+"?")) {
			return nil, fmt.Errorf("%w: %s", ErrNotShared, bytesTrim(b))
		}
		return nil, fmt.Errorf("status endpoint %s: %s %s: %s: %s", c.Socket, method, path, resp.Status, bytesTrim(b))
	}
	return resp.Body, nil
}

func (c *Client) postJSON(ctx context.Context, path string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	rc, err := c.Stream(ctx, http.MethodPost, path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	defer rc.Close()
	if err := json.NewDecoder(io.LimitReader(rc, 64<<20)).Decode(out); err != nil {
		return fmt.Errorf("status endpoint %s: POST %s: %w", c.Socket, path, err)
	}
	return nil
}
