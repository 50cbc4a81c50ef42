package cri

import (
	"context"
	"encoding/base64"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
)

// Proxy is a CRI image service (runtime.v1.ImageService) that forwards every call to containerd's and keeps the
// credentials of each successful PullImage in a Store, by the image's repository, for the lazy reads of that image.
// kubelet reaches it with --image-service-endpoint; its runtime service stays containerd's.
type Proxy struct {
	runtimeapi.UnimplementedImageServiceServer
	next  runtimeapi.ImageServiceClient
	conn  *grpc.ClientConn
	store *Store
	log   *slog.Logger
}

// NewProxy returns a Proxy forwarding to the CRI of containerd at the unix socket containerdAddress. It connects
// on the first call, so containerd may start after it.
func NewProxy(containerdAddress string, store *Store, log *slog.Logger) (*Proxy, error) {
	conn, err := grpc.NewClient("unix://"+containerdAddress, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		return nil, fmt.Errorf("containerd CRI %s: %w", containerdAddress, err)
	}
	return &Proxy{next: runtimeapi.NewImageServiceClient(conn), conn: conn, store: store, log: log}, nil
}

// Register registers the proxy's image service on srv.
func (p *Proxy) Register(srv *grpc.Server) { runtimeapi.RegisterImageServiceServer(srv, p) }

// Close closes the connection to containerd.
func (p *Proxy) Close() error { return p.conn.Close() }

// ListImages forwards to containerd.
func (p *Proxy) ListImages(ctx context.Context, r *runtimeapi.ListImagesRequest) (*runtimeapi.ListImagesResponse, error) {
	return p.next.ListImages(ctx, r)
}

// ImageStatus forwards to containerd.
func (p *Proxy) ImageStatus(ctx context.Context, r *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	return p.next.ImageStatus(ctx, r)
}

// RemoveImage forwards to containerd.
func (p *Proxy) RemoveImage(ctx context.Context, r *runtimeapi.RemoveImageRequest) (*runtimeapi.RemoveImageResponse, error) {
	return p.next.RemoveImage(ctx, r)
}

// ImageFsInfo forwards to containerd.
func (p *Proxy) ImageFsInfo(ctx context.Context, r *runtimeapi.ImageFsInfoRequest) (*runtimeapi.ImageFsInfoResponse, error) {
	return p.next.ImageFsInfo(ctx, r)
}

// PullImage stores the pull's credentials for the image's repository, then forwards the pull to containerd: the
// snapshotter reads the image's layers while containerd pulls it (it opens them, and prefetches a recorded start).
// The credentials of a failed pull are taken back: they could only shadow working ones.
func (p *Proxy) PullImage(ctx context.Context, r *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	start := time.Now()
	ref := r.GetImage().GetImage()
	var undo func()
	var putErr error
	if user, pass, ok := authCredentials(r.GetAuth(), ref); ok {
		undo, putErr = p.store.Put(ref, user, pass)
	}
	resp, err := p.next.PullImage(ctx, r)
	args := []any{"image", ref, "with_credentials", r.GetAuth() != nil, "duration", time.Since(start).Round(time.Millisecond)}
	if err != nil {
		if undo != nil {
			undo()
		}
		p.log.Warn("CRI pull failed", append(args, "error", err)...)
		return nil, err
	}
	switch {
	case putErr != nil:
		p.log.Warn("CRI pull: credentials not kept for lazy reads", append(args, "error", putErr)...)
	case undo != nil:
		args = append(args, "credentials_kept", true)
	}
	p.log.Info("CRI pull", args...)
	return resp, nil
}

// authCredentials returns the username and password of a CRI AuthConfig for the registry of ref, the way
// containerd's CRI plugin reads it: none when server_address names another registry; username and password, else
// the identity token, else "auth" (base64 of "user:password"). A registry_token alone is not kept.
func authCredentials(a *runtimeapi.AuthConfig, ref string) (user, pass string, ok bool) {
	if a == nil {
		return "", "", false
	}
	if a.ServerAddress != "" {
		r, err := image.ParseRef(ref)
		if err != nil || registry.HostKey(serverHost(a.ServerAddress)) != registry.HostKey(r.Host()) {
			return "", "", false
		}
	}
	switch {
	case a.Username != "":
		return a.Username, a.Password, true
	case a.IdentityToken != "":
		return registry.IdentityTokenUser, a.IdentityToken, true
	case a.Auth != "":
		dec, err := base64.StdEncoding.DecodeString(a.Auth)
		if err != nil {
			return "", "", false
		}
		user, pass, found := strings.Cut(string(dec), ":")
		return user, pass, found && user != ""
	}
	return "", "", false
}

// serverHost returns the host of a server address given as "host", "host/path" or a URL.
func serverHost(s string) string {
	if !strings.Contains(s, "://") {
		s = "dummy://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return ""
	}
	return u.Host
}
