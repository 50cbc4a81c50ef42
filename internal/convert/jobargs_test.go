package convert

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/registry"
)

func TestNewJob(t *testing.T) {
	for _, tc := range []struct {
		src, dst, platform string
		referrer           bool
		tag, err           string
		all                bool
	}{
		{src: "oci:in:v1", dst: "oci:out:v1-obd", tag: "v1-obd"},
		{src: "oci:in:v1", dst: "oci:out", tag: "latest"},
		{src: "oci:in:v1", dst: "oci:out", referrer: true, tag: ""},
		{src: "oci:in:v1", dst: "oci:out:x", referrer: true, tag: "x"},
		{src: "reg.test/a:v1", dst: "reg.test/a:v1-obd", referrer: true, tag: "v1-obd"},
		{src: "reg.test/a:v1", dst: "reg.test/a@sha256:" + strings.Repeat("a", 64), tag: ""},
		{src: "oci:in:v1", dst: "oci:out", platform: "all", tag: "latest", all: true},
		{src: "oci:in:v1", dst: "docker-archive:x.tar", err: "write to a registry or an OCI layout"},
		{src: "docker-archive:x.tar", dst: "oci:out", referrer: true, err: "--referrer: the source must be"},
		{src: "oci:in:v1", dst: "oci:out", platform: "nonsense/", err: "platform"},
	} {
		job, err := NewJob(tc.src, tc.dst, tc.platform, tc.referrer)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("NewJob(%s, %s): %v, want %q", tc.src, tc.dst, err, tc.err)
			}
			continue
		}
		if err != nil || job.Tag != tc.tag || job.AllPlatforms != tc.all {
			t.Errorf("NewJob(%s, %s, %q, %v) = %+v, %v; want tag %q", tc.src, tc.dst, tc.platform, tc.referrer, job, err, tc.tag)
		}
	}
}

func TestJobReport(t *testing.T) {
	job, err := NewJob("oci:in:v1", "oci:out", "", true)
	if err != nil {
		t.Fatal(err)
	}
	d := digest.FromString("m")
	res := &JobResult{Top: ocispec.Descriptor{Digest: d, MediaType: ocispec.MediaTypeImageManifest},
		Images: []ConvertedImage{{Config: "c", Layers: []string{"l1", "l2"}, Reused: []string{"l1"}}}}
	if got, want := job.Summary(res, 1500*time.Millisecond), "converted oci:in:v1 → oci:out (untagged): manifest "+d.String()+", 2 layers (1 reused), 1.5s"; got != want {
		t.Errorf("Summary = %q, want %q", got, want)
	}
	out := job.Output(res, time.Second)
	if out.Manifest != d.String() || out.Config != "c" || len(out.Layers) != 2 || len(out.Reused) != 1 || out.Platforms != nil || out.Seconds != 1 {
		t.Errorf("Output = %+v", out)
	}
	job.AllPlatforms = true
	res.Images = append(res.Images, ConvertedImage{Layers: []string{"l3"}})
	res.Images[0].Platform = &ocispec.Platform{OS: "linux", Architecture: "amd64"}
	if out := job.Output(res, time.Second); len(out.Platforms) != 2 || out.Config != "" || len(out.Layers) != 3 {
		t.Errorf("Output of an index = %+v", out)
	}
	if got := job.Summary(res, time.Second); !strings.Contains(got, "index "+d.String()+", 2 platforms (1 reused)") {
		t.Errorf("Summary of an index = %q", got)
	}
}

func TestOpenDBFor(t *testing.T) {
	if db, err := OpenDBFor("", true, "10GiB", nil); db != nil || err != nil {
		t.Errorf("--no-db: %v, %v", db, err)
	}
	if _, err := OpenDBFor("x.db", true, "10GiB", nil); err == nil || err.Error() != "--db and --no-db: pick one" {
		t.Errorf("--db and --no-db: %v", err)
	}
	if _, err := OpenDBFor("x.db", false, "ten", nil); err == nil || !strings.HasPrefix(err.Error(), "--db-max-size: ") {
		t.Errorf("bad --db-max-size: %v", err)
	}
	db, err := OpenDBFor(filepath.Join(t.TempDir(), "convert.db"), false, "1MiB", nil)
	if err != nil || db == nil {
		t.Fatalf("--db: %v, %v", db, err)
	}

}

func TestWithHintCredentials(t *testing.T) {
	refused := fmt.Errorf("pull: %w", &registry.Error{Op: "registry r", Err: errors.New("no credentials"), Kind: registry.ErrUnauthorized})
	if err := WithHint(refused, ""); !errors.Is(err, registry.ErrUnauthorized) || !strings.Contains(err.Error(), "answered 401 Unauthorized and obd has no credentials") {
		t.Errorf("refused: %v", err)
	}
	other := errors.New("other")
	if err := WithHint(other, ""); err != other {
		t.Errorf("other error: %v", err)
	}
	if err := WithHint(fmt.Errorf("w: %w", syscall.EDQUOT), ""); !strings.Contains(err.Error(), "the work dir ") {
		t.Errorf("quota: %v", err)
	}
}

func TestWithHint(t *testing.T) {
	workFull := fmt.Errorf("layer 1: write: %w", syscall.ENOSPC)
	if err := WithHint(workFull, "/scratch"); !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "the work dir /scratch") {
		t.Errorf("a full work dir: %v, want the work-dir hint", err)
	}
	// A full virtual disk is an ENOSPC of the image's filesystem too: its error says what to do, not the hint.
	diskFull := fmt.Errorf("layer 1: %w: no free block (%w); convert with a larger --vsize (GiB)", ErrDiskFull, syscall.ENOSPC)
	if err := WithHint(diskFull, "/scratch"); err != diskFull {
		t.Errorf("a full virtual disk: %v, want the error as it is", err)
	}
}
