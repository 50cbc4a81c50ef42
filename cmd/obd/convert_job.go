package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	digest "github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/registry/remote"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
)

// convertJob is one `obd convert`: a source, a destination and the options of every image it converts.
type convertJob struct {
	src, dst  image.Ref
	tag       string // destination tag; "" stores by digest only
	platform  image.Platform
	all       bool // every platform of an index
	opts      convert.ImageOptions
	rf        *registryFlags
	db        *convert.DB
	progress  io.Writer // nil: quiet
	dest      destination
	converted []convertedImage
	// top is the descriptor of what was written under the tag: the manifest, or the index with --platform all.
	top ocispec.Descriptor
	// timings sums the seconds spent per conversion stage.
	timings map[string]float64
}

// convertedImage is one converted manifest.
type convertedImage struct {
	Platform *ocispec.Platform `json:"platform,omitempty"`
	Manifest string            `json:"manifest"`
	Config   string            `json:"config"`
	Layers   []string          `json:"layers"`
	Reused   []string          `json:"reused,omitempty"`
}

// destination receives converted images: a registry repository or an OCI layout.
type destination interface {
	// putImage stores a converted image: layer blobs, config, then its manifest under tag ("" for by digest only).
	// An image that is not the top (an index's entry) is stored by digest only and not listed in a layout's index.
	putImage(ctx context.Context, res *convert.Result, tag string, top bool) error
	// putIndex stores an index, whose manifests are stored already, under tag ("" for by digest only).
	putIndex(ctx context.Context, desc ocispec.Descriptor, b []byte, tag string) error
	// finish records what was stored, once everything was.
	finish() error
}

func (j *convertJob) logf(format string, args ...any) {
	if j.progress != nil {
		fmt.Fprintf(j.progress, format, args...)
	}
}

func (j *convertJob) run(ctx context.Context) error {
	if j.db != nil {
		defer func() {
			if _, err := j.db.Trim(); err != nil {
				j.logf("warning: %v\n", err)
			}
		}()
	}
	if j.dst.Transport == image.TransportRegistry {
		c, err := j.rf.client(j.dst.Host())
		if err != nil {
			return err
		}
		defer c.Close()
		j.dest = &registryDest{c: c, dst: j.dst, src: j.src, db: j.db}
		if j.db != nil {
			host := j.dst.Host()
			j.opts.Remote = &convert.RemoteBlobs{Host: host, Open: func(ctx context.Context, repo string, desc ocispec.Descriptor) (io.ReaderAt, error) {
				return c.Blob(ctx, host, repo, desc.Digest, desc.Size)
			}}
		}
	} else {
		j.dest = &layoutDest{dir: j.dst.Path}
	}
	if j.opts.Referrer && j.src.Transport == image.TransportRegistry && j.dst.Transport == image.TransportRegistry && j.src.Name != j.dst.Name {
		j.logf("note: referrers are listed per repository; the subject %s is not in %s unless it is pushed there too\n", j.src, j.dst.Name)
	}
	var err error
	if j.all {
		err = j.convertAll(ctx)
	} else {
		err = j.convertSingle(ctx, j.platform)
	}
	if err != nil {
		return err
	}
	if err := j.dest.finish(); err != nil {
		j.logf("warning: %v\n", err)
	}
	return nil
}

// openSource opens the image of platform from the job's source.
func (j *convertJob) openSource(ctx context.Context, ref image.Ref, platform image.Platform) (image.Source, error) {
	return openSource(ctx, ref, platform, j.rf)
}

// convertSingle converts one manifest (the platform's, from an index) and stores it under the tag.
func (j *convertJob) convertSingle(ctx context.Context, platform image.Platform) error {
	source, err := j.openSource(ctx, j.src, platform)
	if err != nil {
		return err
	}
	defer source.Close()
	res, err := j.convert(ctx, source, "")
	if err != nil {
		return err
	}
	defer res.Cleanup()
	if err := j.dest.putImage(ctx, res, j.tag, true); err != nil {
		return fmt.Errorf("write %s: %w", j.dst, err)
	}
	j.top = res.ManifestDesc
	j.record(nil, res)
	return nil
}

