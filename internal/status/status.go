// Package status is the contract between obd-snapshotter's status endpoint (JSON over HTTP on a unix socket next
// to its gRPC socket) and the CLI commands that read it ('obd status', 'obd health'): the document and a client.
package status

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"
	"time"
)

// Paths served on the status socket. /metrics (Prometheus text format) is served there too.
const (
	PathStatus  = "/status"
	PathHealthz = "/healthz"
	PathMetrics = "/metrics"
)

// Status is the document GET /status returns.
type Status struct {
	Version       string    `json:"version"`
	GoVersion     string    `json:"go_version"`
	PID           int       `json:"pid"`
	Started       time.Time `json:"started"`
	UptimeSeconds float64   `json:"uptime_seconds"`
	Config        Config    `json:"config"`
	Cache         Cache     `json:"cache"`
	Reads         Reads     `json:"device_reads"`
	// Images lists every image that containers use or that has a device, overlaybd or not.
	Images []Image `json:"images"`
	// Warnings are problems in gathering the status itself (e.g. the snapshot metadata could not be read).
	Warnings []string `json:"warnings,omitempty"`
}

// Config summarizes the daemon's configuration (obd.toml after flags).
type Config struct {
	File           string   `json:"file"`
	Root           string   `json:"root"`
	Address        string   `json:"address"`
	StatusAddress  string   `json:"status_address"`
	MetricsAddress string   `json:"metrics_address"` // "" when metrics are served only on the status socket
	CacheDir       string   `json:"cache_dir"`
	CacheSizeGB    int64    `json:"cache_size_gb"`
	BlockSizeKB    int64    `json:"block_size_kb"`
	RetryBudget    string   `json:"retry_budget"`
	DockerConfig   string   `json:"docker_config"`
	PlainHTTP      []string `json:"plain_http,omitempty"`
	Insecure       []string `json:"insecure,omitempty"`
	Mirrors        []string `json:"mirrors,omitempty"`
	SlowReadMS     int64    `json:"slow_read_ms"`
	HungReadMS     int64    `json:"hung_read_ms"`
	AuditPath      string   `json:"audit_path"` // "" when audit lines go to the daemon's log
}

// Cache is the block cache's usage and counters since the daemon started.
type Cache struct {
	Dir           string  `json:"dir"`
	UsedBytes     int64   `json:"used_bytes"`
	CapacityBytes int64   `json:"capacity_bytes"`
	Blobs         int     `json:"blobs"`
	Hits          int64   `json:"hits"`   // blocks served from disk
	Misses        int64   `json:"misses"` // blocks fetched from registries
	HitRatio      float64 `json:"hit_ratio"`
	Evictions     int64   `json:"evictions"`
	FetchedBytes  int64   `json:"fetched_bytes"`
	StoreFailures int64   `json:"store_failures"`
	// Imports are the cache snapshots imported on the node ('obd cache import', 'obd install --cache-from').
	Imports []CacheImport `json:"imports,omitempty"`
}

// Reads counts the device reads of all images since the daemon started.
type Reads struct {
	Total    int64 `json:"total"`
	Errors   int64 `json:"errors"`
	Slow     int64 `json:"slow"`      // finished after [audit] slow_read_ms or later
	InFlight int64 `json:"in_flight"` // being served now
	Hung     int64 `json:"hung"`      // in flight for [audit] hung_read_ms or longer
}

// Modes of an Image.
const (
	ModeLazy      = "lazy"      // overlaybd layers read from the registry on demand
	ModeLocal     = "local"     // overlaybd layers downloaded and read from local files
	ModeMixed     = "mixed"     // some overlaybd layers local, the others lazy
	ModeOverlayfs = "overlayfs" // a normal image, served by overlayfs
	ModeInvalid   = "invalid"   // a snapshot chain that cannot be mounted
)

// States of an Image's device.
const (
	StateAttaching   = "attaching"
	StateAttached    = "attached"
	StateFailed      = "failed"
	StateNotAttached = "not attached" // containers exist but their image has no device (yet)
	StateNone        = "-"            // overlayfs images have no device
)

