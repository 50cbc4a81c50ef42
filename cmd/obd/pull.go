package main

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/spf13/cobra"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/progress"
	"github.com/obdproject/obd/internal/pull"
	"github.com/obdproject/obd/internal/snapshotter"
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
users keep pulling the original tag and get the lazy image. --no-referrers pulls REF itself.`,
		Example: "  obd pull 127.0.0.1:5000/app:obd\n  ctr run --rm --snapshotter overlaybd 127.0.0.1:5000/app:obd app1",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			creds, _, err := rf.credentials()
			if err != nil {
				return err
			}
			opts := pull.Options{Snapshotter: snapshotterName, PlainHTTP: rf.plainHTTP, Download: download, Credentials: creds}
			if download || !noReferrers {
				ref, err := image.ParseRef(args[0])
				if err != nil {
					return err
				}
				rc, err := rf.client(ref.Host())
				if err != nil {
					return err
				}
				defer rc.Close()
				if download {
					opts.Registry = rc
					opts.Progress = progress.Bar(progress.Terminal(cmd.ErrOrStderr()))
				}
				if !noReferrers {
					opts.Referrers = rc
				}
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
			return nil
		},
	}
	cf.register(cmd)
	cmd.Flags().BoolVar(&download, "download", false, "download overlaybd layers at pull time (parallel range requests, digests checked) instead of lazily")
	cmd.Flags().BoolVar(&noReferrers, "no-referrers", false, "pull REF itself, not an overlaybd image attached to it as a referrer")
	rf.register(cmd)
	cmd.Flags().StringVar(&snapshotterName, "snapshotter", snapshotter.Name, "containerd snapshotter to unpack into")
	return cmd
}
