package registry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"oras.land/oras-go/v2/registry/remote/errcode"
)

// Sentinel errors; every error of this package that fits one of them wraps it (test with errors.Is).
var (
	// ErrUnavailable: the registry did not answer usefully within the retry budget (network errors, 5xx, 429,
	// timeouts, malformed answers). Callers turn it into EIO; the registry may come back later.
	ErrUnavailable = errors.New("registry unavailable")
	// ErrUnauthorized: the registry refused our credentials (401 after authenticating, or 403).
	ErrUnauthorized = errors.New("unauthorized")
	// ErrNotFound: the registry answered 404 for the manifest or blob.
	ErrNotFound = errors.New("not found")
	// ErrDigestMismatch: the bytes received do not match the expected digest or size.
	ErrDigestMismatch = errors.New("digest mismatch")
)

// Error is a failed registry operation: what was asked of whom, why it failed and, when retries ran out, how often
// and how long it was tried.
type Error struct {
	Op       string        // e.g. "registry 127.0.0.1:5000 repo app blob sha256:ab12… bytes 0-4095"
	Err      error         // the last cause
	Kind     error         // a sentinel of this package, or nil
	Attempts int           // attempts made when the retry budget ran out, else 0
	Elapsed  time.Duration // time spent when the retry budget ran out
	Hint     string        // what the user can do, or ""
}

// Error formats the operation, the cause, the attempts and the hint.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.Op)
	b.WriteString(": ")
	b.WriteString(e.Err.Error())
	if e.Attempts > 0 {
		plural := "s"
		if e.Attempts == 1 {
			plural = ""
		}
		fmt.Fprintf(&b, " after %d attempt%s in %s", e.Attempts, plural, e.Elapsed.Round(100*time.Millisecond))
	}
	if e.Hint != "" {
		b.WriteString(" — ")
		b.WriteString(e.Hint)
	}
	return b.String()
}

