package convert

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	digest "github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
)

// Job converts what a source reference names — one image, or every platform of an index — and writes the result
// to a destination reference (a registry repository or an OCI layout) through its image.Sink.
type Job struct {
	Src, Dst image.Ref
	// Tag is the destination tag; "" stores the result by digest only.
	Tag string
	// Platform is the image converted from an index, unless AllPlatforms.
	Platform image.Platform
	// AllPlatforms converts every platform of an index (attestations and entries without a platform are skipped)
	// and writes an index of the converted images: a Docker manifest list for a Docker manifest list, else an OCI
	// index.
	AllPlatforms bool
	// Options apply to every image converted. The job sets their Progress (to Log) and, with a DB and a registry
	// destination, their Remote.
	Options ImageOptions
	// Client returns a client for a registry host.
	Client func(host string) (*registry.Client, error)
	// Log, if set, receives the progress of the conversion and notes about it.
	Log io.Writer

	sink   image.Sink
	pushed []digest.Digest // layer blobs pushed to a registry, for the DB
	res    *JobResult
}

// JobResult says what a Job wrote.
type JobResult struct {
	// Top is the descriptor of what was written under the tag: the manifest, or the index with AllPlatforms.
	Top ocispec.Descriptor
	// Images are the converted manifests.
	Images []ConvertedImage
	// Timings sums the seconds spent per conversion stage.
	Timings map[string]float64
}

// ConvertedImage is one converted manifest.
type ConvertedImage struct {
	Platform *ocispec.Platform `json:"platform,omitempty"`
	Manifest string            `json:"manifest"`
	Config   string            `json:"config"`
	Layers   []string          `json:"layers"`
	Reused   []string          `json:"reused,omitempty"`
}

func (j *Job) logf(format string, args ...any) {
	if j.Log != nil {
		fmt.Fprintf(j.Log, format, args...)
	}
}

// Run converts and writes. With a DB, it trims the DB's store at the end and records which layer blobs the
// destination repository holds.
func (j *Job) Run(ctx context.Context) (*JobResult, error) {
	j.res, j.pushed = &JobResult{}, nil
	if db := j.Options.DB; db != nil {
		defer func() {
			if _, err := db.Trim(); err != nil {
				j.logf("warning: %v\n", err)
			}
		}()
	}
	if j.Dst.Transport == image.TransportRegistry {
		host := j.Dst.Host()
		c, err := j.Client(host)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		var mountFrom []string
		if j.Src.Transport == image.TransportRegistry && j.Src.Host() == host && j.Src.Repository() != j.Dst.Repository() {
			mountFrom = append(mountFrom, j.Src.Repository())
		}
		j.sink = image.NewRegistrySink(c, j.Dst, mountFrom...)
		if j.Options.DB != nil {
			j.Options.Remote = &RemoteBlobs{Host: host, Open: func(ctx context.Context, repo string, desc ocispec.Descriptor) (io.ReaderAt, error) {
				return c.Blob(ctx, host, repo, desc.Digest, desc.Size)
			}}
		}
	} else {
		j.sink = image.NewLayoutSink(j.Dst.Path)
	}
	if j.Options.Referrer && j.Src.Transport == image.TransportRegistry && j.Dst.Transport == image.TransportRegistry && j.Src.Name != j.Dst.Name {
		j.logf("note: referrers are listed per repository; the subject %s is not in %s unless it is pushed there too\n", j.Src, j.Dst.Name)
	}
	var err error
	if j.AllPlatforms {
		err = j.convertAll(ctx)
	} else {
		err = j.convertSingle(ctx)
	}
	if err != nil {
		return nil, err
	}
	if j.Options.DB != nil && len(j.pushed) > 0 {
		if err := j.Options.DB.RecordPushed(j.Dst.Host(), j.Dst.Repository(), j.pushed); err != nil {
			j.logf("warning: %v\n", err)
		}
	}
	return j.res, nil
}

// openSource opens the image of platform that ref names.
func (j *Job) openSource(ctx context.Context, ref image.Ref, platform image.Platform) (image.Source, error) {
	if ref.Transport != image.TransportRegistry {
		return image.OpenLocalSource(ref, platform)
	}
	c, err := j.Client(ref.Host())
	if err != nil {
		return nil, err
	}
	return image.OpenRegistrySource(ctx, c, ref, platform)
}

// convertSingle converts one manifest (the platform's, from an index) and stores it under the tag.
func (j *Job) convertSingle(ctx context.Context) error {
	source, err := j.openSource(ctx, j.Src, j.Platform)
	if err != nil {
		return err
	}
	defer source.Close()
	res, err := j.convert(ctx, source, "")
	if err != nil {
		return err
	}
	defer res.Cleanup()
	if err := j.put(ctx, res, j.Tag, false); err != nil {
		return fmt.Errorf("write %s: %w", j.Dst, err)
	}
	j.res.Top = res.ManifestDesc
	j.record(nil, res)
	return nil
}

