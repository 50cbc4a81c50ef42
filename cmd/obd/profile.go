package main

import (
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/spf13/cobra"

	obdconfig "github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/profile"
	"github.com/obdproject/obd/internal/pull"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
)

func newProfileCmd() *cobra.Command {
	var (
		cf               containerdFlags
		rf               registryFlags
		opts             profile.Options
		shell, out, push string
		noPush, install  bool
		configPath, sock string
		platform         string
	)
	cmd := &cobra.Command{
		Use:   "profile IMAGE [-- COMMAND [ARG...]]",
		Short: "Record a container's start and make an image whose acceleration layer prefetches it",
		Long: `Run a container from an overlaybd image through containerd with the overlaybd snapshotter recording its
reads (upstream's record-trace), until the app prints --ready-line, exits, or --timeout passes. Then write the
startup profile (--out, JSON: phases, bytes fetched, every block read with the time of its first read), and push
the image with the recorded trace as its acceleration layer (upstream's format) to --push, by default the tag
TAG-accel. Nodes that run the accelerated image prefetch the recorded blocks in parallel before the app asks.
--install registers the trace on this node instead of (or besides) pushing, for the image as it is.

The image's device must not be attached yet on this node (no container of it running), and its blocks should not be
cached, so that the profile's timings and bytes are those of a cold start.`,
		Example: `  obd profile 127.0.0.1:5000/app:v1-obd --ready-line ready -- python3 -c "import numpy; print('ready')"
  obd profile registry.example.com/app:obd --timeout 30s --out app.profile.json --push registry.example.com/app:obd-accel
  obd profile registry.example.com/app:obd --no-push --install`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ref, dst, err := profile.Targets(args[0], push)
			if err != nil {
				return err
			}
			opts.Args = args[1:]
			if shell != "" {
				if len(opts.Args) > 0 {
					return fmt.Errorf("--cmd and a command after the image: give one")
				}
				opts.Args = []string{"/bin/sh", "-c", shell}
			}
			plat, err := image.ParsePlatform(platform)
			if err != nil {
				return err
			}
			cfg, _, err := obdconfig.Load(configPath, cmd.Flags().Changed("config"))
			if err != nil {
				return err
			}
			if sock == "" {
				sock = cfg.Snapshotter.StatusSocket()
			}
			opts.Status = status.NewClient(sock, 5*time.Second)
			stderr := cmd.ErrOrStderr()
			opts.Output = stderr
			opts.Logf = func(format string, a ...any) { fmt.Fprintf(stderr, "obd profile: "+format+"\n", a...) }

			c, err := cf.connect()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx := namespaces.WithNamespace(cmd.Context(), cf.namespace)
			img, err := pull.Unpacked(ctx, c, ref.String(), opts.Snapshotter)
			if err != nil {
				return err
			}
			var pullTime time.Duration
			if img == nil {
				creds, _, err := rf.credentials()
				if err != nil {
					return err
				}
				opts.Logf("pulling %s lazily", ref)
				start := time.Now()
				res, err := pull.Pull(ctx, c, ref.String(), pull.Options{Snapshotter: opts.Snapshotter, PlainHTTP: rf.plainHTTP, Credentials: creds})
				if err != nil {
					return err
				}
				img, pullTime = res.Image, time.Since(start)
			}

			p, tf, err := profile.Record(ctx, c, img, opts)
			if err != nil {
				return err
			}
			p.Phases.Pull = pullTime.Seconds()
			w := cmd.OutOrStdout()
			p.WriteSummary(w, ref)
			if out != "" {
				if err := p.Save(out); err != nil {
					return err
				}
				fmt.Fprintf(w, "profile written to %s\n", out)
			}
			if install {
				path, err := profile.Install(cfg.ProfilesDir(), p.ChainID, tf)
				if err != nil {
					return err
				}
				fmt.Fprintf(w, "installed on this node as %s: starts of %s prefetch it when the image has no acceleration layer\n", path, ref)
			}
			if noPush {
				return nil
			}
			rc, err := rf.client(dst.Host())
			if err != nil {
				return err
			}
			defer rc.Close()
			desc, err := profile.Push(ctx, rc, ref, dst, plat, p.Layers, tf)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "pushed %s (%s) with the acceleration layer\n", dst, desc.Digest)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&shell, "cmd", "", "command to run, with /bin/sh -c (default: the image's command, or the one after --)")
	f.StringVar(&opts.ReadyLine, "ready-line", "", "end the recording when the app prints a line containing this text (default: when it exits)")
	f.DurationVar(&opts.Timeout, "timeout", profile.DefaultTimeout, "end the recording after this long if the app neither got ready nor exited")
	f.StringVar(&out, "out", "", "write the startup profile (JSON) to this file")
	f.StringVar(&push, "push", "", "push the accelerated image to this reference (default: the image's tag with -accel appended)")
	f.BoolVar(&noPush, "no-push", false, "do not push an accelerated image")
	f.BoolVar(&install, "install", false, "register the recorded trace on this node (obd.toml [prefetch] profiles_dir)")
	f.StringVar(&configPath, "config", obdconfig.DefaultPath, "obd.toml of the node (gives the status socket and the profiles directory)")
	f.StringVar(&sock, "socket", "", "obd-snapshotter's status socket (default: from obd.toml)")
	f.StringVar(&opts.Snapshotter, "snapshotter", snapshotter.Name, "containerd's name of the overlaybd snapshotter")
	f.StringVar(&opts.WorkDir, "work-dir", "", "directory for the trace while it is recorded (default: the system's temporary directory)")
	f.StringVar(&platform, "platform", image.DefaultPlatform().String(), "platform of a multi-platform image to push the accelerated manifest of")
	cf.register(cmd)
	rf.register(cmd)
	return cmd
}