// Unwrap returns the sentinel and the cause.
func (e *Error) Unwrap() []error {
	var errs []error
	for _, err := range []error{e.Kind, e.Err} {
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// statusError is an HTTP answer we did not expect.
type statusError struct {
	code       int
	status     string
	retryAfter time.Duration // from Retry-After on 429/503
	detail     string        // start of the body, when it says something
}

func (e *statusError) Error() string {
	s := e.status
	if s == "" {
		s = fmt.Sprintf("%d %s", e.code, http.StatusText(e.code))
	}
	if e.detail != "" {
		s += " (" + e.detail + ")"
	}
	return s
}

// newStatusError builds a statusError from resp and closes its body.
func newStatusError(resp *http.Response) *statusError {
	e := &statusError{code: resp.StatusCode, status: resp.Status}
	if resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable {
		e.retryAfter = parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
	}
	if resp.Body != nil {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		drainClose(resp.Body)
		if d := strings.Join(strings.Fields(string(b)), " "); d != "" && len(d) <= 200 {
			e.detail = d
		}
	}
	return e
}

// parseRetryAfter reads a Retry-After value (seconds or an HTTP date); 0 if absent or malformed.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if s, err := strconv.ParseInt(v, 10, 64); err == nil {
		if s < 0 {
			return 0
		}
		if s > 24*3600 {
			s = 24 * 3600
		}
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// invalidResponseError is an answer that breaks the protocol (wrong Content-Range, short body, …). It is retried:
// proxies and CDNs produce such answers transiently.
type invalidResponseError struct{ msg string }

func (e *invalidResponseError) Error() string { return e.msg }

func invalidf(format string, args ...any) error {
	return &invalidResponseError{msg: fmt.Sprintf(format, args...)}
}

// permanentError is an answer that retrying cannot fix (an unsupported manifest, a manifest too large, …).
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// permanentf returns a permanentError.
func permanentf(format string, args ...any) error {
	return &permanentError{err: fmt.Errorf(format, args...)}
}

// errAttemptTimeout cancels an attempt whose headers or body stalled longer than RequestTimeout.
var errAttemptTimeout = errors.New("no answer within the request timeout")

// verdict says how to handle a failed attempt.
type verdict struct {
	retry      bool
	retryAfter time.Duration
	kind       error // sentinel for a final failure
	hint       string
}

// classify decides whether err is worth retrying.
func (c *Client) classify(host string, err error) verdict {
	var se *statusError
	if errors.As(err, &se) {
		return c.classifyStatus(host, se.code, se.retryAfter)
	}
	var er *errcode.ErrorResponse // oras: the token endpoint refused
	if errors.As(err, &er) {
		return c.classifyStatus(host, er.StatusCode, 0)
	}
	var ir *invalidResponseError
	if errors.As(err, &ir) {
		return verdict{retry: true}
	}
	var pe *permanentError
	if errors.As(err, &pe) {
		return verdict{}
	}
	var uae x509.UnknownAuthorityError
	var he x509.HostnameError
	var cve *tls.CertificateVerificationError
	if errors.As(err, &uae) || errors.As(err, &he) || errors.As(err, &cve) {
		return verdict{kind: ErrUnavailable, hint: fmt.Sprintf("the TLS certificate of %s is not trusted: pass its CA file, or use an insecure registry setting only if you trust the network", host)}
	}
	if strings.Contains(err.Error(), "server gave HTTP response to HTTPS client") {
		return verdict{kind: ErrUnavailable, hint: fmt.Sprintf("%s speaks plain HTTP: configure it as a plain-http registry", host)}
	}
	if strings.Contains(err.Error(), "missing username or password") || strings.Contains(err.Error(), "basic credential not found") {
		return verdict{kind: ErrUnauthorized, hint: c.authHint(host)}
	}
	if errors.Is(err, ErrDigestMismatch) {
		return verdict{kind: ErrDigestMismatch}
	}
	return verdict{retry: true} // network errors, resets, EOFs, timeouts
}

// classifyStatus decides about an HTTP status code.
func (c *Client) classifyStatus(host string, code int, retryAfter time.Duration) verdict {
	switch {
	case code == http.StatusUnauthorized:
		return verdict{kind: ErrUnauthorized, hint: c.authHint(host)}
	case code == http.StatusForbidden:
		return verdict{kind: ErrUnauthorized, hint: "the registry denied access: " + c.authHint(host)}
	case code == http.StatusNotFound:
		return verdict{kind: ErrNotFound}
	case code == http.StatusTooManyRequests || code == http.StatusRequestTimeout:
		return verdict{retry: true, retryAfter: retryAfter}
	case code >= 500 && code != http.StatusNotImplemented && code != http.StatusHTTPVersionNotSupported:
		return verdict{retry: true, retryAfter: retryAfter}
	}
	return verdict{}
}

// counters are the statistics an operation updates; nil counters are ignored.
type counters struct {
	requests, bytes, retries, errors atomic.Int64
}

// retrier runs one operation with bounded, jittered exponential backoff.
type retrier struct {
	c     *Client
	host  string        // registry named in auth hints
	op    func() string // describes the operation for errors (lazily: it is rarely needed)
	stats *counters     // may be nil
	once  bool          // one attempt: a failure worth retrying fails with ErrUnavailable at once
}

// backoff returns the pause before attempt n+1 (n ≥ 1): 200ms·2^(n-1) capped at 10s, jittered to 50–100%.
func backoff(n int) time.Duration {
	d := 200 * time.Millisecond
	for i := 1; i < n && d < 10*time.Second; i++ {
		d *= 2
	}
	d = min(d, 10*time.Second)
	return d/2 + rand.N(d/2+1)
}

// do calls fn until it succeeds, fails for good, or the retry budget is spent. fn gets the time it may use for
// one attempt's headers; it returns nil on success.
func (r *retrier) do(ctx context.Context, fn func(ctx context.Context, timeout time.Duration) error) error {
	start := time.Now()
	budget := r.c.opts.RetryBudget
	deadline := start.Add(budget)
	refreshed := false
	for attempt := 1; ; attempt++ {
		timeout := min(r.c.opts.RequestTimeout, max(time.Until(deadline), min(r.c.opts.RequestTimeout, time.Second)))
		if r.stats != nil {
			r.stats.requests.Add(1)
		}
		err := fn(ctx, timeout)
		if err == nil {
			return nil
		}
		if r.stats != nil {
			r.stats.errors.Add(1)
		}
		if ctx.Err() != nil {
			return &Error{Op: r.op(), Err: context.Cause(ctx)}
		}
		v := r.c.classify(r.host, err)
		if v.kind == ErrUnauthorized && !refreshed && r.c.opts.RefreshCredentials != nil && r.c.opts.RefreshCredentials(r.host) {
			refreshed = true // fresh credentials may be accepted: try once more, at once
			r.c.log.Debug("registry refused credentials; retrying with fresh ones", "op", r.op(), "err", err)
			continue
		}
		if !v.retry {
			return &Error{Op: r.op(), Err: err, Kind: v.kind, Hint: v.hint}
		}
		wait := max(backoff(attempt), v.retryAfter)
		if r.once || time.Now().Add(wait).After(deadline) {
			return &Error{Op: r.op(), Err: err, Kind: ErrUnavailable, Attempts: attempt, Elapsed: time.Since(start)}
		}
		r.c.log.Debug("registry request failed; retrying", "op", r.op(), "attempt", attempt, "wait", wait, "err", err)
		if r.stats != nil {
			r.stats.retries.Add(1)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return &Error{Op: r.op(), Err: context.Cause(ctx)}
		case <-t.C:
		}
	}
}

// watchdog cancels an attempt when its headers do not arrive, or its body makes no progress, within a timeout.
type watchdog struct {
	ctx     context.Context
	timer   *time.Timer
	timeout time.Duration
	cancel  context.CancelCauseFunc
}

// newWatchdog returns a context that is cancelled with errAttemptTimeout unless kicked every timeout.
func newWatchdog(parent context.Context, timeout time.Duration) (context.Context, *watchdog) {
	ctx, cancel := context.WithCancelCause(parent)
	w := &watchdog{ctx: ctx, timeout: timeout, cancel: cancel}
	w.timer = time.AfterFunc(timeout, func() { cancel(errAttemptTimeout) })
	return ctx, w
}

// kick restarts the timeout.
func (w *watchdog) kick() { w.timer.Reset(w.timeout) }

// stop ends the watch and releases the context.
func (w *watchdog) stop() {
	w.timer.Stop()
	w.cancel(context.Canceled)
}

// watchedBody kicks a watchdog whenever the body makes progress and stops it when closed.
type watchedBody struct {
	body io.ReadCloser
	w    *watchdog
}

func (b *watchedBody) Read(p []byte) (int, error) {
	n, err := b.body.Read(p)
	if n > 0 {
		b.w.kick()
	}
	if err != nil && err != io.EOF {
		err = attemptErr(b.w.ctx, err)
	}
	return n, err
}

func (b *watchedBody) Close() error {
	err := b.body.Close()
	b.w.stop()
	return err
}

// attemptErr turns the error of an attempt cancelled by its watchdog into errAttemptTimeout.
func attemptErr(ctx context.Context, err error) error {
	if errors.Is(context.Cause(ctx), errAttemptTimeout) {
		return errAttemptTimeout
	}
	return err
}

// Cause returns the cause of a registry error without its operation and hint; any other error as it is.
func Cause(err error) string {
	var re *Error
	if errors.As(err, &re) && re.Err != nil {
		return re.Err.Error()
	}
	return err.Error()
}
