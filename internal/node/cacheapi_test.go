package node

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/cacheclient"
	"github.com/obdproject/obd/internal/cachesnap"
	"github.com/obdproject/obd/internal/config"
	"github.com/obdproject/obd/internal/mounter"
	"github.com/obdproject/obd/internal/status"
	"github.com/obdproject/obd/internal/testenv"
)

// cacheNode is a node's cache API on a status socket of its own.
type cacheNode struct {
	o    *ops
	sc   *status.Client
	logs *testenv.Buffer
}

func newCacheNode(tb testing.TB, blockSize int64) *cacheNode {
	tb.Helper()
	dir := tb.TempDir()
	o, logs := testOps(tb, func(c *config.Config) { c.Cache.Dir = dir })
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
	return &cacheNode{o: o, sc: status.NewClient(sock, time.Minute), logs: logs}
}

// cacheBlob caches a blob of size random bytes made from seed, the first n of its bytes (all when n < 0).
func (cn *cacheNode) cacheBlob(tb testing.TB, size int, seed byte, n int64) (digest.Digest, []byte) {
	tb.Helper()
	data := make([]byte, size)
	rand.NewChaCha8([32]byte{seed}).Read(data)
	key := digest.FromBytes(data)
	r := cn.o.cache.Reader(key, int64(size), bytes.NewReader(data))
	var err error
	if n < 0 {
		err = r.Download(context.Background(), cache.DownloadOptions{})
	} else {
		err = r.Prefetch(0, n)
	}
	if err != nil {
		tb.Fatal(err)
	}
	return key, data
}

// A snapshot moves between nodes through files both the CLI and the daemon see: the daemon writes the export into
// the file and reads the import from it; when it sees another file at the path, the file is streamed.
func TestCacheSnapshotFiles(t *testing.T) {
	ctx := context.Background()
	from, to := newCacheNode(t, 64<<10), newCacheNode(t, 64<<10)
	whole, wholeData := from.cacheBlob(t, 1<<20+5, 1, -1)
	part, partData := from.cacheBlob(t, 4<<20, 2, 256<<10)

	path := filepath.Join(t.TempDir(), "snap.tar")
	var out strings.Builder
	cc := &cacheclient.Client{Status: from.sc}
	if err := cc.Export(ctx, &out, nil, path, nil); err != nil || out.String() != "exported 2 blobs, 21 blocks, 1.3 MiB to "+path+"\n" {
		t.Fatalf("export: %q, %v", out.String(), err)
	}
	if !strings.Contains(from.logs.String(), "file="+filepath.Dir(path)+"/.snap.tar.") {
		t.Errorf("the daemon did not write the file itself:\n%s", from.logs.String())
	}
	if err := cacheclient.Import(ctx, to.sc, path, nil, &out, io.Discard); err != nil {
		t.Fatalf("import: %v", err)
	}
	if !strings.Contains(to.logs.String(), "file="+path) {
		t.Errorf("the daemon did not read the file itself:\n%s", to.logs.String())
	}
	failing := readerAtFunc(func([]byte, int64) (int, error) { return 0, errors.New("not from the registry") })
	for _, b := range []struct {
		key  digest.Digest
		data []byte
		size int
	}{{whole, wholeData, len(wholeData)}, {part, partData[:256<<10], len(partData)}} {
		got := make([]byte, len(b.data))
		if _, err := to.o.cache.Reader(b.key, int64(b.size), failing).ReadAt(got, 0); err != nil || !bytes.Equal(got, b.data) {
			t.Errorf("blob %s after import: %v", b.key, err)
		}
	}

	// Another file at the path, as a daemon in another mount namespace sees: the snapshot is streamed instead.
	other := newCacheNode(t, 64<<10)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := os.WriteFile(path+".other", []byte("not a snapshot"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".other", path); err != nil {
		t.Fatal(err)
	}
	res, err := other.sc.Import(ctx, "moved", f)
	if err != nil || len(res) != 2 || res[0].Verified == res[1].Verified || res[0].Imported+res[1].Imported != 21 {
		t.Fatalf("import of a file the daemon does not see: %+v, %v", res, err)
	}
	fifo := filepath.Join(t.TempDir(), "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(fifo, &st); err != nil {
		t.Fatal(err)
	}
	q := url.Values{"file": {fifo}, "dev": {strconv.FormatUint(st.Dev, 10)}, "ino": {strconv.FormatUint(st.Ino, 10)}}
	testenv.Within(t, 5*time.Second, "the import of a FIFO", func() {
		if _, err := other.sc.Stream(ctx, http.MethodPost, status.PathCacheImportFile+"?"+q.Encode(), http.NoBody); !errors.Is(err, status.ErrNotShared) {
			t.Errorf("import of a FIFO: %v, want ErrNotShared", err)
		}
	})
	if _, err := other.sc.Stream(ctx, http.MethodPost, status.PathCacheImportFile+"?file=rel&dev=1&ino=2", http.NoBody); err == nil ||
		errors.Is(err, status.ErrNotShared) || !strings.Contains(err.Error(), "want an absolute path") {
		t.Errorf("import of a relative path: %v", err)
	}
}

// readerAtFunc is a function as an io.ReaderAt.
type readerAtFunc func([]byte, int64) (int, error)

func (f readerAtFunc) ReadAt(p []byte, off int64) (int, error) { return f(p, off) }

// BenchmarkCacheSnapshot moves a warm cache of 4 blobs of 64 MiB through the daemon's status socket: export to a
// snapshot file and import of that file into an empty cache, as obd cache export --to FILE and import FILE do.
func BenchmarkCacheSnapshot(b *testing.B) {
	const blobs, size = 4, 64 << 20
	ctx := context.Background()
	from := newCacheNode(b, 64<<10)
	for k := range blobs {
		from.cacheBlob(b, size, byte(k), -1)
	}
	file := filepath.Join(b.TempDir(), "snapshot.tar")
	cc := &cacheclient.Client{Status: from.sc}
	export := func() {
		if err := cc.Export(ctx, io.Discard, nil, file, nil); err != nil {
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
