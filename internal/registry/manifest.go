package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
)

// Manifest media types Resolve accepts.
const (
	MediaTypeDockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
)

// manifestMediaTypes are sent in Accept, most preferred first.
var manifestMediaTypes = []string{
	ocispec.MediaTypeImageIndex,
	ocispec.MediaTypeImageManifest,
	MediaTypeDockerManifestList,
	MediaTypeDockerManifest,
}

// Resolve fetches the manifest or index that tagOrDigest names in host/repo and returns its descriptor and bytes.
// The bytes are verified against the digest (the one asked for, or the registry's Docker-Content-Digest).
func (c *Client) Resolve(ctx context.Context, host, repo, tagOrDigest string) (ocispec.Descriptor, []byte, error) {
	op := func() string { return fmt.Sprintf("registry %s repo %s manifest %s", host, repo, tagOrDigest) }
	var want digest.Digest
	if strings.Contains(tagOrDigest, ":") {
		want = digest.Digest(tagOrDigest)
		if err := want.Validate(); err != nil {
			return ocispec.Descriptor{}, nil, &Error{Op: op(), Err: fmt.Errorf("invalid digest: %w", err)}
		}
	}
	var (
		desc ocispec.Descriptor
		data []byte
	)
	r := &retrier{c: c, host: host, op: op}
	err := r.do(ctx, func(ctx context.Context, timeout time.Duration) error {
		u := c.baseURL(host) + "/v2/" + repo + "/manifests/" + tagOrDigest
		ctx = auth.AppendRepositoryScope(ctx, registry.Reference{Registry: host, Repository: repo}, auth.ActionPull)
		wctx, w := newWatchdog(ctx, timeout)
		defer w.stop()
		req, err := http.NewRequestWithContext(wctx, http.MethodGet, u, nil)
		if err != nil {
			return err
		}
		req.Header.Set("Accept", strings.Join(manifestMediaTypes, ", "))
		start := time.Now()
		resp, err := c.reader.Do(req)
		if err != nil {
			err = attemptErr(wctx, err)
			c.observe("manifest", 0, 0, start, err)
			return err
		}
		if resp.StatusCode != http.StatusOK {
			c.observe("manifest", resp.StatusCode, 0, start, nil)
			return newStatusError(resp)
		}
		defer resp.Body.Close()
		w.timeout = c.opts.RequestTimeout
		w.kick()
		b, err := io.ReadAll(io.LimitReader(&watchedBody{body: resp.Body, w: w}, maxManifestBytes+1))
		if err != nil {
			err = attemptErr(wctx, err)
		}
		c.observe("manifest", resp.StatusCode, int64(len(b)), start, err)
		if err != nil {
			return err
		}
		if len(b) > maxManifestBytes {
			return permanentf("manifest larger than %d bytes", maxManifestBytes)
		}
		if resp.ContentLength >= 0 && resp.ContentLength != int64(len(b)) {
			return invalidf("short body: %d of %d bytes", len(b), resp.ContentLength)
		}
		d, err := verifyManifestDigest(b, want, resp.Header.Get("Docker-Content-Digest"))
		if err != nil {
			return err
		}
		mt, err := manifestMediaType(resp.Header.Get("Content-Type"), b)
		if err != nil {
			return err
		}
		desc = ocispec.Descriptor{MediaType: mt, Digest: d, Size: int64(len(b))}
		data = b
		return nil
	})
	return desc, data, err
}

// observe reports one attempt to Options.Observer, if set.
func (c *Client) observe(op string, status int, n int64, start time.Time, err error) {
	if c.opts.Observer != nil {
		c.opts.Observer(op, status, n, time.Since(start), err)
	}
}

// verifyManifestDigest returns the digest of b, checked against want (when resolving a digest) and against the
// registry's Docker-Content-Digest header (when it sent a valid one).
func verifyManifestDigest(b []byte, want digest.Digest, header string) (digest.Digest, error) {
	if want != "" {
		if got := want.Algorithm().FromBytes(b); got != want {
			return "", fmt.Errorf("%w: got %s", ErrDigestMismatch, got)
		}
		return want, nil
	}
	d := digest.FromBytes(b)
	if h := digest.Digest(header); header != "" && h.Validate() == nil {
		if got := h.Algorithm().FromBytes(b); got != h {
			return "", fmt.Errorf("%w: Docker-Content-Digest says %s, the bytes are %s", ErrDigestMismatch, h, got)
		}
		if h.Algorithm() == d.Algorithm() {
			return h, nil
		}
	}
	return d, nil
}