func (j *convertJob) convert(ctx context.Context, source image.Source, prefix string) (*convert.Result, error) {
	opts := j.opts
	opts.DB = j.db
	opts.Progress = func(p convert.Progress) {
		if j.progress != nil {
			fmt.Fprint(j.progress, prefix)
			printProgress(j.progress, p)
		}
	}
	res, err := convert.ConvertImage(ctx, source, opts)
	if err != nil {
		return nil, fmt.Errorf("convert %s: %w", source.Ref(), err)
	}
	return res, nil
}

func (j *convertJob) record(platform *ocispec.Platform, res *convert.Result) {
	ci := convertedImage{Platform: platform, Manifest: res.ManifestDesc.Digest.String(), Config: res.ConfigDesc.Digest.String()}
	if j.timings == nil {
		j.timings = map[string]float64{}
	}
	for k, v := range res.Timings {
		j.timings[k] += v.Seconds()
	}
	for _, b := range res.Blobs {
		ci.Layers = append(ci.Layers, b.Desc.Digest.String())
		if b.Reused {
			ci.Reused = append(ci.Reused, b.Desc.Digest.String())
		}
	}
	j.converted = append(j.converted, ci)
}

// readTop returns the descriptor and bytes of the manifest or index the source names.
func (j *convertJob) readTop(ctx context.Context) (ocispec.Descriptor, []byte, error) {
	switch j.src.Transport {
	case image.TransportOCI:
		lay, err := image.OpenLayout(j.src.Path)
		if err != nil {
			return ocispec.Descriptor{}, nil, err
		}
		return lay.Top(j.src)
	case image.TransportRegistry:
		c, err := j.rf.client(j.src.Host())
		if err != nil {
			return ocispec.Descriptor{}, nil, err
		}
		defer c.Close()
		sel := j.src.Tag
		if j.src.Digest != "" {
			sel = j.src.Digest.String()
		}
		return c.Resolve(ctx, j.src.Host(), j.src.Repository(), sel)
	}
	return ocispec.Descriptor{}, nil, nil // a docker archive holds one image
}

// skipReason says why an index entry is not converted, or "".
func skipReason(d ocispec.Descriptor) string {
	switch {
	case d.Annotations["vnd.docker.reference.type"] != "":
		return d.Annotations["vnd.docker.reference.type"] + " (not an image)"
	case d.MediaType != ocispec.MediaTypeImageManifest && d.MediaType != image.MediaTypeDockerManifest:
		return fmt.Sprintf("media type %q is not an image manifest", d.MediaType)
	case d.Platform == nil || d.Platform.OS == "" || d.Platform.OS == "unknown" || d.Platform.Architecture == "unknown":
		return "no platform"
	}
	return ""
}

