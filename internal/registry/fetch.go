package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// FetchBlob streams the whole blob desc. The stream verifies as it goes: it fails with ErrDigestMismatch instead
// of returning io.EOF when the bytes do not match desc.Digest or desc.Size (a negative size is not checked).
// A connection lost mid-body is resumed with a range request, within the retry budget. The stream stops when ctx
// ends; the caller closes it.
func (c *Client) FetchBlob(ctx context.Context, host, repo string, desc ocispec.Descriptor) (io.ReadCloser, error) {
	if err := desc.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("registry %s repo %s blob %q: %w", host, repo, desc.Digest, err)
	}
	s := &blobStream{ctx: ctx, c: c, host: host, repo: repo, desc: desc, digester: desc.Digest.Algorithm().Digester()}
	if err := s.open(); err != nil {
		return nil, err
	}
	return s, nil
}

// blobStream is FetchBlob's reader.
type blobStream struct {
	ctx        context.Context
	c          *Client
	host, repo string
	desc       ocispec.Descriptor
	digester   digest.Digester

	body      io.ReadCloser // nil between a lost connection and the next open
	off       int64         // bytes delivered (and hashed) so far
	failures  int           // consecutive body failures without progress
	failStart time.Time     // when the first of them happened
	err       error         // sticky final result (io.EOF on success)
}

func (s *blobStream) op() string {
	return fmt.Sprintf("registry %s repo %s blob %s", s.host, s.repo, s.desc.Digest)
}

// open (re)starts the download at s.off.
func (s *blobStream) open() error {
	rng := ""
	if s.off > 0 {
		rng = fmt.Sprintf("bytes=%d-", s.off)
	}
	r := &retrier{c: s.c, host: s.host, op: s.op}
	return r.do(s.ctx, func(ctx context.Context, timeout time.Duration) error {
		resp, err := s.c.openBlob(ctx, timeout, http.MethodGet, s.host, s.repo, s.desc.Digest, rng)
		if err != nil {
			return err
		}
		switch {
		case resp.StatusCode == http.StatusPartialContent:
			first, _, total, err := parseContentRange(resp.Header.Get("Content-Range"))
			if err != nil || first != s.off {
				resp.Body.Close()
				return invalidf("resuming at byte %d, got Content-Range %q", s.off, resp.Header.Get("Content-Range"))
			}
			if total >= 0 && s.desc.Size >= 0 && total != s.desc.Size {
				resp.Body.Close()
				return fmt.Errorf("%w: the registry says the blob has %d bytes, expected %d", ErrDigestMismatch, total, s.desc.Size)
			}
		case s.off > 0: // 200: the whole blob again; skip what was delivered
			if _, err := io.CopyN(io.Discard, resp.Body, s.off); err != nil {
				resp.Body.Close()
				return shortBody(err, "skipping to", s.off)
			}
		}
		s.body = resp.Body
		return nil
	})
}

// Read delivers the next bytes, resuming after lost connections and verifying at the end.
func (s *blobStream) Read(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	for {
		if s.body == nil {
			if err := s.open(); err != nil {
				s.err = err
				return 0, err
			}
		}
		n, err := s.body.Read(p)
		if n > 0 {
			s.digester.Hash().Write(p[:n])
			s.off += int64(n)
			s.failures = 0
			if s.desc.Size >= 0 && s.off > s.desc.Size {
				return s.fail(fmt.Errorf("%w: more than the expected %d bytes", ErrDigestMismatch, s.desc.Size), ErrDigestMismatch)
			}
		}
		if err == nil {
			return n, nil
		}
		s.body.Close()
		s.body = nil
		if err == io.EOF && (s.desc.Size < 0 || s.off == s.desc.Size) {
			if got := s.digester.Digest(); got != s.desc.Digest {
				return s.fail(fmt.Errorf("%w: got %s (%d bytes)", ErrDigestMismatch, got, s.off), ErrDigestMismatch)
			}
			s.err = io.EOF
			return n, io.EOF
		}
		if err == io.EOF {
			err = invalidf("connection closed after %d of %d bytes", s.off, s.desc.Size)
		}
		if s.ctx.Err() != nil {
			return s.fail(context.Cause(s.ctx), nil)
		}
		if v := s.c.classify(s.host, err); !v.retry {
			return s.fail(err, v.kind)
		}
		if s.failures == 0 {
			s.failStart = time.Now()
		}
		s.failures++
		if time.Since(s.failStart) > s.c.opts.RetryBudget {
			s.err = &Error{Op: s.op(), Err: err, Kind: ErrUnavailable, Attempts: s.failures, Elapsed: time.Since(s.failStart)}
			return n, s.err
		}
		s.c.log.Debug("blob download interrupted; resuming", "op", s.op(), "offset", s.off, "err", err)
		if n > 0 {
			return n, nil
		}
		t := time.NewTimer(backoff(s.failures))
		select {
		case <-s.ctx.Done():
			t.Stop()
			return s.fail(context.Cause(s.ctx), nil)
		case <-t.C:
		}
	}
}

// fail makes err the stream's final result.
func (s *blobStream) fail(err, kind error) (int, error) {
	if s.body != nil {
		s.body.Close()
		s.body = nil
	}
	s.err = &Error{Op: s.op(), Err: err, Kind: kind}
	return 0, s.err
}

// Close ends the download.
func (s *blobStream) Close() error {
	if s.body != nil {
		s.body.Close()
		s.body = nil
	}
	if s.err == nil {
		s.err = errors.New("read after close")
	}
	return nil
}