// Image is one image on the node.
type Image struct {
	// ID is the image's mount id (the snapshot id of its topmost overlaybd layer), or for a normal image the
	// snapshot its containers are made over.
	ID       string `json:"id"`
	ImageRef string `json:"image_ref"`
	Mode     string `json:"mode"`
	// Reason says why the image is served in Mode, and what to do about an unwanted mode.
	Reason string     `json:"reason"`
	State  string     `json:"state"`
	Since  *time.Time `json:"since,omitempty"` // when State was entered
	// Error is the error of a failed attach or mount.
	Error       string   `json:"error,omitempty"`
	Device      string   `json:"device,omitempty"`
	Mountpoints []string `json:"mountpoints,omitempty"`
	// Snapshots are the active and view snapshots (container root filesystems) over the image.
	Snapshots        []string `json:"snapshots,omitempty"`
	Layers           []Layer  `json:"layers,omitempty"`
	BytesFetched     int64    `json:"bytes_fetched"`
	RegistryRequests int64    `json:"registry_requests"`
	RegistryErrors   int64    `json:"registry_errors"`
	CacheHits        int64    `json:"cache_hits"`
	CacheMisses      int64    `json:"cache_misses"`
	// CacheHitRatio is hits/(hits+misses), nil before the first cached read.
	CacheHitRatio *float64 `json:"cache_hit_ratio,omitempty"`
	Reads         int64    `json:"reads"`
	ReadBytes     int64    `json:"read_bytes"`
	ReadErrors    int64    `json:"read_errors"`
	ReadsInFlight int64    `json:"reads_in_flight"`
	HungReads     int64    `json:"hung_reads"`
	// Prefetch is the progress of the prefetch of the image's recorded start, when it has one.
	Prefetch *Prefetch `json:"prefetch,omitempty"`
	// Predecode is what the decoding ahead of the image's last start did, when there was one.
	Predecode *Predecode `json:"predecode,omitempty"`
	// Prime is what the priming of the page cache with the image's last start did, when there was one.
	Prime *Prime `json:"prime,omitempty"`
	// Recording is the trace file the image's reads are recorded into, when they are.
	Recording string `json:"recording,omitempty"`
	// Writable are the containers' writable layers (rw_mode dir or dev) over the image.
	Writable []Writable `json:"writable,omitempty"`
}

// Writable is a container's writable block layer over an image.
type Writable struct {
	Snapshot string `json:"snapshot"`
	Mode     string `json:"mode"` // dir or dev
	State    string `json:"state"`
	Device   string `json:"device,omitempty"`
	// Mountpoint is where its filesystem is mounted for the container (dir mode).
	Mountpoint string `json:"mountpoint,omitempty"`
	// DataBytes is the space the layer takes on disk: what the container wrote and kept.
	DataBytes int64 `json:"data_bytes"`
	Quota     int64 `json:"quota,omitempty"`
}

// Prefetch is the progress of a prefetch: of a recorded start, or of the filesystem metadata of an image without one.
type Prefetch struct {
	What       string  `json:"what"` // "recorded start" or "filesystem metadata"
	Ranges     int     `json:"ranges"`
	DoneRanges int     `json:"done_ranges"`
	Bytes      int64   `json:"bytes"`
	DoneBytes  int64   `json:"done_bytes"`
	Running    bool    `json:"running"`
	Seconds    float64 `json:"seconds"` // since it started, or how long it took
	Error      string  `json:"error,omitempty"`
}

// Predecode is what the decoding ahead of an image's start (its recorded start, or the one the node learned) did.
type Predecode struct {
	Blocks       int64 `json:"blocks"`        // ZFile blocks decoded ahead
	BlocksLoaded int64 `json:"blocks_loaded"` // blocks loaded already decoded, from what the image's last start decoded
	ReadsServed  int64 `json:"reads_served"`  // reads that took their bytes from them
	BlocksMissed int64 `json:"blocks_missed"` // blocks the image's reads did not find decoded ahead, and decoded themselves
	Running      bool  `json:"running"`       // blocks are still being decoded
	Held         bool  `json:"held"`          // the decoded blocks are held for the start's reads (30 s)
}

