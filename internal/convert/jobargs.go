package convert

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/units"
)

// The arguments and results of 'obd convert'.

// NewJob returns the job that converts the image srcArg names into dstArg ('obd convert SRC DST'): platform is
// os/arch[/variant], "all" or "" (this machine's); with referrer the result is a referrer of the source, tagged
// only when dstArg names a tag.
func NewJob(srcArg, dstArg, platform string, referrer bool) (*Job, error) {
	src, err := image.ParseRef(srcArg)
	if err != nil {
		return nil, err
	}
	dst, err := image.ParseRef(dstArg)
	if err != nil {
		return nil, err
	}
	if dst.Transport == image.TransportDockerArchive {
		return nil, fmt.Errorf("destination %s: write to a registry or an OCI layout (oci:DIR[:TAG])", dst)
	}
	if referrer && src.Transport == image.TransportDockerArchive {
		return nil, fmt.Errorf("--referrer: the source must be a registry image or an OCI layout (a docker-archive's manifest is not stored anywhere a referrer could point to)")
	}
	job := &Job{Src: src, Dst: dst, Tag: dst.Tag, Platform: image.DefaultPlatform()}
	if dst.Digest != "" {
		if dst.Transport != image.TransportRegistry {
			return nil, fmt.Errorf("destination %s: name a tag, not a digest (the digest is the result's)", dst)
		}
		job.Tag = ""
	}
	if referrer && !explicitSelector(dstArg, dst) {
		job.Tag = "" // a referrer is found through its subject: no tag needed
	}
	switch platform {
	case "":
	case "all":
		job.AllPlatforms = true
	default:
		if job.Platform, err = image.ParsePlatform(platform); err != nil {
			return nil, err
		}
	}
	return job, nil
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

// OpenDBFor opens the conversion database of 'obd convert': path, else the default one; none when off. maxSize is
// a byte count (units.ParseBytes). When the default database cannot be used (no cache directory, a read-only
// home), it says so on warn and returns nil: converting without it gives the same result.
func OpenDBFor(path string, off bool, maxSize string, warn io.Writer) (*DB, error) {
	if off {
		if path != "" {
			return nil, fmt.Errorf("--db and --no-db: pick one")
		}
		return nil, nil
	}
	limit, err := units.ParseBytes(maxSize)
	if err != nil {
		return nil, fmt.Errorf("--db-max-size: %w", err)
	}
	if path != "" {
		return OpenDB(path, limit)
	}
	path, err = DefaultDBPath()
	var db *DB
	if err == nil {
		db, err = OpenDB(path, limit)
	}
	if err != nil && warn != nil {
		fmt.Fprintf(warn, "warning: converting without a conversion database: %v\n", err)
	}
	return db, nil
}

// JobOutput is what 'obd convert --json' prints.
type JobOutput struct {
	Manifest  string             `json:"manifest"`
	MediaType string             `json:"mediaType"`
	Config    string             `json:"config,omitempty"`
	Layers    []string           `json:"layers"`
	Reused    []string           `json:"reused,omitempty"`
	Platforms []ConvertedImage   `json:"platforms,omitempty"`
	Seconds   float64            `json:"seconds"`
	Stages    map[string]float64 `json:"stageSeconds"`
}

// Output returns the result of the job for JSON; elapsed is how long it ran.
func (j *Job) Output(res *JobResult, elapsed time.Duration) JobOutput {
	out := JobOutput{Manifest: res.Top.Digest.String(), MediaType: res.Top.MediaType, Seconds: elapsed.Seconds(), Stages: res.Timings}
	for _, ci := range res.Images {
		out.Layers = append(out.Layers, ci.Layers...)
		out.Reused = append(out.Reused, ci.Reused...)
	}
	if j.AllPlatforms && len(res.Images) > 0 && res.Images[0].Platform != nil {
		out.Platforms = res.Images
	} else if len(res.Images) == 1 {
		out.Config = res.Images[0].Config
	}
	return out
}

// Summary says in one line what the job wrote and where; elapsed is how long it ran.
func (j *Job) Summary(res *JobResult, elapsed time.Duration) string {
	what := fmt.Sprintf("manifest %s, %d layers", res.Top.Digest, len(res.Images[0].Layers))
	if len(res.Images) > 1 || res.Images[0].Platform != nil {
		what = fmt.Sprintf("index %s, %d platforms", res.Top.Digest, len(res.Images))
	}
	reused := 0
	for _, ci := range res.Images {
		reused += len(ci.Reused)
	}
	if reused > 0 {
		what += fmt.Sprintf(" (%d reused)", reused)
	}
	return fmt.Sprintf("converted %s → %s: %s, %s", j.Src, j.destName(), what, elapsed.Round(time.Millisecond))
}

// destName formats where the result went: the reference, by digest when untagged.
func (j *Job) destName() string {
	dst := j.Dst
	if j.Tag != "" || dst.Digest != "" {
		return dst.String()
	}
	dst.Tag = ""
	return dst.String() + " (untagged)"
}

// WithHint completes an error of a job: what to do about a full work dir (workDir, "" for the system's temporary
// directory), or how to pass credentials when a registry refused the request.
func WithHint(err error, workDir string) error {
	if errors.Is(err, ErrDiskFull) || errors.Is(err, ext4.ErrXattrNoSpace) {
		return err // the image's own filesystem is full, not the work dir's: the error says what to do
	}
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		if workDir == "" {
			workDir = os.TempDir()
		}
		return fmt.Errorf("%w (the work dir %s holds every layer of the image, uncompressed and compressed, until the conversion ends: free space there or pass --work-dir on a larger filesystem)", err, workDir)
	}
	if !errors.Is(err, registry.ErrUnauthorized) {
		return err
	}
	how := "pass --creds USER:PASSWORD, or store credentials for the registry in the docker config file (e.g. 'docker login HOST')"
	if msg := err.Error(); !strings.Contains(msg, "401") && !strings.Contains(msg, "403") {
		return fmt.Errorf("%w: the registry answered 401 Unauthorized and obd has no credentials for it; %s", err, how)
	}
	return fmt.Errorf("%w; %s", err, how)
}
