package main

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/cacheclient"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/progress"
	"github.com/obdproject/obd/internal/pull"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
)

// containerdFlags are the flags that say which containerd to talk to.
type containerdFlags struct {
	address, namespace string
}

func (f *containerdFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.address, "address", "/run/containerd/containerd.sock", "containerd's gRPC socket")
	cmd.Flags().StringVarP(&f.namespace, "namespace", "n", "default", "containerd namespace")
}

// connect connects to containerd and returns the client and ctx in the namespace to work in.
func (f *containerdFlags) connect(ctx context.Context) (*client.Client, context.Context, error) {
	c, err := pull.Connect(f.address)
	if err != nil {
		return nil, nil, err
	}
	return c, namespaces.WithNamespace(ctx, f.namespace), nil
}

func newPullCmd() *cobra.Command {
	var (
		cf              containerdFlags
		df              daemonFlags
		rf              registryFlags
		download        bool
		noReferrers     bool
		snapshotterName string
	)
	cmd := &cobra.Command{
		Use:   "pull REF",
		Short: "Pull an image into containerd; overlaybd layers are not downloaded but read lazily when containers run",
		Long: `Pull an image into containerd through the overlaybd snapshotter (upstream's 'ctr rpull'). Only the manifest and
config of an overlaybd image are fetched; containers read its blocks from the registry on demand. Normal images are
pulled and unpacked as usual. Run containers with 'ctr run --snapshotter overlaybd'.

When the image has an overlaybd image attached as an OCI referrer ('obd convert --referrer', found through the
registry's referrers API or the referrers tag schema), that one is pulled instead, lazily, and stored under REF:
users keep pulling the original tag and get the lazy image. --no-referrers pulls REF itself.

--download then fetches the image's overlaybd blobs whole into obd-snapshotter's block cache, several range
requests in flight, and checks each against its digest ('obd cache warm --all'): containers read nothing from the
registry. The blobs are not unpacked anywhere, and the cache's bound holds: an image that does not fit is an error.`,
		Example: "  obd pull 127.0.0.1:5000/app:obd\n  ctr run --rm --snapshotter overlaybd 127.0.0.1:5000/app:obd app1",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			creds, _, err := rf.credentials()
			if err != nil {
				return err
			}
			var sock string // the daemon's status socket, for --download: a bad configuration fails before the pull
			if download {
				if sock, err = df.statusSocket(cmd); err != nil {
					return err
				}
			}
			opts := pull.Options{Snapshotter: snapshotterName, PlainHTTP: rf.plainHTTP, Credentials: creds}
			if !noReferrers {
				ref, err := image.ParseRef(args[0])
				if err != nil {
					return err
				}
				rc, err := rf.client(ref.Host())
				if err != nil {
					return err
				}
				defer rc.Close()
				opts.Referrers = rc
			}
			c, ctx, err := cf.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer c.Close()
			start := time.Now()
			res, err := pull.Pull(ctx, c, args[0], opts)
			if err != nil {
				return err
			}
			for _, w := range res.Warnings {
				fmt.Fprintln(cmd.ErrOrStderr(), "obd: warning:", w)
			}
			fmt.Fprintln(cmd.OutOrStdout(), res.Summary(time.Since(start)))
			if !download || res.Lazy == 0 {
				return nil
			}
			// The download is a warm of the whole image: the daemon fetches every blob into its block cache in
			// parallel range requests and checks it against its digest; nothing is unpacked.
			cc := &cacheclient.Client{Status: status.NewClient(sock, df.timeout), Containerd: func() (*client.Client, error) { return pull.Connect(cf.address) }, Namespace: cf.namespace}
			bar := progress.Bar(progress.Terminal(cmd.ErrOrStderr()))
			if err := df.notRunningHint(cc.Warm(ctx, cmd.OutOrStdout(), res.Image.Name(), true, "", nil, bar)); err != nil {
				return fmt.Errorf("download %s: %w", res.Image.Name(), err)
			}
			return nil
		},
	}
	cf.register(cmd)
	df.register(cmd)
	cmd.Flags().BoolVar(&download, "download", false, "then download the overlaybd layers into the daemon's block cache (parallel range requests, digests checked; as 'obd cache warm --all')")
	cmd.Flags().BoolVar(&noReferrers, "no-referrers", false, "pull REF itself, not an overlaybd image attached to it as a referrer")
	rf.register(cmd)
	cmd.Flags().StringVar(&snapshotterName, "snapshotter", snapshotter.Name, "containerd snapshotter to unpack into")
	return cmd
}
