// Package profile records a container's start on a node and turns the recording into an acceleration layer.
//
// Record runs a container from an overlaybd image through containerd with the overlaybd snapshotter's
// record-trace labels (upstream's protocol: an empty trace file, PATH.lock while recording), until the app prints
// its ready line, exits, or a timeout; it returns the startup profile (phases, bytes fetched, every block read with
// the time of its first read) and the trace in upstream's format. AccelerationLayer and Accelerate make the image
// with that trace as its acceleration layer, which the snapshotter prefetches on later starts; Push pushes it.
package profile

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/trace"
)

// Options say how a start is recorded.
type Options struct {
	// Snapshotter is containerd's name of the overlaybd snapshotter (default snapshotter.Name).
	Snapshotter string
	// Args is the command to run; nil runs the image's own.
	Args []string
	// ReadyLine ends the recording when a line of the container's output contains it; "" waits for the exit.
	ReadyLine string
	// Timeout ends the recording when the app neither got ready nor exited by then (default DefaultTimeout).
	Timeout time.Duration
	// WorkDir holds the trace file while it is recorded (default os.TempDir()); the daemon writes there.
	WorkDir string
	// Output receives the container's stdout and stderr (default: discarded).
	Output io.Writer
	// Logf reports progress (default: none).
	Logf func(format string, args ...any)
	// Status, when set, is asked for the image's registry bytes and requests while it is recorded.
	Status *status.Client
}

// DefaultTimeout bounds a recording when Options.Timeout is 0.
const DefaultTimeout = 2 * time.Minute

// Ends of a recording.
const (
	EndReady   = "ready"   // the app printed the ready line
	EndExit    = "exit"    // the app exited
	EndTimeout = "timeout" // neither, within the timeout
)

// Profile is a recorded start: what `obd profile --out` writes (JSON).
type Profile struct {
	Image string `json:"image"`
	// ChainID is the chain ID of the image's overlaybd layers: the snapshot its device is attached for, and the
	// key of a profile installed on a node.
	ChainID   digest.Digest `json:"chain_id"`
	Recorded  time.Time     `json:"recorded"`
	Command   []string      `json:"command,omitempty"`
	ReadyLine string        `json:"ready_line,omitempty"`
	// End says what ended the recording: EndReady, EndExit or EndTimeout.
	End      string  `json:"end"`
	ExitCode *uint32 `json:"exit_code,omitempty"`
	Phases   Phases  `json:"phases"`
	// Fetched is what the image's device fetched from the registry while it was recorded (nil: the daemon's
	// status was not available).
	Fetched *Fetched `json:"fetched,omitempty"`
	// Layers are the image's overlaybd layers, bottom first: Read.Layer indexes them.
	Layers []Layer `json:"layers"`
	// Reads are the layer reads in the order they were first made.
	Reads []Read `json:"reads"`
	// ReadBytes sums the lengths of Reads.
	ReadBytes int64 `json:"read_bytes"`
	// Dropped counts reads left out of the trace beyond its record limit.
	Dropped int64 `json:"dropped,omitempty"`
}

// Phases are the timings of a recorded start, in seconds.
type Phases struct {
	// Pull is how long the image's pull took (0 when containerd had it already).
	Pull float64 `json:"pull_s"`
	// Attach is how long the container's root filesystem took to prepare: the image's device attached and mounted.
	Attach float64 `json:"attach_s"`
	// FirstRead is the time from the device's attach to its first layer read.
	FirstRead float64 `json:"first_read_s"`
	// Ready is the time from the container's start to the end of the recording (ready line, exit or timeout).
	Ready float64 `json:"ready_s"`
}

// Fetched counts registry traffic.
type Fetched struct {
	Bytes    int64 `json:"bytes"`
	Requests int64 `json:"requests"`
}

// Layer is one overlaybd layer of a profiled image.
type Layer struct {
	Digest digest.Digest `json:"digest"`
	Size   int64         `json:"size"`
}

