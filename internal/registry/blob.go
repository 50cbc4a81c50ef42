package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote/auth"
)

// Blob reads byte ranges of one registry blob on demand. It is an io.ReaderAt and safe for concurrent use.
type Blob struct {
	c          *Client
	host, repo string
	dg         digest.Digest
	size       int64
	stats      counters

	// While the blob is dead (a read ran out of its retry budget), reads fail at once, except one probe attempt at
	// a time, at most every ProbeInterval; a read that gets through revives it.
	mu        sync.Mutex
	deadSince time.Time // zero: alive
	deadErr   error     // the error that killed it
	probing   bool
	lastProbe time.Time
}

// ProbeInterval is how often a dead blob is tried again by a read (one attempt, no retries); between probes its
// reads fail at once.
const ProbeInterval = 2 * time.Second

// BlobStats counts a Blob's traffic.
type BlobStats struct {
	Requests     int64 // HTTP attempts
	BytesFetched int64 // body bytes received
	Retries      int64 // attempts that were retried
	Errors       int64 // failed attempts (retried or not)
}

// Blob returns lazy random access to the blob dg of host/repo. A negative size is looked up with HEAD (or a
// one-byte range GET when HEAD gives no length).
func (c *Client) Blob(ctx context.Context, host, repo string, dg digest.Digest, size int64) (*Blob, error) {
	if err := dg.Validate(); err != nil {
		return nil, fmt.Errorf("registry %s repo %s blob %q: %w", host, repo, dg, err)
	}
	b := &Blob{c: c, host: host, repo: repo, dg: dg, size: size}
	if size < 0 {
		s, err := c.blobSize(ctx, host, repo, dg, &b.stats)
		if err != nil {
			return nil, err
		}
		b.size = s
	}
	return b, nil
}

// Size returns the blob's size in bytes.
func (b *Blob) Size() int64 { return b.size }

// Digest returns the blob's digest.
func (b *Blob) Digest() digest.Digest { return b.dg }

// Stats returns the blob's traffic counters.
func (b *Blob) Stats() BlobStats {
	return BlobStats{
		Requests:     b.stats.requests.Load(),
		BytesFetched: b.stats.bytes.Load(),
		Retries:      b.stats.retries.Load(),
		Errors:       b.stats.errors.Load(),
	}
}

// ReadAt reads len(p) bytes at off with one bounded range request (retried within the budget). It reads less
// only at the end of the blob, and then returns io.EOF.
func (b *Blob) ReadAt(p []byte, off int64) (int, error) {
	return b.ReadAtContext(context.Background(), p, off)
}

// ReadAtProgress is ReadAt that calls progress(n) each time more of p holds its bytes: the first n bytes, which are
// not written again (a retried attempt asks only for the rest).
func (b *Blob) ReadAtProgress(p []byte, off int64, progress func(n int)) (int, error) {
	return b.readAt(context.Background(), p, off, progress)
}

// ReadAtContext is ReadAt that stops when ctx ends.
func (b *Blob) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	return b.readAt(ctx, p, off, nil)
}

func (b *Blob) readAt(ctx context.Context, p []byte, off int64, progress func(n int)) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("registry %s repo %s blob %s: negative offset %d", b.host, b.repo, b.dg, off)
	}
	if off >= b.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), b.size-off))
	if n == 0 {
		return 0, nil
	}
	if err := b.readRange(ctx, p[:n], off, progress); err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// readRange fills p with the bytes at off, which lie inside the blob, calling progress (if set) as they arrive. A
// dead blob fails at once (see Blob).
func (b *Blob) readRange(ctx context.Context, p []byte, off int64, progress func(n int)) error {
	last := off + int64(len(p)) - 1
	op := func() string {
		return fmt.Sprintf("registry %s repo %s blob %s bytes %d-%d", b.host, b.repo, b.dg, off, last)
	}
	probe, err := b.admit(op)
	if err != nil {
		return err
	}
	err = b.fetchRange(ctx, p, off, last, op, probe, progress)
	b.settle(err, probe)
	return err
}

// admit lets a read through to the registry: always while the blob is alive; while it is dead, only as the probe
// (one attempt) when no probe is running and the last is ProbeInterval old, else it fails at once.
func (b *Blob) admit(op func() string) (probe bool, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.deadSince.IsZero() {
		return false, nil
	}
	if !b.probing && time.Since(b.lastProbe) >= ProbeInterval {
		b.probing, b.lastProbe = true, time.Now()
		return true, nil
	}
	return false, &Error{Op: op(), Err: fmt.Errorf("failing at once: unreachable since %s (%s ago), last error: %w",
		b.deadSince.Format(time.TimeOnly), time.Since(b.deadSince).Round(time.Second), b.deadErr), Kind: ErrUnavailable}
}

