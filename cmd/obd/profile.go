package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	obdconfig "github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/profile"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
)

func newProfileCmd() *cobra.Command {
	var (
		cf               containerdFlags
		rf               registryFlags
		job              profile.Job
		shell, push      string
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

No container of the image may run on this node (the recording starts when the image's device is attached; an
image attached by its pull, or by containers that are gone, is attached again), and its blocks should not be
cached, so that the profile's timings and bytes are those of a cold start.`,
		Example: `  obd profile 127.0.0.1:5000/app:v1-obd --ready-line ready -- python3 -c "import numpy; print('ready')"
  obd profile registry.example.com/app:obd --timeout 30s --out app.profile.json --push registry.example.com/app:obd-accel
  obd profile registry.example.com/app:obd --no-push --install`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var err error
			if job.Ref, job.Push, err = profile.Targets(args[0], push); err != nil {
				return err
			}
			job.Args = args[1:]
			if shell != "" {
				if len(job.Args) > 0 {
					return fmt.Errorf("--cmd and a command after the image: give one")
				}
				job.Args = []string{"/bin/sh", "-c", shell}
			}
			if job.Platform, err = image.ParsePlatform(platform); err != nil {
				return err
			}
			cfg, _, err := obdconfig.Load(configPath, cmd.Flags().Changed("config"))
			if err != nil {
				return err
			}
			if sock == "" {
				sock = cfg.Snapshotter.StatusSocket()
			}
			if install {
				job.InstallDir = cfg.ProfilesDir()
			}
			if !noPush {
				job.Registry = rf.client
			}
			if job.Pull.Credentials, _, err = rf.credentials(); err != nil {
				return err
			}
			job.Pull.PlainHTTP = rf.plainHTTP
			job.Status = status.NewClient(sock, 5*time.Second)
			stderr := cmd.ErrOrStderr()
			job.Output = stderr
			job.Logf = func(format string, a ...any) { fmt.Fprintf(stderr, "obd profile: "+format+"\n", a...) }
			c, ctx, err := cf.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer c.Close()
			return job.Run(ctx, c, cmd.OutOrStdout())
		},
	}
	f := cmd.Flags()
	f.StringVar(&shell, "cmd", "", "command to run, with /bin/sh -c (default: the image's command, or the one after --)")
	f.StringVar(&job.ReadyLine, "ready-line", "", "end the recording when the app prints a line containing this text (default: when it exits)")
	f.DurationVar(&job.Timeout, "timeout", profile.DefaultTimeout, "end the recording after this long if the app neither got ready nor exited")
	f.StringVar(&job.Out, "out", "", "write the startup profile (JSON) to this file")
	f.StringVar(&push, "push", "", "push the accelerated image to this reference (default: the image's tag with -accel appended)")
	f.BoolVar(&noPush, "no-push", false, "do not push an accelerated image")
	f.BoolVar(&install, "install", false, "register the recorded trace on this node (obd.toml [prefetch] profiles_dir)")
	f.StringVar(&configPath, "config", obdconfig.DefaultPath, "obd.toml of the node (gives the status socket and the profiles directory)")
	f.StringVar(&sock, "socket", "", "obd-snapshotter's status socket (default: from obd.toml)")
	f.StringVar(&job.Snapshotter, "snapshotter", snapshotter.Name, "containerd's name of the overlaybd snapshotter")
	f.StringVar(&job.WorkDir, "work-dir", "", "directory for the trace while it is recorded (default: the system's temporary directory)")
	f.StringVar(&platform, "platform", image.DefaultPlatform().String(), "platform of a multi-platform image to push the accelerated manifest of")
	cf.register(cmd)
	rf.register(cmd)
	return cmd
}