// manifestMediaType returns the media type of a manifest from its Content-Type, or from its mediaType field or
// shape when the registry sends a generic type.
func manifestMediaType(contentType string, b []byte) (string, error) {
	mt := mediaTypeOf(contentType)
	for _, known := range manifestMediaTypes {
		if mt == known {
			return mt, nil
		}
	}
	var probe struct {
		MediaType string            `json:"mediaType"`
		Manifests []json.RawMessage `json:"manifests"`
		Config    json.RawMessage   `json:"config"`
	}
	if err := json.Unmarshal(b, &probe); err != nil {
		return "", permanentf("manifest with Content-Type %q is not JSON: %w", contentType, err)
	}
	for _, known := range manifestMediaTypes {
		if probe.MediaType == known {
			return known, nil
		}
	}
	switch {
	case probe.MediaType != "":
		return "", permanentf("unsupported manifest media type %q", probe.MediaType)
	case probe.Manifests != nil:
		return ocispec.MediaTypeImageIndex, nil
	case probe.Config != nil:
		return ocispec.MediaTypeImageManifest, nil
	}
	return "", permanentf("unsupported manifest (Content-Type %q)", contentType)
}

// repository returns an oras repository for pushes.
func (c *Client) repository(host, repo string) (*remote.Repository, error) {
	ref := registry.Reference{Registry: host, Repository: repo}
	if err := ref.ValidateRepository(); err != nil {
		return nil, err
	}
	return &remote.Repository{Client: c.pusher, Reference: ref, PlainHTTP: c.opts.PlainHTTP}, nil
}

// errNextMount makes oras give up a mount attempt so that the next source repository can be tried.
var errNextMount = errors.New("mount refused; trying the next source")

// PushBlob uploads the blob desc read from r to host/repo. It does nothing if the registry already has the blob,
// and first tries a cross-repository mount from each of mountFrom (repositories of the same registry that hold
// the blob), uploading r only when no mount works.
func (c *Client) PushBlob(ctx context.Context, host, repo string, desc ocispec.Descriptor, r io.Reader, mountFrom ...string) error {
	op := fmt.Sprintf("push registry %s repo %s blob %s", host, repo, desc.Digest)
	rep, err := c.repository(host, repo)
	if err != nil {
		return &Error{Op: op, Err: err}
	}
	if ok, err := rep.Exists(ctx, desc); err != nil {
		return c.pushError(op, host, err)
	} else if ok {
		return nil
	}
	var sources []string
	for _, m := range mountFrom {
		if m != "" && m != repo {
			sources = append(sources, m)
		}
	}
	for i, from := range sources {
		last := i == len(sources)-1
		content := func() (io.ReadCloser, error) { return nil, errNextMount }
		if last {
			content = func() (io.ReadCloser, error) { return io.NopCloser(r), nil }
		}
		err := rep.Mount(ctx, desc, from, content)
		if err == nil {
			return nil
		}
		if last {
			return c.pushError(op, host, err)
		}
		c.log.Debug("cross-repository mount failed; trying the next source", "op", op, "from", from, "err", err)
	}
	if err := rep.Push(ctx, desc, r); err != nil {
		return c.pushError(op, host, err)
	}
	return nil
}

// PushManifest uploads manifest bytes b of mediaType to host/repo, tagged tag (or by digest only when tag is
// empty), and returns its descriptor.
func (c *Client) PushManifest(ctx context.Context, host, repo, tag, mediaType string, b []byte) (ocispec.Descriptor, error) {
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	op := fmt.Sprintf("push registry %s repo %s manifest %s", host, repo, desc.Digest)
	rep, err := c.repository(host, repo)
	if err != nil {
		return desc, &Error{Op: op, Err: err}
	}
	if tag == "" {
		err = rep.Manifests().Push(ctx, desc, bytes.NewReader(b))
	} else {
		err = rep.PushReference(ctx, desc, bytes.NewReader(b), tag)
	}
	if err != nil {
		return desc, c.pushError(op, host, err)
	}
	return desc, nil
}

// pushError wraps an oras error with the operation and, for refusals, what to do.
func (c *Client) pushError(op, host string, err error) error {
	v := c.classify(host, err)
	kind := v.kind
	if v.retry {
		kind = ErrUnavailable
	}
	return &Error{Op: op, Err: err, Kind: kind, Hint: v.hint}
}

// Referrers lists the manifests of host/repo whose subject is desc, of artifactType ("" for any): through the
// registry's referrers API, or the referrers tag schema (an index tagged sha256-<hex> of desc's digest) that
// clients push to registries without the API. None is an empty list, not an error.
func (c *Client) Referrers(ctx context.Context, host, repo string, desc ocispec.Descriptor, artifactType string) ([]ocispec.Descriptor, error) {
	op := fmt.Sprintf("registry %s repo %s referrers of %s", host, repo, desc.Digest)
	rep, err := c.repository(host, repo)
	if err != nil {
		return nil, &Error{Op: op, Err: err}
	}
	var out []ocispec.Descriptor
	err = rep.Referrers(ctx, desc, artifactType, func(refs []ocispec.Descriptor) error {
		out = append(out, refs...)
		return nil
	})
	if err != nil {
		return nil, &Error{Op: op, Err: err}
	}
	return out, nil
}
