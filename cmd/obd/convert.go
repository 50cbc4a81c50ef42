package main

import (
	"fmt"
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
		referrer  bool
		turbo     bool
		fsType    string
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
` + convert.ArtifactTypeOverlaybd + ` (` + image.ArtifactTypeTurboOCI + ` with --turbo). Without a tag
in DST it is stored by digest only.

--turbo writes upstream's TurboOCI layout instead: no file data is converted or stored again. Each layer keeps its
original blob (gzip or uncompressed tar; pushed to DST with the image, mounted from the source repository when the
registry allows it) and gets a small layer of filesystem metadata whose file blocks point into the original's tar,
plus a gzip index to read the original at any offset.

--fstype erofs writes each layer as an EROFS image (read-only; upstream's --fstype erofs): the layer's new blocks
appended to the image of the layers below, labelled blob-fs-type erofs, so the snapshotter mounts it as erofs.
Containers over it write to an overlayfs upper directory (no rw_mode dir/dev).`,
		Example: `  obd convert oci:testdata/upstream/hello-world-oci:amd64 oci:out:hello-obd
  obd convert docker-archive:app.tar oci:out:app-obd --oci
  obd convert 127.0.0.1:5000/app:v1 127.0.0.1:5000/app:v1-obd
  obd convert --platform all oci:testdata/upstream/hello-world-oci:docker-list oci:out:hello-all
  obd convert --referrer 127.0.0.1:5000/app:v1 127.0.0.1:5000/app
  obd convert --turbo 127.0.0.1:5000/app:v1 127.0.0.1:5000/app:v1-turbo`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			job, err := convert.NewJob(args[0], args[1], platform, referrer)
			if err != nil {
				return err
			}
			job.Client = rf.client
			zopts, err := zf.options()
			if err != nil {
				return err
			}
			if vsizeGB <= 0 || vsizeGB > 1<<14 {
				return fmt.Errorf("--vsize %d: want 1..16384 GiB", vsizeGB)
			}
			job.Options = convert.ImageOptions{VirtualSize: vsizeGB << 30, BaseLayer: baseLayer, ZFile: zopts, OCI: oci || referrer, WorkDir: workDir, Referrer: referrer, Turbo: turbo, FsType: fsType}
			if turbo && baseLayer != "" {
				return fmt.Errorf("--turbo formats its own filesystem: it takes no --base-layer")
			}
			if !asJSON {
				job.Log = cmd.ErrOrStderr()
			}
			if !turbo { // TurboOCI layers are not kept in the database
				if job.Options.DB, err = convert.OpenDBFor(dbf.path, dbf.off, dbf.maxSize, cmd.ErrOrStderr()); err != nil {
					return err
				}
			}
			start := time.Now()
			res, err := job.Run(cmd.Context())
			if err != nil {
				return convert.WithHint(err, workDir)
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), job.Output(res, time.Since(start)))
			}
			fmt.Fprintln(cmd.OutOrStdout(), job.Summary(res, time.Since(start)))
			return nil
		},
	}
	cmd.Flags().Int64Var(&vsizeGB, "vsize", 64, "virtual disk size in GiB")
	cmd.Flags().StringVar(&baseLayer, "base-layer", "", "stack on this base layer file (e.g. upstream's ext4_64) instead of formatting a new filesystem")
	cmd.Flags().BoolVar(&oci, "oci", false, "OCI media types (default: Docker schema 2, like upstream)")
	cmd.Flags().BoolVar(&referrer, "referrer", false, "push the result as an OCI referrer of the source (subject, artifactType; implies --oci)")
	cmd.Flags().BoolVar(&turbo, "turbo", false, "TurboOCI: keep the original layers and add filesystem metadata and gzip indexes (no data converted)")
	cmd.Flags().StringVar(&fsType, "fstype", convert.FsExt4, "filesystem of the image: ext4, or erofs (read-only, as upstream's --fstype erofs)")
	cmd.Flags().StringVar(&platform, "platform", "", "os/arch[/variant] to convert from a multi-platform image (default: this machine's), or all")
	cmd.Flags().StringVar(&workDir, "work-dir", "", "directory for scratch files (default: the system temp dir)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON, no progress")
	zf.register(cmd, convert.DefaultZFile)
	rf.register(cmd)
	dbf.register(cmd)
	return cmd
}
