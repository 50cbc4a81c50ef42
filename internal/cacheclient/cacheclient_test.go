package cacheclient

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/cachesnap"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/profile"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/internal/testenv"
	"github.com/obdproject/obd/trace"
)

func testImage() *pulledImage {
	return &pulledImage{ref: "r/app:obd", chainID: digest.FromString("chain"), blocks: []image.BlockLayer{
		{BlobDigest: digest.FromString("a"), BlobSize: 10}, {BlobDigest: digest.FromString("b"), BlobSize: 20}}}
}

func TestRequests(t *testing.T) {
	im := testImage()
	a, b := digest.FromString("a").String(), digest.FromString("b").String()
	if got := exportQuery(nil); len(got) != 0 {
		t.Errorf("exportQuery() = %v", got)
	}
	if got := exportQuery([]*pulledImage{{}, im}); !slices.Equal(got["digest"], []string{a, b}) || len(got) != 1 {
		t.Errorf("exportQuery = %v, want digests %s and %s", got, a, b)
	}
	req := im.warmRequest(true, nil)
	if req.ImageRef != im.ref || !req.All || len(req.Layers) != 2 || req.Layers[1] != (status.WarmLayer{Digest: b, Size: 20}) {
		t.Errorf("WarmRequest = %+v", req)
	}

	var out strings.Builder
	if err := warmResult(&out, req, status.WarmProgress{DoneBytes: 30, TotalBytes: 30, Verified: 2, Done: true}); err != nil ||
		out.String() != "warmed r/app:obd: all of it (2 of 2 blobs verified): 30 B of 30 B cached\n" {
		t.Errorf("WarmResult: %q, %v", out.String(), err)
	}
	out.Reset()
	err := warmResult(&out, im.warmRequest(false, []byte("t")), status.WarmProgress{DoneBytes: 10, TotalBytes: 30, Full: true})
	if err == nil || !strings.Contains(err.Error(), "the cache is full: 20 B of 30 B did not fit") || !strings.Contains(out.String(), "its recorded start") {
		t.Errorf("WarmResult of a full cache: %q, %v", out.String(), err)
	}
	if err := warmResult(io.Discard, req, status.WarmProgress{Error: "boom"}); err == nil || err.Error() != "boom" {
		t.Errorf("WarmResult of a failed warm: %v", err)
	}

	out.Reset()
	blobs := []status.CacheBlob{{Digest: a, Size: 1 << 20, CachedBytes: 4096, Blocks: 1, TotalBlocks: 256, LastUse: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}}
	if err := WriteBlobs(&out, blobs); err != nil || !strings.Contains(out.String(), a+"  4.0 KiB  1.0 MiB  1/256   2026-01-02 03:04:05  -") {
		t.Errorf("WriteBlobs:\n%s%v", out.String(), err)
	}
}

func TestStartTrace(t *testing.T) {
	ctx := context.Background()
	im := testImage()
	dir := t.TempDir()
	var tf strings.Builder
	if err := trace.Encode(&tf, []trace.Record{{Op: trace.Read, Layer: 0, Offset: 0, Count: 4096}}); err != nil {
		t.Fatal(err)
	}
	noDir := func() (string, error) { return "", errors.New("no profiles dir") }

	p, err := json.Marshal(profile.Profile{Reads: []profile.Read{{Layer: 0, Offset: 0, Length: 4096}}})
	if err != nil {
		t.Fatal(err)
	}
	pf := filepath.Join(dir, "app.profile.json")
	os.WriteFile(pf, p, 0o644)
	if got, err := im.startTrace(ctx, pf, noDir); err != nil || string(got) != tf.String() {
		t.Errorf("StartTrace of a profile: %v", err)
	}
	os.WriteFile(pf, []byte("{}"), 0o644)
	if _, err := im.startTrace(ctx, pf, noDir); err == nil || !strings.Contains(err.Error(), "neither a trace file nor a profile with reads") {
		t.Errorf("StartTrace of an empty profile: %v", err)
	}

	if _, err := im.startTrace(ctx, "", noDir); err == nil || err.Error() != "no profiles dir" {
		t.Errorf("StartTrace without a profiles dir: %v", err)
	}
	profiles := func() (string, error) { return dir, nil }
	if _, err := im.startTrace(ctx, "", profiles); err == nil || !strings.Contains(err.Error(), "no acceleration layer and no profile registered") {
		t.Errorf("StartTrace without a registered profile: %v", err)
	}
	path := snapshotter.ProfilePath(dir, im.chainID.String())
	os.MkdirAll(filepath.Dir(path), 0o755)
	os.WriteFile(path, []byte(tf.String()), 0o644)
	if got, err := im.startTrace(ctx, "", profiles); err != nil || string(got) != tf.String() {
		t.Errorf("StartTrace of a registered profile: %v", err)
	}
}

