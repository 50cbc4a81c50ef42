package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"google.golang.org/grpc"

	"github.com/obdproject/obd/internal/snapshotter"
)

// stopGrace is how long a shutdown waits for in-flight requests before it cancels them.
const stopGrace = 10 * time.Second

// run opens the snapshotter under cfg.Root, re-mounts the images of existing containers in the background and
// serves the snapshots API on cfg.Address until ctx is cancelled.
func run(ctx context.Context, cfg snapshotterConfig, mounter snapshotter.ImageMounter) error {
	return runWith(ctx, cfg, mounter, nil)
}

// runWith is run that, when o is not nil, also serves the status endpoint and the metrics, and measures the
// snapshots API calls.
func runWith(ctx context.Context, cfg snapshotterConfig, mounter snapshotter.ImageMounter, o *ops) error {
	sn, err := snapshotter.New(cfg.Root, mounter)
	if err != nil {
		return err
	}
	defer func() {
		if err := sn.Close(); err != nil {
			log.G(ctx).WithError(err).Error("close snapshot metadata")
		}
	}()

	rctx, cancel := context.WithCancel(ctx)
	reconciled := make(chan struct{})
	go func() {
		defer close(reconciled)
		if err := sn.Reconcile(rctx); err != nil {
			log.G(rctx).WithError(err).Warn("some containers' overlaybd images could not be mounted again; their Mounts calls will retry")
		}
	}()
	defer func() {
		cancel()
		select {
		case <-reconciled:
		case <-time.After(stopGrace):
			log.G(ctx).Warnf("re-mounting images still running %v after shutdown began: exiting without it", stopGrace)
		}
	}()

	var sopts []grpc.ServerOption
	if o != nil {
		stop, err := o.startServers(ctx, sn, cfg)
		if err != nil {
			return err
		}
		defer stop()
		sopts = append(sopts, grpc.UnaryInterceptor(o.unaryInterceptor))
	}
	return serve(ctx, sn, cfg.Address, sopts...)
}

// serve serves the snapshots gRPC API for sn on the unix socket address until ctx is cancelled.
func serve(ctx context.Context, sn *snapshotter.Snapshotter, address string, opts ...grpc.ServerOption) error {
	l, err := listen(address)
	if err != nil {
		return err
	}
	srv := grpc.NewServer(opts...)
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	log.G(ctx).WithFields(log.Fields{"address": address, "snapshotter": snapshotter.Name}).Info("serving snapshots API")

	select {
	case err = <-served:
		err = fmt.Errorf("serve snapshots API on %s: %w", address, err)
	case <-ctx.Done():
		log.G(ctx).Info("shutting down")
		stopped := make(chan struct{})
		go func() {
			srv.GracefulStop()
			close(stopped)
		}()
		select {
		case <-stopped:
		case <-time.After(stopGrace):
			log.G(ctx).Warnf("requests still running after %v: cancelling them", stopGrace)
			srv.Stop()
			<-stopped
		}
		<-served
	}
	if rerr := os.Remove(address); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		log.G(ctx).WithError(rerr).Warn("remove socket")
	}
	return err
}

// listen listens on the unix socket address (mode 0660), replacing a stale socket file that nobody serves.
func listen(address string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(address), 0o711); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	if fi, err := os.Lstat(address); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen on %s: the path exists and is not a socket", address)
		}
		if c, err := net.DialTimeout("unix", address, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen on %s: another process serves this socket (is obd-snapshotter already running?)", address)
		}
		if err := os.Remove(address); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	}
	l, err := net.Listen("unix", address)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(address, 0o660); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}
