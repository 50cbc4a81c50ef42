package main

import (
	"context"
	"fmt"
	"io"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/commit"
	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/units"
)

func newCommitCmd() *cobra.Command {
	var (
		cf              containerdFlags
		rf              registryFlags
		zf              zfileFlags
		push, squash    bool
		snapshotterName string
		workDir         string
		comment         string
	)
	cmd := &cobra.Command{
		Use:   "commit CONTAINER REF",
		Short: "Make an image of a container's writable overlaybd layer (rw_mode dir or dev) and push it",
		Long: `Commit the writable layer of a stopped container (one created with the snapshot label
containerd.io/snapshot/overlaybd.writable=dir or dev, or rw_mode dir/dev in obd.toml) as a new overlaybd image:
its changes become one ZFile-compressed overlaybd layer on top of its image's layers, which any obd or upstream
overlaybd node pulls lazily. The container keeps its files (it gets a new writable layer over the committed one)
and can be started again; committing it again adds one more layer. --squash makes a single-layer image of the
whole filesystem instead (the base image's layers are downloaded for it).

REF is oci:DIR[:TAG] (an OCI layout) or a registry reference, which needs --push. The container must have no task:
stop and delete it first. The same changes over the same image give the same digests.`,
		Example: `  ctr run --snapshotter overlaybd --snapshotter-label containerd.io/snapshot/overlaybd.writable=dir IMAGE app1 sh -c 'echo hi > /hello'
  obd commit app1 127.0.0.1:5000/app:v2 --push
  obd commit app1 oci:out:app-v2 --squash`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			dst, err := image.ParseRef(args[1])
			if err != nil {
				return err
			}
			var sink image.Sink
			switch dst.Transport {
			case image.TransportOCI:
				sink = image.NewLayoutSink(dst.Path)
			case image.TransportRegistry:
				if !push {
					return fmt.Errorf("%s is a registry reference: add --push to push the image there, or write an OCI layout (oci:DIR:TAG)", dst)
				}
			default:
				return fmt.Errorf("%s: write to a registry reference or oci:DIR[:TAG]", dst)
			}
			zopts, err := zf.options()
			if err != nil {
				return err
			}
			c, ctx, err := cf.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer c.Close()
			start := time.Now()
			sealed, err := commit.Seal(ctx, c, args[0], snapshotterName)
			if err != nil {
				return err
			}
			base, err := commit.ContainerdBase(ctx, c, sealed.Image)
			if err != nil {
				return err
			}
			src, err := image.ParseRef(sealed.Image)
			if err != nil {
				return fmt.Errorf("container's image: %w", err)
			}
			srcClient, err := rf.client(src.Host())
			if err != nil {
				return err
			}
			defer srcClient.Close()
			base.Fetch = func(ctx context.Context, desc ocispec.Descriptor) (io.ReadCloser, error) {
				return srcClient.FetchBlob(ctx, src.Host(), src.Repository(), desc)
			}
			if dst.Transport == image.TransportRegistry {
				dc, err := rf.client(dst.Host())
				if err != nil {
					return err
				}
				defer dc.Close()
				sink = image.NewRegistrySink(dc, dst)
				if src.Transport == image.TransportRegistry && src.Host() == dst.Host() {
					base.Repos = []string{src.Repository()}
				}
			}
			res, err := commit.Build(ctx, base, sealed.Layers, commit.Options{Squash: squash, ZFile: zopts, WorkDir: workDir, Comment: comment})
			if err != nil {
				return fmt.Errorf("container %s (committed as snapshot %s): %w", args[0], sealed.Snapshot, err)
			}
			defer res.Cleanup()
			if err := sink.PutImage(ctx, res.Image, dst.Tag, false); err != nil {
				return fmt.Errorf("write %s: %w", dst, err)
			}
			var added int64
			for _, l := range res.Image.Layers[len(res.Image.Layers)-res.New:] {
				added += l.Desc.Size
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s@%s: %d layers, %d new (%s), in %s\n", dst, res.Image.ManifestDesc.Digest,
				len(res.Image.Layers), res.New, units.Bytes(added), time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	cf.register(cmd)
	rf.register(cmd)
	zf.register(cmd, convert.DefaultZFile)
	cmd.Flags().BoolVar(&push, "push", false, "push to the registry reference REF")
	cmd.Flags().BoolVar(&squash, "squash", false, "make a single-layer image of the base image's layers and the container's changes")
	cmd.Flags().StringVar(&snapshotterName, "snapshotter", snapshotter.Name, "containerd snapshotter of the container")
	cmd.Flags().StringVar(&workDir, "work-dir", "", "directory for scratch files (default: the system temp dir)")
	cmd.Flags().StringVar(&comment, "message", "", "history entry of the new layer (default \"obd commit\")")
	return cmd
}
