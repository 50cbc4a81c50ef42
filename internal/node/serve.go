package node

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
	"google.golang.org/grpc"

	"github.com/obdproject/obd/internal/snapshotter"
)

// StopGrace is how long a shutdown waits for in-flight requests (and for the re-mounting of images) before it
// cancels them.
const StopGrace = 10 * time.Second

// Serve opens the snapshotter under [snapshotter] root, re-mounts the images of existing containers in the
// background, serves the status endpoint and the metrics, and serves the snapshots API on [snapshotter] address
// until ctx is cancelled; then it shuts down within about StopGrace and returns nil.
func (s *Service) Serve(ctx context.Context) error {
	sc := s.cfg.Snapshotter
	quota, err := sc.Quota()
	if err != nil {
		return err
	}
	opts := []snapshotter.Option{snapshotter.WithLogger(s.log), snapshotter.WithProfiles(s.cfg.ProfilesDir()), snapshotter.WithWritable(sc.RWMode, quota),
		snapshotter.WithAttachOnPull(s.cfg.Prefetch.AttachOnPull)}
	if sc.Referrers && s.clients != nil {
		opts = append(opts, snapshotter.WithRedirect(newStandins(s.clients.get, s.cfg.ProfilesDir(), s.log)))
	}
	sn, err := snapshotter.New(sc.Root, s.mounter, opts...)
	if err != nil {
		return err
	}
	defer func() {
		if err := sn.Close(); err != nil {
			s.log.Error("close snapshot metadata", "error", err)
		}
	}()

	rctx, cancel := context.WithCancel(ctx)
	reconciled := make(chan struct{})
	go func() {
		defer close(reconciled)
		if err := sn.Reconcile(rctx); err != nil {
			s.log.Warn("some containers' overlaybd images could not be mounted again; their Mounts calls will retry", "error", err)
			return
		}
		s.removeStaleDevices(rctx)
	}()
	defer func() {
		cancel()
		select {
		case <-reconciled:
		case <-time.After(StopGrace):
			s.log.Warn(fmt.Sprintf("re-mounting images still running %v after shutdown began: exiting without it", StopGrace))
		}
	}()

	stop, err := s.ops.startServers(ctx, sn, sc)
	if err != nil {
		return err
	}
	defer stop()
	stopCRI, err := s.serveCRI()
	if err != nil {
		return err
	}
	defer stopCRI()
	return s.serveAPI(ctx, sn, grpc.UnaryInterceptor(s.ops.unaryInterceptor))
}

// removeStaleDevices removes the devices that an earlier daemon left and that no snapshot uses any more (their
// images were not attached again by Reconcile), with their mounts and loop devices; the device frontend logs each.
// It runs only after every image in use was attached again: a device whose image could not be attached is kept,
// its reads waiting, for the next try.
func (s *Service) removeStaleDevices(ctx context.Context) {
	if s.fuse == nil {
		return
	}
	remain, err := s.fuse.Reconcile(ctx, s.stateDir())
	if err != nil {
		s.log.Warn("cannot remove every device left by an earlier daemon", "error", err)
	}
	s.log.Info("devices checked after start", "in_use", len(remain))
}

// serveAPI serves the snapshots gRPC API for sn on the unix socket [snapshotter] address until ctx is cancelled.
func (s *Service) serveAPI(ctx context.Context, sn *snapshotter.Snapshotter, opts ...grpc.ServerOption) error {
	address := s.cfg.Snapshotter.Address
	l, err := listen(address)
	if err != nil {
		return err
	}
	srv := grpc.NewServer(opts...)
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	s.log.Info("serving snapshots API", "address", address, "snapshotter", snapshotter.Name)

	select {
	case err = <-served:
		err = fmt.Errorf("serve snapshots API on %s: %w", address, err)
	case <-ctx.Done():
		s.log.Info("shutting down")
		stopped := make(chan struct{})
		go func() {
			srv.GracefulStop()
			close(stopped)
		}()
		select {
		case <-stopped:
		case <-time.After(StopGrace):
			s.log.Warn(fmt.Sprintf("requests still running after %v: cancelling them", StopGrace))
			srv.Stop()
			<-stopped
		}
		<-served
	}
	if rerr := os.Remove(address); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		s.log.Warn("remove socket", "error", rerr)
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