// convertAll converts every platform of the source index and stores an index of the converted manifests under the
// tag. Each platform's image is stored (by digest) as soon as it is converted; the index comes last.
func (j *convertJob) convertAll(ctx context.Context) error {
	top, b, err := j.readTop(ctx)
	if err != nil {
		return err
	}
	if !image.IsIndex(top.MediaType) {
		j.logf("%s is a single image, not an index: converting it\n", j.src)
		return j.convertSingle(ctx, j.platform)
	}
	idx, err := image.ParseIndex(b)
	if err != nil {
		return fmt.Errorf("%s: index %s: %w", j.src, top.Digest, err)
	}
	var todo []ocispec.Descriptor
	for _, d := range idx.Manifests {
		if why := skipReason(d); why != "" {
			j.logf("skipping %s: %s\n", d.Digest, why)
			continue
		}
		todo = append(todo, d)
	}
	if len(todo) == 0 {
		return fmt.Errorf("%s: index %s lists no image manifest with a platform to convert", j.src, top.Digest)
	}
	out := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: top.MediaType, Annotations: idx.Annotations}
	if j.opts.OCI || j.opts.Referrer {
		out.MediaType = ocispec.MediaTypeImageIndex
	}
	if j.opts.Referrer {
		out.ArtifactType = convert.ArtifactTypeOverlaybd
		out.Subject = &top
	}
	for n, d := range todo {
		p := *d.Platform
		plat := image.Platform{OS: p.OS, Architecture: p.Architecture, Variant: p.Variant}
		j.logf("platform %s (%d/%d): %s\n", plat, n+1, len(todo), d.Digest)
		ref := j.src
		ref.Tag, ref.Digest = "", d.Digest
		var source image.Source
		if j.src.Transport == image.TransportOCI {
			ref.Tag = j.src.Tag
			source, err = image.OpenLayoutManifest(ref, d)
		} else {
			source, err = j.openSource(ctx, ref, plat)
		}
		if err != nil {
			return fmt.Errorf("platform %s: %w", plat, err)
		}
		res, err := j.convert(ctx, source, plat.String()+": ")
		source.Close()
		if err != nil {
			return fmt.Errorf("platform %s: %w", plat, err)
		}
		err = j.dest.putImage(ctx, res, "", false)
		res.Cleanup()
		if err != nil {
			return fmt.Errorf("platform %s: write %s: %w", plat, j.dst, err)
		}
		j.record(&p, res)
		md := res.ManifestDesc
		md.Platform = &p
		out.Manifests = append(out.Manifests, md)
	}
	ib, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	j.top = ocispec.Descriptor{MediaType: out.MediaType, Digest: digest.FromBytes(ib), Size: int64(len(ib))}
	if j.opts.Referrer {
		j.top.ArtifactType = convert.ArtifactTypeOverlaybd
	}
	if err := j.dest.putIndex(ctx, j.top, ib, j.tag); err != nil {
		return fmt.Errorf("write %s: %w", j.dst, err)
	}
	return nil
}

// layoutDest writes converted images into an OCI layout, created when the first image is written.
type layoutDest struct {
	dir string
	lay *image.Layout
}

func (d *layoutDest) open() error {
	if d.lay != nil {
		return nil
	}
	lay, err := image.CreateLayout(d.dir)
	d.lay = lay
	return err
}

func (d *layoutDest) putImage(ctx context.Context, res *convert.Result, tag string, top bool) error {
	if err := d.open(); err != nil {
		return err
	}
	for _, b := range res.Blobs {
		if b.Path == "" {
			return fmt.Errorf("layer %s: no local copy of the blob to store", b.Desc.Digest)
		}
		if err := d.lay.PutBlobFile(b.Path, b.Desc.Digest, b.Desc.Size); err != nil {
			return err
		}
	}
	if _, err := d.lay.PutBlobBytes(res.ConfigDesc.MediaType, res.Config); err != nil {
		return err
	}
	if !top {
		_, err := d.lay.PutBlobBytes(res.ManifestDesc.MediaType, res.Manifest)
		return err
	}
	desc := res.ManifestDesc
	desc.ArtifactType = artifactType(res.Manifest)
	return d.putIndex(ctx, desc, res.Manifest, tag)
}

func (d *layoutDest) putIndex(ctx context.Context, desc ocispec.Descriptor, b []byte, tag string) error {
	if err := d.open(); err != nil {
		return err
	}
	if _, err := d.lay.PutBlobBytes(desc.MediaType, b); err != nil {
		return err
	}
	if tag == "" {
		return d.lay.AddManifest(desc)
	}
	return d.lay.TagManifest(tag, desc)
}

func (d *layoutDest) finish() error { return nil }

// artifactType returns the artifactType field of a manifest or index.
func artifactType(b []byte) string {
	var probe struct {
		ArtifactType string `json:"artifactType"`
	}
	_ = json.Unmarshal(b, &probe)
	return probe.ArtifactType
}

// registryDest pushes converted images to a registry repository.
type registryDest struct {
	c        *registry.Client
	dst, src image.Ref
	db       *convert.DB
	pushed   []digest.Digest
}