// Read is one recorded layer read.
type Read struct {
	Layer  uint32 `json:"layer"`
	Offset int64  `json:"offset"`
	Length uint64 `json:"length"`
	// AtMS is when it was first read, in milliseconds since the device was attached.
	AtMS float64 `json:"at_ms"`
}

// Record runs a container from img in record mode and returns its profile and the trace file (upstream's format).
// img must be an overlaybd image that no container on the node uses: the recording starts with the attach (the
// snapshotter attaches an image that nothing uses again).
func Record(ctx context.Context, c *client.Client, img client.Image, opts Options) (*Profile, []byte, error) {
	if opts.Snapshotter == "" {
		opts.Snapshotter = snapshotter.Name
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.Output == nil {
		opts.Output = io.Discard
	}
	logf := opts.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	m, err := images.Manifest(ctx, c.ContentStore(), img.Target(), platforms.Default())
	if err != nil {
		return nil, nil, fmt.Errorf("profile %s: %w", img.Name(), err)
	}
	blocks, err := image.BlockLayers(m)
	if err != nil {
		return nil, nil, fmt.Errorf("profile %s: %w", img.Name(), err)
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("profile %s: %w", img.Name(), err)
	}
	if len(diffIDs) != len(m.Layers) {
		return nil, nil, fmt.Errorf("profile %s: image config has %d diff_ids for %d layers", img.Name(), len(diffIDs), len(m.Layers))
	}
	var blockDiffIDs []digest.Digest
	for i, l := range m.Layers {
		if l.Annotations[image.AnnotationAccelerationLayer] != "yes" {
			blockDiffIDs = append(blockDiffIDs, diffIDs[i])
		}
	}
	p := &Profile{Image: img.Name(), ChainID: identity.ChainID(blockDiffIDs), Recorded: time.Now().UTC(), Command: opts.Args, ReadyLine: opts.ReadyLine}
	for _, b := range blocks {
		p.Layers = append(p.Layers, Layer{Digest: b.BlobDigest, Size: b.BlobSize})
	}

	dir, err := os.MkdirTemp(opts.WorkDir, "obd-profile-")
	if err != nil {
		return nil, nil, fmt.Errorf("profile %s: %w", img.Name(), err)
	}
	defer os.RemoveAll(dir)
	// The daemon, possibly another user, writes the trace here.
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, nil, fmt.Errorf("profile %s: %w", img.Name(), err)
	}
	tracePath := filepath.Join(dir, "trace")
	if err := os.WriteFile(tracePath, nil, 0o644); err != nil {
		return nil, nil, fmt.Errorf("profile %s: %w", img.Name(), err)
	}

	id := "obd-profile-" + strings.TrimPrefix(filepath.Base(dir), "obd-profile-")
	labels := map[string]string{snapshotter.LabelRecordTrace: "yes", snapshotter.LabelRecordTracePath: tracePath}
	specOpts := []oci.SpecOpts{oci.WithImageConfig(img)}
	if len(opts.Args) > 0 {
		specOpts = append(specOpts, oci.WithProcessArgs(opts.Args...))
	}
	logf("attaching the image's device in record mode")
	start := time.Now()
	ctr, err := c.NewContainer(ctx, id, client.WithImage(img), client.WithSnapshotter(opts.Snapshotter),
		client.WithNewSnapshot(id, img, snapshots.WithLabels(labels)), client.WithNewSpec(specOpts...))
	if err != nil {
		return nil, nil, fmt.Errorf("profile %s: create container: %w", img.Name(), err)
	}
	p.Phases.Attach = time.Since(start).Seconds()
	defer func() {
		if err := ctr.Delete(context.WithoutCancel(ctx), client.WithSnapshotCleanup); err != nil {
			logf("cannot delete the profiling container %s: %v", id, err)
		}
	}()
	if _, err := os.Stat(tracePath + ".lock"); err != nil {
		return nil, nil, fmt.Errorf("profile %s: the snapshotter did not start recording (no %s.lock): the image's device "+
			"is in use by other containers (remove them first), or the snapshotter does not record traces", img.Name(), tracePath)
	}

	end, exit, err := runUntilReady(ctx, ctr, dir, opts, p, logf)
	if err != nil {
		return nil, nil, fmt.Errorf("profile %s: %w", img.Name(), err)
	}
	p.End, p.ExitCode = end, exit
	if opts.Status != nil {
		p.Fetched = fetchedBy(ctx, opts.Status, tracePath)
	}

	// Removing the lock makes the daemon write the trace and PATH.ok (upstream's protocol).
	if err := os.Remove(tracePath + ".lock"); err != nil {
		return nil, nil, fmt.Errorf("profile %s: end the recording: %w", img.Name(), err)
	}
	if err := waitFile(ctx, tracePath+".ok", 30*time.Second); err != nil {
		return nil, nil, fmt.Errorf("profile %s: the snapshotter did not write the trace: %w", img.Name(), err)
	}
	tf, err := os.ReadFile(tracePath)
	if err != nil {
		return nil, nil, fmt.Errorf("profile %s: %w", img.Name(), err)
	}
	if err := p.addReads(tf, tracePath); err != nil {
		return nil, nil, fmt.Errorf("profile %s: %w", img.Name(), err)
	}
	if len(p.Reads) == 0 {
		return nil, nil, fmt.Errorf("profile %s: %w", img.Name(), ErrNoTrace)
	}
	return p, tf, nil
}

