package cri

import (
	"bytes"
	"context"
	"encoding/base64"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/obdproject/obd/internal/registry"
)

// fakeImages is containerd's image service: it accepts pulls whose password is "right" (or that carry none).
type fakeImages struct {
	runtimeapi.UnimplementedImageServiceServer
	calls []string
}

func (f *fakeImages) PullImage(_ context.Context, r *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	f.calls = append(f.calls, "pull "+r.Image.Image)
	if a := r.Auth; a != nil && a.Password != "right" && a.Username != "" {
		return nil, status.Error(codes.Unknown, "failed to pull: 401 Unauthorized")
	}
	return &runtimeapi.PullImageResponse{ImageRef: "sha256:abc"}, nil
}

func (f *fakeImages) ListImages(context.Context, *runtimeapi.ListImagesRequest) (*runtimeapi.ListImagesResponse, error) {
	f.calls = append(f.calls, "list")
	return &runtimeapi.ListImagesResponse{Images: []*runtimeapi.Image{{Id: "sha256:abc"}}}, nil
}

func (f *fakeImages) ImageStatus(_ context.Context, r *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	f.calls = append(f.calls, "status "+r.Image.Image)
	return &runtimeapi.ImageStatusResponse{}, nil
}

func (f *fakeImages) RemoveImage(_ context.Context, r *runtimeapi.RemoveImageRequest) (*runtimeapi.RemoveImageResponse, error) {
	f.calls = append(f.calls, "remove "+r.Image.Image)
	return &runtimeapi.RemoveImageResponse{}, nil
}

func (f *fakeImages) ImageFsInfo(context.Context, *runtimeapi.ImageFsInfoRequest) (*runtimeapi.ImageFsInfoResponse, error) {
	f.calls = append(f.calls, "fsinfo")
	return &runtimeapi.ImageFsInfoResponse{}, nil
}

func serveGRPC(t *testing.T, path string, register func(*grpc.Server)) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	register(srv)
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
}

func TestProxy(t *testing.T) {
	dir := t.TempDir()
	fake := &fakeImages{}
	serveGRPC(t, filepath.Join(dir, "containerd.sock"), func(s *grpc.Server) { runtimeapi.RegisterImageServiceServer(s, fake) })
	store := NewStore(time.Hour)
	var logs bytes.Buffer
	p, err := NewProxy(filepath.Join(dir, "containerd.sock"), store, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	serveGRPC(t, filepath.Join(dir, "proxy.sock"), p.Register)
	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "proxy.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := runtimeapi.NewImageServiceClient(conn)
	ctx := context.Background()
	pull := func(ref string, a *runtimeapi.AuthConfig) error {
		_, err := c.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}, Auth: a})
		return err
	}

	if err := pull("r.io/team/app:v1", &runtimeapi.AuthConfig{Username: "alice", Password: "right"}); err != nil {
		t.Fatal(err)
	}
	if u, p, ok := store.Get("r.io", "team/app"); !ok || u != "alice" || p != "right" {
		t.Errorf("after a pull with credentials the store has %q %q %v", u, p, ok)
	}
	// A failed pull's error reaches the caller as containerd said it, and its credentials are not kept.
	err = pull("r.io/team/lib:v1", &runtimeapi.AuthConfig{Username: "alice", Password: "wrong-pw"})
	if status.Code(err) != codes.Unknown || !strings.Contains(err.Error(), "401 Unauthorized") {
		t.Errorf("failed pull: %v", err)
	}
	if _, _, ok := store.Get("r.io", "team/lib"); ok {
		t.Error("credentials of a failed pull were kept")
	}
	// The auth field (base64 user:password) and identity tokens; credentials for another server are not kept.
	if err := pull("r.io/team/b64:v1", &runtimeapi.AuthConfig{Auth: base64.StdEncoding.EncodeToString([]byte("bob:right")), ServerAddress: "https://r.io/v2/"}); err != nil {
		t.Fatal(err)
	}
	if u, p, ok := store.Get("r.io", "team/b64"); !ok || u != "bob" || p != "right" {
		t.Errorf("auth field: %q %q %v", u, p, ok)
	}
	if err := pull("r.io/team/tok:v1", &runtimeapi.AuthConfig{IdentityToken: "refresh"}); err != nil {
		t.Fatal(err)
	}
	if u, p, ok := store.Get("r.io", "team/tok"); !ok || u != registry.IdentityTokenUser || p != "refresh" {
		t.Errorf("identity token: %q %q %v", u, p, ok)
	}
	if err := pull("r.io/team/other:v1", &runtimeapi.AuthConfig{Username: "eve", Password: "right", ServerAddress: "elsewhere.io"}); err != nil {
		t.Fatal(err)
	}
	if _, _, ok := store.Get("r.io", "team/other"); ok {
		t.Error("credentials given for another server were kept")
	}
	if err := pull("r.io/team/anon:v1", nil); err != nil {
		t.Fatal(err)
	}

	// Every other call is forwarded.
	if r, err := c.ListImages(ctx, &runtimeapi.ListImagesRequest{}); err != nil || len(r.Images) != 1 {
		t.Errorf("ListImages: %v %v", r, err)
	}
	if _, err := c.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: "r.io/team/app:v1"}}); err != nil {
		t.Error(err)
	}
	if _, err := c.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: "r.io/team/app:v1"}}); err != nil {
		t.Error(err)
	}
	if _, err := c.ImageFsInfo(ctx, &runtimeapi.ImageFsInfoRequest{}); err != nil {
		t.Error(err)
	}
	want := "pull r.io/team/app:v1,pull r.io/team/lib:v1,pull r.io/team/b64:v1,pull r.io/team/tok:v1,pull r.io/team/other:v1,pull r.io/team/anon:v1,list,status r.io/team/app:v1,remove r.io/team/app:v1,fsinfo"
	if got := strings.Join(fake.calls, ","); got != want {
		t.Errorf("containerd got %s\nwant %s", got, want)
	}
	for _, secret := range []string{"right", "wrong-pw", "refresh", base64.StdEncoding.EncodeToString([]byte("bob:right"))} {
		if strings.Contains(logs.String(), secret) {
			t.Errorf("the log shows %q:\n%s", secret, logs.String())
		}
	}
	if !strings.Contains(logs.String(), "credentials_kept=true") {
		t.Errorf("the log does not say credentials were kept:\n%s", logs.String())
	}
}