// putImage pushes layer blobs (skipped when the repository has them, mounted from other repositories of the
// registry that do), the config, then the manifest — last, so a failure never leaves a partial image tagged.
func (d *registryDest) putImage(ctx context.Context, res *convert.Result, tag string, top bool) error {
	host, repo := d.dst.Host(), d.dst.Repository()
	for _, b := range res.Blobs {
		var mountFrom []string
		mountFrom = append(mountFrom, b.Repos...)
		if d.src.Transport == image.TransportRegistry && d.src.Host() == host && d.src.Repository() != repo {
			mountFrom = append(mountFrom, d.src.Repository())
		}
		var r io.Reader
		var f *os.File
		if b.Path != "" {
			var err error
			if f, err = os.Open(b.Path); err != nil {
				return err
			}
			r = f
		} else {
			r = &remoteBlobReader{ctx: ctx, c: d.c, host: host, repos: b.Repos, desc: b.Desc}
		}
		err := d.c.PushBlob(ctx, host, repo, b.Desc, r, mountFrom...)
		if f != nil {
			f.Close()
		}
		if rc, ok := r.(io.Closer); ok {
			rc.Close()
		}
		if err != nil {
			return fmt.Errorf("layer %s: %w", b.Desc.Digest, err)
		}
		d.pushed = append(d.pushed, b.Desc.Digest)
	}
	if err := d.c.PushBlob(ctx, host, repo, res.ConfigDesc, bytes.NewReader(res.Config)); err != nil {
		return err
	}
	if !top {
		tag = ""
	}
	return d.putIndex(ctx, res.ManifestDesc, res.Manifest, tag)
}

func (d *registryDest) putIndex(ctx context.Context, desc ocispec.Descriptor, b []byte, tag string) error {
	_, err := d.c.PushManifest(ctx, d.dst.Host(), d.dst.Repository(), tag, desc.MediaType, b)
	var re *remote.ReferrersError
	if errors.As(err, &re) && re.IsReferrersIndexDelete() {
		// The manifest and the new referrers index are pushed; the registry refused to delete the old index.
		return nil
	}
	return err
}

// finish records in the conversion database that the repository holds the pushed layer blobs.
func (d *registryDest) finish() error {
	if d.db == nil || len(d.pushed) == 0 {
		return nil
	}
	return d.db.RecordPushed(d.dst.Host(), d.dst.Repository(), d.pushed)
}

// remoteBlobReader streams a blob from the first of repos that serves it, opened on the first Read (it is read
// only when no cross-repository mount works).
type remoteBlobReader struct {
	ctx   context.Context
	c     *registry.Client
	host  string
	repos []string
	desc  ocispec.Descriptor
	rc    io.ReadCloser
}

func (r *remoteBlobReader) Read(p []byte) (int, error) {
	if r.rc == nil {
		var errs []error
		for _, repo := range r.repos {
			rc, err := r.c.FetchBlob(r.ctx, r.host, repo, r.desc)
			if err == nil {
				r.rc = rc
				break
			}
			errs = append(errs, err)
		}
		if r.rc == nil {
			return 0, fmt.Errorf("reused layer %s: no local copy and no registry copy to read: %w (convert with --no-db)", r.desc.Digest, errors.Join(errs...))
		}
	}
	return r.rc.Read(p)
}

func (r *remoteBlobReader) Close() error {
	if r.rc != nil {
		return r.rc.Close()
	}
	return nil
}

// explicitSelector reports whether an image reference argument names a tag or digest (ParseRef fills in "latest"
// when it does not).
func explicitSelector(arg string, ref image.Ref) bool {
	if ref.Digest != "" {
		return true
	}
	s := arg
	if ref.Transport != image.TransportRegistry {
		s = strings.TrimPrefix(arg, string(ref.Transport)+":")
		i := strings.LastIndex(s, ":")
		return i >= 0 && !strings.Contains(s[i:], "/")
	}
	return strings.LastIndex(s, ":") > strings.LastIndex(s, "/")
}