func TestImport(t *testing.T) {
	dir := testenv.SocketDir(t)
	socket := filepath.Join(dir, "status.sock")
	answer := []status.ImportedBlob{{Digest: "sha256:a", Imported: 3, Verified: true}, {Digest: "sha256:b", Imported: 1, Present: 2, Dropped: 1}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+status.PathCacheImport, func(w http.ResponseWriter, r *http.Request) {
		if b, _ := io.ReadAll(r.Body); string(b) != "snapshot" || r.URL.Query().Get("source") == "" {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		json.NewEncoder(w).Encode(answer)
	})
	mux.HandleFunc("GET "+status.PathCacheBlobs, func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("[]")) })
	testenv.ServeUnix(t, socket, mux)
	snap := filepath.Join(t.TempDir(), "snap.tar")
	os.WriteFile(snap, []byte("snapshot"), 0o644)

	var out, errw strings.Builder
	err := WaitAndImport(context.Background(), status.NewClient(socket, 5*time.Second), time.Second, snap, nil, &out, &errw)
	if err == nil || err.Error() != "0 blobs failed their digest and 1 blocks their sums: those were dropped, never served" {
		t.Errorf("Import: %v", err)
	}
	if want := "imported 2 blobs from " + snap + ": 4 blocks stored, 2 present already, 1 dropped (bad sums); 1 blobs complete and verified\n"; out.String() != want {
		t.Errorf("Import wrote %q, want %q", out.String(), want)
	}

	answer = []status.ImportedBlob{{Digest: "sha256:c", Full: true}, {Digest: "sha256:d", Error: "digest mismatch"}}
	out.Reset()
	err = Import(context.Background(), status.NewClient(socket, 5*time.Second), snap, nil, &out, &errw)
	if err == nil || !strings.Contains(err.Error(), "the cache filled up: 1 blobs") || errw.String() != "blob sha256:d: digest mismatch\n" {
		t.Errorf("Import into a full cache: %v (stderr %q)", err, errw.String())
	}

	err = WaitAndImport(context.Background(), status.NewClient(filepath.Join(dir, "missing.sock"), time.Second), 0, snap, nil, &out, &errw)
	if err == nil || !strings.Contains(err.Error(), "was not imported") {
		t.Errorf("WaitAndImport without a daemon: %v", err)
	}
}

func TestClient(t *testing.T) {
	dir := testenv.SocketDir(t)
	socket := filepath.Join(dir, "status.sock")
	var evicted status.EvictRequest
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+status.PathCacheEvict, func(w http.ResponseWriter, r *http.Request) {
		json.NewDecoder(r.Body).Decode(&evicted)
		json.NewEncoder(w).Encode(status.EvictResult{Blobs: len(evicted.Digests), FreedBytes: 4096})
	})
	mux.HandleFunc("GET "+status.PathCacheExport, func(w http.ResponseWriter, r *http.Request) {
		if err := cachesnap.WriteTar(w, cachesnap.Index{MediaType: cachesnap.MediaTypeIndex}, nil); err != nil {
			t.Error(err)
		}
	})
	testenv.ServeUnix(t, socket, mux)
	noContainerd := errors.New("no containerd here")
	c := &Client{Status: status.NewClient(socket, 5*time.Second), Namespace: "default",
		Containerd: func() (*client.Client, error) { return nil, noContainerd }}
	ctx := context.Background()

	a := digest.FromString("a").String()
	res, err := c.Evict(ctx, []string{a})
	if err != nil || res.Blobs != 1 || len(evicted.Digests) != 1 || evicted.Digests[0] != a {
		t.Errorf("Evict(%s) = %+v, %v (asked %v)", a, res, err, evicted)
	}
	if _, err := c.Evict(ctx, []string{a, "r/app:obd"}); !errors.Is(err, noContainerd) {
		t.Errorf("Evict of an image without containerd: %v", err)
	}
	if _, err := c.Prune(ctx); !errors.Is(err, noContainerd) {
		t.Errorf("Prune without containerd: %v", err)
	}
	if err := c.Warm(ctx, io.Discard, "r/app:obd", true, "", nil, nil); !errors.Is(err, noContainerd) {
		t.Errorf("Warm without containerd: %v", err)
	}

	var out strings.Builder
	to := filepath.Join(t.TempDir(), "snap.tar")
	if err := c.Export(ctx, &out, nil, to, nil); err != nil || out.String() != "exported 0 blobs, 0 blocks, 0 B to "+to+"\n" {
		t.Errorf("Export: %q, %v", out.String(), err)
	}
}