func (j *Job) convert(ctx context.Context, source image.Source, prefix string) (*Result, error) {
	opts := j.Options
	opts.Progress = func(p Progress) {
		if s := p.String(); j.Log != nil && s != "" {
			fmt.Fprintf(j.Log, "%s%s\n", prefix, s)
		}
	}
	res, err := ConvertImage(ctx, source, opts)
	if err != nil {
		return nil, fmt.Errorf("convert %s: %w", source.Ref(), err)
	}
	return res, nil
}

// put writes a converted image through the sink.
func (j *Job) put(ctx context.Context, res *Result, tag string, entry bool) error {
	if err := j.sink.PutImage(ctx, res.Image(), tag, entry); err != nil {
		return err
	}
	if j.Dst.Transport == image.TransportRegistry {
		for _, b := range res.Blobs {
			j.pushed = append(j.pushed, b.Desc.Digest)
		}
	}
	return nil
}

func (j *Job) record(platform *ocispec.Platform, res *Result) {
	ci := ConvertedImage{Platform: platform, Manifest: res.ManifestDesc.Digest.String(), Config: res.ConfigDesc.Digest.String()}
	if j.res.Timings == nil {
		j.res.Timings = map[string]float64{}
	}
	for k, v := range res.Timings {
		j.res.Timings[k] += v.Seconds()
	}
	for _, b := range res.Blobs {
		ci.Layers = append(ci.Layers, b.Desc.Digest.String())
		if b.Reused {
			ci.Reused = append(ci.Reused, b.Desc.Digest.String())
		}
	}
	j.res.Images = append(j.res.Images, ci)
}

// readTop returns the descriptor and bytes of the manifest or index the source names.
func (j *Job) readTop(ctx context.Context) (ocispec.Descriptor, []byte, error) {
	switch j.Src.Transport {
	case image.TransportOCI:
		lay, err := image.OpenLayout(j.Src.Path)
		if err != nil {
			return ocispec.Descriptor{}, nil, err
		}
		return lay.Top(j.Src)
	case image.TransportRegistry:
		c, err := j.Client(j.Src.Host())
		if err != nil {
			return ocispec.Descriptor{}, nil, err
		}
		defer c.Close()
		sel := j.Src.Tag
		if j.Src.Digest != "" {
			sel = j.Src.Digest.String()
		}
		return c.Resolve(ctx, j.Src.Host(), j.Src.Repository(), sel)
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
func (j *Job) convertAll(ctx context.Context) error {
	top, b, err := j.readTop(ctx)
	if err != nil {
		return err
	}
	if !image.IsIndex(top.MediaType) {
		j.logf("%s is a single image, not an index: converting it\n", j.Src)
		return j.convertSingle(ctx)
	}
	idx, err := image.ParseIndex(b)
	if err != nil {
		return fmt.Errorf("%s: index %s: %w", j.Src, top.Digest, err)
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
		return fmt.Errorf("%s: index %s lists no image manifest with a platform to convert", j.Src, top.Digest)
	}
	out := convertedIndex(idx, top, j.Options)
	for n, d := range todo {
		p := *d.Platform
		plat := image.Platform{OS: p.OS, Architecture: p.Architecture, Variant: p.Variant}
		j.logf("platform %s (%d/%d): %s\n", plat, n+1, len(todo), d.Digest)
		ref := j.Src
		ref.Tag, ref.Digest = "", d.Digest
		var source image.Source
		if j.Src.Transport == image.TransportOCI {
			ref.Tag = j.Src.Tag
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
		err = j.put(ctx, res, "", true)
		res.Cleanup()
		if err != nil {
			return fmt.Errorf("platform %s: write %s: %w", plat, j.Dst, err)
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
	j.res.Top = ocispec.Descriptor{MediaType: out.MediaType, Digest: digest.FromBytes(ib), Size: int64(len(ib))}
	if j.Options.Referrer {
		j.res.Top.ArtifactType = j.Options.artifactType()
	}
	if err := j.sink.PutIndex(ctx, j.res.Top, ib, j.Tag); err != nil {
		return fmt.Errorf("write %s: %w", j.Dst, err)
	}
	return nil
}

// convertedIndex starts the index of the conversions of src's entries (described by srcDesc): the source's media
// type (an OCI index with OCI media types or as a referrer) and annotations; a referrer of the source index.
func convertedIndex(src ocispec.Index, srcDesc ocispec.Descriptor, opts ImageOptions) ocispec.Index {
	out := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: srcDesc.MediaType, Annotations: src.Annotations}
	if opts.OCI || opts.Referrer {
		out.MediaType = ocispec.MediaTypeImageIndex
	}
	if opts.Referrer {
		out.ArtifactType = opts.artifactType()
		out.Subject = &srcDesc
	}
	return out
}
