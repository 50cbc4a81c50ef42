package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
)

func newConvertCmd() *cobra.Command {
	var (
		vsizeGB   int64
		baseLayer string
		oci       bool
		referrer  bool
		platform  string
		workDir   string
		asJSON    bool
		zf        zfileFlags
		rf        registryFlags
		dbf       dbFlags
	)
	cmd := &cobra.Command{
		Use:   "convert SRC DST",
		Short: "Convert an OCI/Docker image into an overlaybd image",
		Long: `Convert an image into an overlaybd image: each layer's files are written into an ext4 filesystem (in userspace, no
root needed) whose blocks form one overlaybd block-diff layer per source layer. Every file attribute survives, and
the same input always gives the same digests.

SRC is a registry reference (HOST[:PORT]/REPO[:TAG|@DIGEST]), oci:DIR[:TAG] or docker-archive:FILE[:TAG];
DST is a registry reference or oci:DIR[:TAG]. Registry credentials come from the docker config file
($DOCKER_CONFIG/config.json or ~/.docker/config.json) unless --creds is given.

Layers converted before (same source layers below them, same options) are reused from the conversion database
(--db) instead of being applied again; the result is the same bytes. The database keeps converted layer blobs next
to it, at most --db-max-size bytes, and remembers which registry repositories hold them, so a push to that
registry mounts them even after they left the local store.

--platform all converts every platform of an index (attestations and entries without a platform are skipped) and
writes an index of the converted images: a Docker manifest list for a Docker manifest list, else an OCI index.

--referrer writes OCI media types and makes the converted manifest (and index) a referrer of the source: its
subject is the source's manifest (index), its artifactType
` + convert.ArtifactTypeOverlaybd + `. Without a tag in DST it is stored by digest only.`,
		Example: `  obd convert oci:testdata/upstream/hello-world-oci:amd64 oci:out:hello-obd
  obd convert docker-archive:app.tar oci:out:app-obd --oci
  obd convert 127.0.0.1:5000/app:v1 127.0.0.1:5000/app:v1-obd
  obd convert --platform all oci:testdata/upstream/hello-world-oci:docker-list oci:out:hello-all
  obd convert --referrer 127.0.0.1:5000/app:v1 127.0.0.1:5000/app`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			src, err := image.ParseRef(args[0])
			if err != nil {
				return err
			}
			dst, err := image.ParseRef(args[1])
			if err != nil {
				return err
			}
			if dst.Transport == image.TransportDockerArchive {
				return fmt.Errorf("destination %s: write to a registry or an OCI layout (oci:DIR[:TAG])", dst)
			}
			if referrer && src.Transport == image.TransportDockerArchive {
				return fmt.Errorf("--referrer: the source must be a registry image or an OCI layout (a docker-archive's manifest is not stored anywhere a referrer could point to)")
			}
			job := &convert.Job{Src: src, Dst: dst, Tag: dst.Tag, Platform: image.DefaultPlatform(), Client: rf.client}
			if dst.Digest != "" {
				if dst.Transport != image.TransportRegistry {
					return fmt.Errorf("destination %s: name a tag, not a digest (the digest is the result's)", dst)
				}
				job.Tag = ""
			}
			if referrer && !explicitSelector(args[1], dst) {
				job.Tag = "" // a referrer is found through its subject: no tag needed
			}
			switch platform {
			case "":
			case "all":
				job.AllPlatforms = true
			default:
				if job.Platform, err = image.ParsePlatform(platform); err != nil {
					return err
				}
			}
			zopts, err := zf.options()
			if err != nil {
				return err
			}
			if vsizeGB <= 0 || vsizeGB > 1<<14 {
				return fmt.Errorf("--vsize %d: want 1..16384 GiB", vsizeGB)
			}
			job.Options = convert.ImageOptions{VirtualSize: vsizeGB << 30, BaseLayer: baseLayer, ZFile: zopts, OCI: oci || referrer, WorkDir: workDir, Referrer: referrer}
			if !asJSON {
				job.Log = cmd.ErrOrStderr()
			}
			if job.Options.DB, err = dbf.open(cmd.ErrOrStderr()); err != nil {
				return err
			}
			start := time.Now()
			res, err := job.Run(cmd.Context())
			if err != nil {
				return withHint(err, workDir)
			}
			if asJSON {
				out := struct {
					Manifest  string                   `json:"manifest"`
					MediaType string                   `json:"mediaType"`
					Config    string                   `json:"config,omitempty"`
					Layers    []string                 `json:"layers"`
					Reused    []string                 `json:"reused,omitempty"`
					Platforms []convert.ConvertedImage `json:"platforms,omitempty"`
					Seconds   float64                  `json:"seconds"`
					Stages    map[string]float64       `json:"stageSeconds"`
				}{Manifest: res.Top.Digest.String(), MediaType: res.Top.MediaType, Seconds: time.Since(start).Seconds(), Stages: res.Timings}
				for _, ci := range res.Images {
					out.Layers = append(out.Layers, ci.Layers...)
					out.Reused = append(out.Reused, ci.Reused...)
				}
				if job.AllPlatforms && len(res.Images) > 0 && res.Images[0].Platform != nil {
					out.Platforms = res.Images
				} else if len(res.Images) == 1 {
					out.Config = res.Images[0].Config
				}
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(out)
			}
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
			fmt.Fprintf(cmd.OutOrStdout(), "converted %s → %s: %s, %s\n", src, destName(dst, job.Tag), what, time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	cmd.Flags().Int64Var(&vsizeGB, "vsize", 64, "virtual disk size in GiB")
	cmd.Flags().StringVar(&baseLayer, "base-layer", "", "stack on this base layer file (e.g. upstream's ext4_64) instead of formatting a new filesystem")
	cmd.Flags().BoolVar(&oci, "oci", false, "OCI media types (default: Docker schema 2, like upstream)")
	cmd.Flags().BoolVar(&referrer, "referrer", false, "push the result as an OCI referrer of the source (subject, artifactType; implies --oci)")
	cmd.Flags().StringVar(&platform, "platform", "", "os/arch[/variant] to convert from a multi-platform image (default: this machine's), or all")
	cmd.Flags().StringVar(&workDir, "work-dir", "", "directory for scratch files (default: the system temp dir)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON, no progress")
	zf.register(cmd, convert.DefaultZFile)
	rf.register(cmd)
	dbf.register(cmd)
	return cmd
}

// destName formats where the result went: the reference, by digest when untagged.
func destName(dst image.Ref, tag string) string {
	if tag != "" || dst.Digest != "" {
		return dst.String()
	}
	dst.Tag = ""
	return dst.String() + " (untagged)"
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

// withHint says what to do about a full work dir, or how to pass credentials when a registry refused the request.
func withHint(err error, workDir string) error {
	if errors.Is(err, convert.ErrDiskFull) || errors.Is(err, ext4.ErrXattrNoSpace) {
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