// runUntilReady starts the container's task and waits for the ready line, its exit or the timeout; then it stops
// the task.
func runUntilReady(ctx context.Context, ctr client.Container, dir string, opts Options, p *Profile, logf func(string, ...any)) (string, *uint32, error) {
	ready := make(chan struct{})
	out := &lineWatcher{w: opts.Output, needle: opts.ReadyLine, ready: ready}
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, out, out), cio.WithFIFODir(filepath.Join(dir, "fifo"))))
	if err != nil {
		return "", nil, fmt.Errorf("create task: %w", err)
	}
	defer func() {
		if _, err := task.Delete(context.WithoutCancel(ctx), client.WithProcessKill); err != nil {
			logf("cannot delete the profiling task: %v", err)
		}
	}()
	exited, err := task.Wait(ctx)
	if err != nil {
		return "", nil, fmt.Errorf("wait for task: %w", err)
	}
	start := time.Now()
	if err := task.Start(ctx); err != nil {
		return "", nil, fmt.Errorf("start task: %w", err)
	}
	logf("container started; recording until %s", until(opts))
	timer := time.NewTimer(opts.Timeout)
	defer timer.Stop()
	var (
		end  string
		exit *uint32
	)
	select {
	case <-ready:
		end = EndReady
	case st := <-exited:
		end = EndExit
		code := st.ExitCode()
		exit = &code
	case <-timer.C:
		end = EndTimeout
	case <-ctx.Done():
		return "", nil, ctx.Err()
	}
	p.Phases.Ready = time.Since(start).Seconds()
	if end == EndExit && opts.ReadyLine != "" && drained(task.IO(), 5*time.Second) {
		// The app printed the ready line and exited at once: the exit can come before the line has left the pipe.
		select {
		case <-ready:
			end = EndReady
		default:
		}
	}
	logf("recording ended (%s) after %.2fs", end, p.Phases.Ready)
	if exit == nil {
		_ = task.Kill(ctx, syscall.SIGKILL)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			logf("the profiling task did not stop within 10s of SIGKILL")
		}
	}
	return end, exit, nil
}

// drained waits until the task's output has been copied out (its process exited), for at most d.
func drained(io cio.IO, d time.Duration) bool {
	if io == nil {
		return false
	}
	done := make(chan struct{})
	go func() {
		io.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(d):
		return false
	}
}