// settle records the outcome of a read: a read that ran out of retries (or a failed probe) marks the blob dead, a
// success revives it.
func (b *Blob) settle(err error, probe bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if probe {
		b.probing = false
	}
	switch {
	case err == nil:
		if !b.deadSince.IsZero() {
			b.c.log.Info("registry blob reachable again", "host", b.host, "repo", b.repo, "blob", b.dg, "dead_for", time.Since(b.deadSince).Round(time.Second))
			b.deadSince, b.deadErr = time.Time{}, nil
		}
	case errors.Is(err, ErrUnavailable) && b.deadSince.IsZero():
		b.deadSince, b.deadErr, b.lastProbe = time.Now(), err, time.Now()
		b.c.log.Warn("registry blob unreachable: its reads fail at once until a probe gets through", "host", b.host, "repo", b.repo, "blob", b.dg, "probe_interval", ProbeInterval, "err", err)
	}
}

// fetchRange asks the registry for bytes off..last into p: within the retry budget, or with one attempt for a probe.
// An attempt that fails after some bytes arrived is followed by one for the rest.
func (b *Blob) fetchRange(ctx context.Context, p []byte, off, last int64, op func() string, probe bool, progress func(n int)) error {
	got := 0 // bytes of p received, by earlier attempts too
	r := &retrier{c: b.c, host: b.host, stats: &b.stats, op: op, once: probe}
	return r.do(ctx, func(ctx context.Context, timeout time.Duration) error {
		from := off + int64(got)
		resp, err := b.c.openBlob(ctx, timeout, http.MethodGet, b.host, b.repo, b.dg, fmt.Sprintf("bytes=%d-%d", from, last))
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body := &countingReader{r: resp.Body, n: &b.stats.bytes}
		switch resp.StatusCode {
		case http.StatusPartialContent:
			cr := resp.Header.Get("Content-Range")
			first, end, total, err := parseContentRange(cr)
			if err != nil {
				return invalidf("asked for bytes %d-%d: %v", from, last, err)
			}
			if total >= 0 && total != b.size {
				return fmt.Errorf("%w: the registry says the blob has %d bytes, expected %d", ErrDigestMismatch, total, b.size)
			}
			if first != from || end != last {
				return invalidf("asked for bytes %d-%d, got Content-Range %q", from, last, cr)
			}
			if resp.ContentLength >= 0 && resp.ContentLength != last-from+1 {
				return invalidf("asked for %d bytes, got Content-Length %d", last-from+1, resp.ContentLength)
			}
		case http.StatusOK:
			// The server ignored the range: accept it only when it sends exactly the whole blob.
			if resp.ContentLength >= 0 && resp.ContentLength != b.size {
				return invalidf("asked for bytes %d-%d, got 200 with %d bytes for a blob of %d", from, last, resp.ContentLength, b.size)
			}
			if _, err := io.CopyN(io.Discard, body, from); err != nil {
				return shortBody(err, "skipping to", from)
			}
		}
		for got < len(p) {
			m, err := body.Read(p[got:])
			got += m
			if m > 0 && progress != nil {
				progress(got)
			}
			if got == len(p) {
				break
			}
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			if err != nil {
				return shortBody(err, "body", int64(got)-(from-off))
			}
		}
		return nil
	})
}

// shortBody describes a body that ended early; other read errors pass through.
func shortBody(err error, what string, got int64) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return invalidf("short body: connection closed after %d bytes (%s)", got, what)
	}
	return err
}

// countingReader adds the bytes read to a counter.
type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// blobSize asks the registry for the size of a blob.
func (c *Client) blobSize(ctx context.Context, host, repo string, dg digest.Digest, stats *counters) (int64, error) {
	r := &retrier{c: c, host: host, stats: stats, op: func() string {
		return fmt.Sprintf("registry %s repo %s blob %s size", host, repo, dg)
	}}
	var size int64
	err := r.do(ctx, func(ctx context.Context, timeout time.Duration) error {
		resp, err := c.openBlob(ctx, timeout, http.MethodHead, host, repo, dg, "")
		if err != nil {
			return err
		}
		drainClose(resp.Body)
		if resp.StatusCode == http.StatusOK && resp.ContentLength >= 0 {
			size = resp.ContentLength
			return nil
		}
		resp, err = c.openBlob(ctx, timeout, http.MethodGet, host, repo, dg, "bytes=0-0")
		if err != nil {
			return err
		}
		defer drainClose(resp.Body)
		if resp.StatusCode == http.StatusOK {
			if resp.ContentLength < 0 {
				return invalidf("no Content-Length or Content-Range: cannot tell the blob size")
			}
			size = resp.ContentLength
			return nil
		}
		cr := resp.Header.Get("Content-Range")
		_, _, total, err := parseContentRange(cr)
		if err != nil || total < 0 {
			return invalidf("cannot tell the blob size from Content-Range %q", cr)
		}
		size = total
		return nil
	})
	return size, err
}

