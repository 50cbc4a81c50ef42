package node

import (
	"bytes"
	"context"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/cachesnap"
	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/mounter"
	"github.com/obdproject/obd/internal/status"
)

// cacheNode is a node's cache API on a status socket of its own.
type cacheNode struct {
	o  *ops
	sc *status.Client
}

func newCacheNode(tb testing.TB, blockSize int64) *cacheNode {
	tb.Helper()
	dir := tb.TempDir()
	o, _ := testOps(tb, func(c *config.Config) { c.Cache.Dir = dir })
	c, err := cache.Open(cache.Options{Dir: dir, CapacityBytes: 4 << 30, BlockSize: blockSize, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	o.cache, o.mounter = c, mounter.New(mounter.Options{Logger: slog.New(slog.DiscardHandler)})
	mux := http.NewServeMux()
	cacheAPI{o}.register(mux)
	sock := filepath.Join(tb.TempDir(), "status.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		tb.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	tb.Cleanup(func() { srv.Close() })
	return &cacheNode{o: o, sc: status.NewClient(sock, time.Minute)}
}

// BenchmarkCacheSnapshot moves a warm cache of 4 blobs of 64 MiB through the daemon's status socket: export to a
// snapshot file as obd cache export --to FILE does, and import of that file into an empty cache.
func BenchmarkCacheSnapshot(b *testing.B) {
	const blobs, size = 4, 64 << 20
	ctx := context.Background()
	from := newCacheNode(b, 64<<10)
	rnd := rand.NewChaCha8([32]byte{1})
	for range blobs {
		data := make([]byte, size)
		rnd.Read(data)
		r := from.o.cache.Reader(digest.FromBytes(data), size, bytes.NewReader(data))
		if err := r.Download(ctx, cache.DownloadOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	file := filepath.Join(b.TempDir(), "snapshot.tar")
	export := func() {
		body, err := from.sc.Stream(ctx, http.MethodGet, status.PathCacheExport, nil)
		if err != nil {
			b.Fatal(err)
		}
		defer body.Close()
		if _, _, err = cachesnap.WriteFile(body, file); err != nil {
			b.Fatal(err)
		}
	}
	export()
	b.Run("export", func(b *testing.B) {
		b.SetBytes(blobs * size)
		for b.Loop() {
			export()
		}
	})
	b.Run("import", func(b *testing.B) {
		b.SetBytes(blobs * size)
		for b.Loop() {
			b.StopTimer()
			to := newCacheNode(b, 64<<10)
			b.StartTimer()
			f, err := cachesnap.Open(ctx, file, nil)
			if err != nil {
				b.Fatal(err)
			}
			res, err := to.sc.Import(ctx, file, f)
			f.Close()
			if err != nil {
				b.Fatal(err)
			}
			for _, r := range res {
				if !r.Verified || r.Imported != size/(64<<10) {
					b.Fatalf("%+v", r)
				}
			}
		}
	})
}