// Prime is what the priming of the page cache with an image's start did: the start's file data and filesystem
// metadata read ahead of the container's reads.
type Prime struct {
	Files         int64  `json:"files"`
	FileBytes     int64  `json:"file_bytes"`
	MetadataBytes int64  `json:"metadata_bytes"`
	Running       bool   `json:"running"`
	Error         string `json:"error,omitempty"`
}

// Layer is one overlaybd layer of an Image, bottom first.
type Layer struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
	// Source is "remote" (read lazily from the registry) or "local" (a downloaded file, Path).
	Source       string `json:"source"`
	Path         string `json:"path,omitempty"`
	BytesFetched int64  `json:"bytes_fetched"`
	CacheHits    int64  `json:"cache_hits"`
	CacheMisses  int64  `json:"cache_misses"`
	// Download is the state of the background download: waiting, downloading, verified or failed ("": none).
	Download        string `json:"download,omitempty"`
	DownloadedBytes int64  `json:"downloaded_bytes,omitempty"`
	DownloadError   string `json:"download_error,omitempty"`
}

// Version returns the version of the running binary: its module version and VCS revision when the build
// recorded them, else "(devel)".
func Version() string {
	v := "(devel)"
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if bi.Main.Version != "" {
		v = bi.Main.Version
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += " " + s.Value[:12]
		}
	}
	return v
}

// GoVersion returns the Go version the binary was built with.
func GoVersion() string { return runtime.Version() }

// ErrNotRunning is wrapped by the client's errors when nothing serves the status socket: the socket file is
// missing, or it is left over by a daemon that stopped.
var ErrNotRunning = errors.New("obd-snapshotter is not running")

// Client reads a daemon's status endpoint.
type Client struct {
	Socket string
	http   *http.Client
}

// NewClient returns a client of the status endpoint on the unix socket path; each request takes at most timeout.
func NewClient(socket string, timeout time.Duration) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
		// Cache snapshots stream through the socket: large buffers, few system calls.
		ReadBufferSize: 1 << 20, WriteBufferSize: 1 << 20,
	}
	return &Client{Socket: socket, http: &http.Client{Transport: tr, Timeout: timeout}}
}

// Status fetches GET /status.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	b, err := c.get(ctx, PathStatus)
	if err != nil {
		return nil, err
	}
	var st Status
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("status endpoint %s: %w", c.Socket, err)
	}
	return &st, nil
}

// Healthz asks GET /healthz and returns nil when the daemon answers that it is healthy.
func (c *Client) Healthz(ctx context.Context) error {
	_, err := c.get(ctx, PathHealthz)
	return err
}

// Metrics fetches GET /metrics (Prometheus text format).
func (c *Client) Metrics(ctx context.Context) ([]byte, error) { return c.get(ctx, PathMetrics) }

func (c *Client) get(ctx context.Context, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://obd-snapshotter"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, c.dialError(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("status endpoint %s: GET %s: %w", c.Socket, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return b, fmt.Errorf("status endpoint %s: GET %s: %s: %s", c.Socket, path, resp.Status, bytesTrim(b))
	}
	return b, nil
}

// dialError says why nothing answered.
func (c *Client) dialError(err error) error {
	switch {
	case errors.Is(err, syscall.ENOENT):
		return fmt.Errorf("%w: no status socket %s", ErrNotRunning, c.Socket)
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("%w: nothing listens on the status socket %s (left over by a daemon that stopped)", ErrNotRunning, c.Socket)
	case errors.Is(err, syscall.EACCES) || errors.Is(err, os.ErrPermission):
		return fmt.Errorf("status socket %s: permission denied (run as root or as a member of the socket's group)", c.Socket)
	}
	return fmt.Errorf("status endpoint %s: %w", c.Socket, err)
}

func bytesTrim(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 200 {
		s = s[:200] + "…"
	}
	return s
}

// HitRatio returns hits/(hits+misses), or nil when both are zero.
func HitRatio(hits, misses int64) *float64 {
	if hits+misses == 0 {
		return nil
	}
	r := float64(hits) / float64(hits+misses)
	return &r
}