// openBlob sends one GET or HEAD for a blob, trying mirrors first, and returns an answer with status 200 or 206.
// rng is a Range header value or "". The headers must arrive within timeout; then the body must make progress
// at least every RequestTimeout.
func (c *Client) openBlob(ctx context.Context, timeout time.Duration, method, host, repo string, dg digest.Digest, rng string) (*http.Response, error) {
	for _, m := range c.liveMirrors(host) {
		resp, err := c.openBlobAt(ctx, timeout, method, m, repo, dg, rng)
		if err == nil || ctx.Err() != nil {
			return resp, err
		}
		c.markMirrorDown(m, err)
	}
	return c.openBlobAt(ctx, timeout, method, host, repo, dg, rng)
}

// openBlobAt is openBlob for one endpoint. A GET first tries the blob's cached redirect target, without
// credentials; when that fails it is forgotten and the registry is asked again.
func (c *Client) openBlobAt(ctx context.Context, timeout time.Duration, method, host, repo string, dg digest.Digest, rng string) (*http.Response, error) {
	key := host + "/" + repo + "@" + dg.String()
	if method == http.MethodGet {
		if loc := c.cachedLocation(key); loc != "" {
			resp, err := c.send(ctx, timeout, c.plain, method, loc, rng)
			if err == nil && (resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusPartialContent) {
				return resp, nil
			}
			if err == nil {
				err = newStatusError(resp)
			}
			c.setLocation(key, "")
			c.log.Debug("cached blob location failed; asking the registry again", "blob", dg, "err", err)
		}
	}
	u := c.baseURL(host) + "/v2/" + repo + "/blobs/" + dg.String()
	ctx = auth.AppendRepositoryScope(ctx, registry.Reference{Registry: host, Repository: repo}, auth.ActionPull)
	resp, err := c.send(ctx, timeout, c.reader, method, u, rng)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusPartialContent {
		return nil, newStatusError(resp)
	}
	if final := resp.Request.URL; method == http.MethodGet && final.Host != apiHost(host) {
		c.setLocation(key, final.String())
	}
	return resp, nil
}

// doer sends requests: *http.Client or *auth.Client.
type doer interface {
	Do(*http.Request) (*http.Response, error)
}

// send performs one request under a watchdog: headers within timeout, then body progress every RequestTimeout.
// The returned body stops the watchdog when closed.
func (c *Client) send(ctx context.Context, timeout time.Duration, d doer, method, url, rng string) (*http.Response, error) {
	wctx, w := newWatchdog(ctx, timeout)
	req, err := http.NewRequestWithContext(wctx, method, url, nil)
	if err != nil {
		w.stop()
		return nil, err
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	if d == c.plain {
		req.Header.Set("User-Agent", c.opts.UserAgent)
	}
	start := time.Now()
	resp, err := d.Do(req)
	if err != nil {
		w.stop()
		err = attemptErr(wctx, err)
		c.observe(blobOp(method, rng), 0, 0, start, err)
		return nil, err
	}
	w.timeout = c.opts.RequestTimeout
	w.kick()
	wb := &watchedBody{body: resp.Body, w: w}
	resp.Body = wb
	if c.opts.Observer != nil {
		resp.Body = &observedBody{watchedBody: wb, obs: c.opts.Observer, op: blobOp(method, rng), status: resp.StatusCode, start: start}
	}
	return resp, nil
}

// blobOp names a blob request for Options.Observer.
func blobOp(method, rng string) string {
	switch {
	case method == http.MethodHead:
		return "blob_head"
	case rng != "":
		return "blob_range"
	}
	return "blob_get"
}

// observedBody reports an attempt to Options.Observer when its body is closed.
type observedBody struct {
	*watchedBody
	obs    func(op string, status int, bytes int64, d time.Duration, err error)
	op     string
	status int
	start  time.Time
	n      int64
	err    error
	once   sync.Once
}

func (b *observedBody) Read(p []byte) (int, error) {
	n, err := b.watchedBody.Read(p)
	b.n += int64(n)
	if err != nil && err != io.EOF && b.err == nil {
		b.err = err
	}
	return n, err
}

func (b *observedBody) Close() error {
	err := b.watchedBody.Close()
	b.once.Do(func() { b.obs(b.op, b.status, b.n, time.Since(b.start), b.err) })
	return err
}
