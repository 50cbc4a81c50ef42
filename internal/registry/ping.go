package registry

import (
	"context"
	"net/http"
	"time"
)

// Ping checks that the registry at host accepts the client's credentials: it asks for the API root (GET /v2/),
// going through the registry's token exchange when it asks for one. It returns nil when the registry answers 200;
// otherwise an *Error wrapping ErrUnauthorized (the credentials were refused, or none were found for a registry that
// wants them), ErrUnavailable (unreachable within the retry budget, TLS or plain-HTTP trouble) or ErrNotFound (the
// server does not serve the registry API).
func (c *Client) Ping(ctx context.Context, host string) error {
	op := func() string { return "registry " + host }
	r := &retrier{c: c, host: host, op: op}
	return r.do(ctx, func(ctx context.Context, timeout time.Duration) error {
		wctx, w := newWatchdog(ctx, timeout)
		defer w.stop()
		req, err := http.NewRequestWithContext(wctx, http.MethodGet, c.baseURL(host)+"/v2/", nil)
		if err != nil {
			return permanentf("%w", err)
		}
		resp, err := c.reader.Do(req)
		if err != nil {
			return attemptErr(wctx, err)
		}
		if resp.StatusCode != http.StatusOK {
			return newStatusError(resp)
		}
		drainClose(resp.Body)
		return nil
	})
}
