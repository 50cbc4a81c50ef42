package main

import (
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/image"
)

func newConvertCmd() *cobra.Command {
	var (
		vsizeGB   int64
		baseLayer string
		oci       bool
		platform  string
		workDir   string
		asJSON    bool
		zf        zfileFlags
		rf        registryFlags
	)
	cmd := &cobra.Command{
		Use:   "convert SRC DST",
		Short: "Convert an OCI/Docker image into an overlaybd image",
		Long: `Convert an image into an overlaybd image: each layer's files are written into an ext4 filesystem (in userspace, no
root needed) whose blocks form one overlaybd block-diff layer per source layer. Every file attribute survives, and
the same input always gives the same digests.

SRC is a registry reference (HOST[:PORT]/REPO[:TAG|@DIGEST]), oci:DIR[:TAG] or docker-archive:FILE[:TAG];
DST is a registry reference or oci:DIR[:TAG]. Registry credentials come from the docker config file
($DOCKER_CONFIG/config.json or ~/.docker/config.json) unless --creds is given.`,
		Example: `  obd convert oci:testdata/upstream/hello-world-oci:amd64 oci:out:hello-obd
  obd convert docker-archive:app.tar oci:out:app-obd --oci
  obd convert 127.0.0.1:5000/app:v1 127.0.0.1:5000/app:v1-obd`,
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
			plat := image.DefaultPlatform()
			if platform != "" {
				if plat, err = image.ParsePlatform(platform); err != nil {
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
			source, err := openSource(cmd.Context(), src, plat, &rf)
			if err != nil {
				return err
			}
			defer source.Close()
			var progress io.Writer
			if !asJSON {
				progress = cmd.ErrOrStderr()
			}
			start := time.Now()
			res, err := convert.ConvertImage(cmd.Context(), source, convert.ImageOptions{
				VirtualSize: vsizeGB << 30, BaseLayer: baseLayer, ZFile: zopts, OCI: oci, WorkDir: workDir,
				Progress: func(p convert.Progress) {
					if progress != nil {
						printProgress(progress, p)
					}
				},
			})
			if err != nil {
				return fmt.Errorf("convert %s: %w", src, err)
			}
			defer res.Cleanup()
			if dst.Transport == image.TransportRegistry {
				err = pushResult(cmd.Context(), res, dst, src, &rf)
			} else {
				err = writeResultToLayout(res, dst)
			}
			if err != nil {
				return fmt.Errorf("write %s: %w", dst, err)
			}
			if asJSON {
				out := struct {
					Manifest string         `json:"manifest"`
					Config   string         `json:"config"`
					Layers   []string       `json:"layers"`
					Seconds  float64        `json:"seconds"`
					Stages   map[string]any `json:"stageSeconds"`
				}{Manifest: res.ManifestDesc.Digest.String(), Config: res.ConfigDesc.Digest.String(), Seconds: time.Since(start).Seconds(), Stages: map[string]any{}}
				for _, b := range res.Blobs {
					out.Layers = append(out.Layers, b.Desc.Digest.String())
				}
				for k, v := range res.Timings {
					out.Stages[k] = v.Seconds()
				}
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(out)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "converted %s → %s: manifest %s, %d layers, %s\n",
				src, dst, res.ManifestDesc.Digest, len(res.Blobs), time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	cmd.Flags().Int64Var(&vsizeGB, "vsize", 64, "virtual disk size in GiB")
	cmd.Flags().StringVar(&baseLayer, "base-layer", "", "stack on this base layer file (e.g. upstream's ext4_64) instead of formatting a new filesystem")
	cmd.Flags().BoolVar(&oci, "oci", false, "OCI media types (default: Docker schema 2, like upstream)")
	cmd.Flags().StringVar(&platform, "platform", "", "os/arch[/variant] to convert from a multi-platform image (default: this machine's)")
	cmd.Flags().StringVar(&workDir, "work-dir", "", "directory for scratch files (default: the system temp dir)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON, no progress")
	zf.register(cmd)
	rf.register(cmd)
	return cmd
}

func printProgress(w io.Writer, p convert.Progress) {
	switch p.Stage {
	case "apply":
		fmt.Fprintf(w, "layer %d/%d: applied %s of tar in %s\n", p.Layer+1, p.Layers, humanBytes(p.Bytes), p.Elapsed.Round(time.Millisecond))
	case "commit":
		fmt.Fprintf(w, "layer %d/%d: committed %s in %s\n", p.Layer+1, p.Layers, humanBytes(p.Bytes), p.Elapsed.Round(time.Millisecond))
	case "compress":
		fmt.Fprintf(w, "layer %d/%d: compressed to %s in %s\n", p.Layer+1, p.Layers, humanBytes(p.Bytes), p.Elapsed.Round(time.Millisecond))
	case "done":
		fmt.Fprintf(w, "layer %d/%d: blob %s (%s)\n", p.Layer+1, p.Layers, p.Digest, humanBytes(p.Bytes))
	}
}

// writeResultToLayout stores a conversion result in an OCI layout and tags it.
func writeResultToLayout(res *convert.Result, dst image.Ref) error {
	lay, err := image.CreateLayout(dst.Path)
	if err != nil {
		return err
	}
	for _, b := range res.Blobs {
		if err := lay.PutBlobFile(b.Path, b.Desc.Digest, b.Desc.Size); err != nil {
			return err
		}
	}
	if _, err := lay.PutBlobBytes(res.ConfigDesc.MediaType, res.Config); err != nil {
		return err
	}
	if _, err := lay.PutBlobBytes(res.ManifestDesc.MediaType, res.Manifest); err != nil {
		return err
	}
	tag := dst.Tag
	if tag == "" {
		tag = "latest"
	}
	return lay.Tag(tag, res.ManifestDesc)
}