func until(opts Options) string {
	if opts.ReadyLine != "" {
		return fmt.Sprintf("it prints %q, exits, or %s pass", opts.ReadyLine, opts.Timeout)
	}
	return fmt.Sprintf("it exits or %s pass", opts.Timeout)
}

// addReads fills p's reads from the trace file and its times file.
func (p *Profile) addReads(tf []byte, tracePath string) error {
	recs, err := trace.Decode(tf)
	if err != nil {
		return fmt.Errorf("recorded trace: %w", err)
	}
	var times trace.Times
	if b, err := os.ReadFile(tracePath + trace.TimesSuffix); err == nil {
		if times, err = trace.DecodeTimes(b, len(recs)); err != nil {
			return err
		}
	}
	p.Dropped = times.Dropped
	for i, r := range recs {
		if int(r.Layer) >= len(p.Layers) {
			return fmt.Errorf("recorded trace: record %d reads layer %d of an image with %d", i, r.Layer, len(p.Layers))
		}
		rd := Read{Layer: r.Layer, Offset: r.Offset, Length: r.Count}
		if times.AtMicros != nil {
			rd.AtMS = float64(times.AtMicros[i]) / 1000
		}
		p.Reads = append(p.Reads, rd)
		p.ReadBytes += int64(r.Count)
	}
	if len(p.Reads) > 0 && times.AtMicros != nil {
		p.Phases.FirstRead = p.Reads[0].AtMS / 1000
	}
	return nil
}

// fetchedBy returns the registry traffic of the image being recorded into tracePath, nil if the status says none.
func fetchedBy(ctx context.Context, sc *status.Client, tracePath string) *Fetched {
	st, err := sc.Status(ctx)
	if err != nil {
		return nil
	}
	for _, im := range st.Images {
		if im.Recording == tracePath {
			return &Fetched{Bytes: im.BytesFetched, Requests: im.RegistryRequests}
		}
	}
	return nil
}

// waitFile waits until path exists.
func waitFile(ctx context.Context, path string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no %s after %s", path, limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// lineWatcher copies a container's output to w and closes ready at the first line that contains needle.
type lineWatcher struct {
	w      io.Writer
	needle string
	ready  chan struct{}
	mu     sync.Mutex
	line   []byte
	done   bool
}

func (l *lineWatcher) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.needle != "" && !l.done {
		l.line = append(l.line, p...)
		sc := bufio.NewScanner(bytes.NewReader(l.line))
		sc.Buffer(nil, len(l.line)+1)
		for sc.Scan() {
			if strings.Contains(sc.Text(), l.needle) {
				l.done = true
				close(l.ready)
				break
			}
		}
		if i := bytes.LastIndexByte(l.line, '\n'); i >= 0 {
			l.line = append(l.line[:0], l.line[i+1:]...)
		}
		// A line without end is kept only as far as a match could still start in it.
		if keep := len(l.needle); len(l.line) > 64<<10 {
			l.line = append(l.line[:0], l.line[len(l.line)-keep:]...)
		}
	}
	_, _ = l.w.Write(p)
	return len(p), nil
}

// TraceFile returns the trace file (upstream's format) that data is, or the one a profile (the JSON Record
// returns, 'obd profile --out') records; it fails when data is neither or the profile has no reads.
func TraceFile(data []byte) ([]byte, error) {
	if _, err := trace.Decode(data); err == nil {
		return data, nil
	}
	var p Profile
	if err := json.Unmarshal(data, &p); err != nil {
		return nil, fmt.Errorf("neither a trace file nor a profile: %w", err)
	}
	if len(p.Reads) == 0 {
		return nil, errors.New("a profile without reads")
	}
	recs := make([]trace.Record, len(p.Reads))
	for i, r := range p.Reads {
		recs[i] = trace.Record{Op: trace.Read, Layer: r.Layer, Count: r.Length, Offset: r.Offset}
	}
	var buf bytes.Buffer
	if err := trace.Encode(&buf, recs); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
