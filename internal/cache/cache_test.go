package cache

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/testenv"
)

// memSrc is an in-memory source that counts its reads.
type memSrc struct {
	data  []byte
	delay time.Duration
	calls atomic.Int64
	bytes atomic.Int64
	fail  atomic.Bool
}

func newSrc(n int, seed uint64) *memSrc {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, 99))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return &memSrc{data: b}
}

func (m *memSrc) key() digest.Digest { return digest.FromBytes(m.data) }

func (m *memSrc) ReadAt(p []byte, off int64) (int, error) {
	m.calls.Add(1)
	if m.delay > 0 {
		time.Sleep(m.delay)
	}
	if m.fail.Load() {
		return 0, errors.New("source down")
	}
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	m.bytes.Add(int64(n))
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

const testBS = 4096

func openTest(t testing.TB, dir string, capacity int64, logs io.Writer) *Cache {
	t.Helper()
	if logs == nil {
		logs = io.Discard
	}
	c, err := Open(Options{Dir: dir, CapacityBytes: capacity, BlockSize: testBS, Logger: slog.New(slog.NewTextHandler(logs, nil)), flushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// settle waits until the source reads that no read waits for (the rest of a fetch unit, readahead) are over.
func settle(c *Cache) {
	for c.background.Load() > 0 {
		time.Sleep(time.Millisecond)
	}
}

// checkRead reads [off, off+n) through r and compares it with src.
func checkRead(t testing.TB, r *Reader, src *memSrc, off int64, n int) {
	t.Helper()
	p := make([]byte, n)
	got, err := r.ReadAt(p, off)
	settle(r.c)
	want := max(0, min(n, len(src.data)-int(off)))
	if got != want {
		t.Fatalf("ReadAt(%d, %d) = %d, %v; want %d bytes", n, off, got, err, want)
	}
	if got < n && err != io.EOF {
		t.Fatalf("ReadAt(%d, %d) short without io.EOF: %v", n, off, err)
	}
	if got == n && err != nil {
		t.Fatalf("ReadAt(%d, %d): %v", n, off, err)
	}
	if got > 0 && !bytes.Equal(p[:got], src.data[off:off+int64(got)]) {
		t.Fatalf("ReadAt(%d, %d): bytes differ from the source", n, off)
	}
}

func TestRandomReadsMatchSource(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	rng := rand.New(rand.NewPCG(5, 5))
	for _, size := range []int{0, 1, testBS - 1, testBS, testBS + 1, 3*testBS + testBS/2, 40 * testBS} {
		src := newSrc(size, uint64(size))
		r := c.Reader(src.key(), int64(size), src)
		for range 100 {
			off := rng.Int64N(int64(size) + 2)
			checkRead(t, r, src, off, rng.IntN(3*testBS)+1)
		}
		// Everything read once is now on disk: reading it all again hits only what was missing.
		checkRead(t, r, src, 0, size)
		calls := src.calls.Load()
		checkRead(t, r, src, 0, size)
		if src.calls.Load() != calls {
			t.Fatalf("size %d: a second full read went to the source", size)
		}
	}
	if st := c.Stats(); st.Hits == 0 || st.Misses == 0 || st.BytesFetched == 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestCoalescesMissingBlocks(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	src := newSrc(20*testBS, 1)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	checkRead(t, r, src, 100, 4*testBS) // blocks 0-4: one source read
	if n := src.calls.Load(); n != 1 {
		t.Fatalf("%d source reads for 5 missing blocks, want 1", n)
	}
	checkRead(t, r, src, 7*testBS, 10) // block 7
	checkRead(t, r, src, 0, 10*testBS) // blocks 5-6 and 8-9 missing: two runs
	if n := src.calls.Load(); n != 4 {
		t.Fatalf("%d source reads, want 4", n)
	}
	if src.bytes.Load() != 10*testBS {
		t.Fatalf("fetched %d bytes, want exactly the 10 blocks", src.bytes.Load())
	}
}

func TestConcurrentReadersFetchOnce(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	src := newSrc(8*testBS, 2)
	src.delay = 50 * time.Millisecond
	r := c.Reader(src.key(), int64(len(src.data)), src)
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Go(func() { checkRead(t, r, src, int64(1+g), testBS) }) // blocks 0-1
	}
	wg.Wait()
	if n := src.calls.Load(); n != 1 {
		t.Fatalf("%d source reads for 16 concurrent readers of the same blocks, want 1", n)
	}
}

func TestSourceErrorReachesAllWaiters(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	src := newSrc(4*testBS, 3)
	src.delay = 20 * time.Millisecond
	src.fail.Store(true)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	var wg sync.WaitGroup
	var failures atomic.Int64
	for range 8 {
		wg.Go(func() {
			if _, err := r.ReadAt(make([]byte, 100), 0); err != nil {
				failures.Add(1)
			}
		})
	}
	wg.Wait()
	if failures.Load() != 8 {
		t.Fatalf("%d of 8 readers saw the source error", failures.Load())
	}
	src.fail.Store(false)
	checkRead(t, r, src, 0, 100) // nothing bad was stored
}

func TestCapacityIsNeverExceeded(t *testing.T) {
	const capacity = 10 * testBS
	logs := &testenv.Buffer{}
	c := openTest(t, t.TempDir(), capacity, logs)
	var srcs []*memSrc
	var readers []*Reader
	for i := range 20 {
		src := newSrc(testBS*(1+i%7)+i*13, uint64(i))
		srcs = append(srcs, src)
		readers = append(readers, c.Reader(src.key(), int64(len(src.data)), src))
	}
	stop := make(chan struct{})
	var violations atomic.Int64
	var monitor sync.WaitGroup
	monitor.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			c.mu.Lock()
			if c.used > capacity {
				violations.Add(1)
			}
			c.mu.Unlock()
			if used, _ := c.Usage(); used > capacity {
				violations.Add(1)
			}
		}
	})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 11))
			for range 300 {
				i := rng.IntN(len(srcs))
				size := len(srcs[i].data)
				off := rng.Int64N(int64(size))
				checkRead(t, readers[i], srcs[i], off, rng.IntN(3*testBS)+1)
			}
		})
	}
	wg.Wait()
	close(stop)
	monitor.Wait()
	if v := violations.Load(); v > 0 {
		t.Fatalf("capacity exceeded %d times", v)
	}
	st := c.Stats()
	if st.Evictions == 0 {
		t.Fatalf("no eviction with 20 blobs in 10 blocks: %+v", st)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	// The bound holds on disk too: reopened, the cache finds at most capacity bytes.
	c2 := openTest(t, c.opts.Dir, capacity, nil)
	defer c2.Close()
	if used, _ := c2.Usage(); used > capacity {
		t.Fatalf("reopened cache holds %d bytes, capacity %d", used, capacity)
	}
}

func TestEvictionSkipsPinnedBlocks(t *testing.T) {
	c := openTest(t, t.TempDir(), 4*testBS, nil)
	defer c.Close()
	a := newSrc(4*testBS, 1)
	ra := c.Reader(a.key(), int64(len(a.data)), a)
	checkRead(t, ra, a, 0, 4*testBS) // the cache is full of a
	// An ongoing read holds a's blocks 0-3.
	ra.b.mu.Lock()
	ra.b.pins = append(ra.b.pins, pinRange{0, 3})
	ra.b.mu.Unlock()
	b := newSrc(2*testBS, 2)
	rb := c.Reader(b.key(), int64(len(b.data)), b)
	checkRead(t, rb, b, 0, 2*testBS) // served from the source, not stored
	if st := c.Stats(); st.Evictions != 0 || st.StoreFailures != 1 {
		t.Fatalf("pinned blocks evicted or store not refused: %+v", st)
	}
	ra.b.unpin(pinRange{0, 3})
	checkRead(t, rb, b, 0, 2*testBS) // now a's blocks give way
	if st := c.Stats(); st.Evictions == 0 {
		t.Fatalf("no eviction once unpinned: %+v", st)
	}
	calls := b.calls.Load()
	checkRead(t, rb, b, 0, 2*testBS)
	if b.calls.Load() != calls {
		t.Fatal("b was not stored")
	}
}

func TestRestartKeepsBlocks(t *testing.T) {
	dir := t.TempDir()
	c := openTest(t, dir, 1<<30, nil)
	src := newSrc(10*testBS+5, 4)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	checkRead(t, r, src, 0, len(src.data))
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	checkRead(t, r, src, 0, 10) // a closed cache's readers read the source
	calls := src.calls.Load()

	c = openTest(t, dir, 1<<30, nil)
	defer c.Close()
	if used, blobs := c.Usage(); used != int64(len(src.data)) || blobs != 1 {
		t.Fatalf("reopened usage %d bytes in %d blobs", used, blobs)
	}
	r = c.Reader(src.key(), int64(len(src.data)), src)
	checkRead(t, r, src, 0, len(src.data))
	if src.calls.Load() != calls {
		t.Fatal("reads after a restart went to the source")
	}
	if st := c.Stats(); st.Hits != 11 || st.Misses != 0 {
		t.Fatalf("stats %+v, want 11 hits", st)
	}
}

func TestEvictRefetches(t *testing.T) {
	dir := t.TempDir()
	c := openTest(t, dir, 1<<30, nil)
	src := newSrc(10*testBS, 6)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	checkRead(t, r, src, 0, len(src.data))
	// Corrupt block 3 on disk, as a bad disk would; the reader above notices (CRC) and evicts it.
	f, err := os.OpenFile(r.b.dataPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("garbage"), 3*testBS+10); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := r.Evict(3*testBS+5, 20); err != nil {
		t.Fatal(err)
	}
	calls, fetched := src.calls.Load(), src.bytes.Load()
	checkRead(t, r, src, 0, len(src.data))
	if src.calls.Load() != calls+1 || src.bytes.Load() != fetched+testBS {
		t.Fatalf("evicting one block refetched %d reads, %d bytes", src.calls.Load()-calls, src.bytes.Load()-fetched)
	}
	if err := r.Evict(-1, 5); err == nil {
		t.Fatal("negative offset accepted")
	}
	// The eviction is durable: after a restart the evicted block is fetched again, the others are not.
	if err := r.Evict(0, testBS); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c = openTest(t, dir, 1<<30, nil)
	defer c.Close()
	r = c.Reader(src.key(), int64(len(src.data)), src)
	calls = src.calls.Load()
	checkRead(t, r, src, 0, len(src.data))
	if src.calls.Load() != calls+1 {
		t.Fatalf("%d source reads after restart, want 1 (block 0)", src.calls.Load()-calls)
	}
}

func TestCorruptStateFileResetsBlob(t *testing.T) {
	dir := t.TempDir()
	c := openTest(t, dir, 1<<30, nil)
	src := newSrc(5*testBS, 7)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	checkRead(t, r, src, 0, len(src.data))
	statePath, dataPath := r.b.statePath, r.b.dataPath
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	st, err := os.ReadFile(statePath)
	if err != nil {
		t.Fatal(err)
	}
	st[stateHeaderSize] ^= 0x10 // flip a bitmap bit: the checksum no longer matches
	if err := os.WriteFile(statePath, st, 0o600); err != nil {
		t.Fatal(err)
	}
	logs := &testenv.Buffer{}
	c = openTest(t, dir, 1<<30, logs)
	defer c.Close()
	if !strings.Contains(logs.String(), "corrupt state file") || !strings.Contains(logs.String(), src.key().String()) {
		t.Fatalf("no log line about the corrupt state: %q", logs.String())
	}
	if _, err := os.Stat(dataPath); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("data file of the dropped blob is still there: %v", err)
	}
	if used, blobs := c.Usage(); used != 0 || blobs != 0 {
		t.Fatalf("usage %d/%d after dropping the only blob", used, blobs)
	}
	r = c.Reader(src.key(), int64(len(src.data)), src)
	calls := src.calls.Load()
	checkRead(t, r, src, 0, len(src.data))
	if src.calls.Load() == calls {
		t.Fatal("blocks of a dropped blob were served from disk")
	}
}

func TestCrashSafety(t *testing.T) {
	dir := t.TempDir()
	c := openTest(t, dir, 1<<30, nil)
	defer c.Close()
	src := newSrc(6*testBS, 8)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	checkRead(t, r, src, 0, 3*testBS)

	// The process dies before the blocks were recorded: the copy of the directory is what a restart finds.
	crashed := copyDir(t, dir)
	c2 := openTest(t, crashed, 1<<30, nil)
	if used, _ := c2.Usage(); used != 0 {
		t.Fatalf("unrecorded blocks reported present after a crash: %d bytes", used)
	}
	c2.Close()

	// Once flushed, they survive the crash.
	if err := c.flush(false); err != nil {
		t.Fatal(err)
	}
	checkRead(t, r, src, 3*testBS, 3*testBS) // more blocks, not recorded yet
	crashed = copyDir(t, dir)
	// A state write interrupted before its rename leaves a temporary file: it is ignored and removed.
	tmp := filepath.Join(crashed, "sha256", src.key().Encoded()+".state.tmp")
	if err := os.WriteFile(tmp, []byte("half a state"), 0o600); err != nil {
		t.Fatal(err)
	}
	c2 = openTest(t, crashed, 1<<30, nil)
	if used, _ := c2.Usage(); used != 3*testBS {
		t.Fatalf("after flush and crash: %d bytes present, want the 3 recorded blocks", used)
	}
	if _, err := os.Stat(tmp); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("leftover temporary state file not removed")
	}
	r2 := c2.Reader(src.key(), int64(len(src.data)), src)
	calls := src.calls.Load()
	checkRead(t, r2, src, 0, len(src.data))
	if src.calls.Load() != calls+1 {
		t.Fatalf("%d source reads, want 1 (the 3 unrecorded blocks)", src.calls.Load()-calls)
	}
	c2.Close()

	// A data file that lost its tail (the disk lost writes) is not trusted.
	crashed = copyDir(t, dir)
	if err := os.Truncate(filepath.Join(crashed, "sha256", src.key().Encoded()+".data"), testBS); err != nil {
		t.Fatal(err)
	}
	c2 = openTest(t, crashed, 1<<30, nil)
	defer c2.Close()
	if used, _ := c2.Usage(); used != 0 {
		t.Fatalf("blob with a truncated data file kept %d bytes", used)
	}
}

func copyDir(t *testing.T, dir string) string {
	t.Helper()
	dst := t.TempDir()
	if out, err := exec.Command("cp", "-a", dir+"/.", dst).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	return dst
}

func TestStoreFailureServesFromSource(t *testing.T) {
	dir := t.TempDir()
	logs := &testenv.Buffer{}
	c := openTest(t, dir, 1<<30, logs)
	defer c.Close()
	// Data files cannot be created: a regular file sits where the sha256 directory should be.
	if err := os.WriteFile(filepath.Join(dir, "sha256"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	src := newSrc(5*testBS, 9)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	for range 3 {
		checkRead(t, r, src, 0, len(src.data))
	}
	if st := c.Stats(); st.StoreFailures != 3 {
		t.Fatalf("stats %+v, want 3 store failures", st)
	}
	if n := strings.Count(logs.String(), "cannot store"); n != 1 {
		t.Fatalf("%d log lines about failed stores, want 1:\n%s", n, logs.String())
	}
}

func TestFullDiskTerminates(t *testing.T) {
	testenv.Root(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", dir).CombinedOutput(); err != nil {
		testenv.Skip(t, fmt.Sprintf("cannot mount a tmpfs: %v: %s", err, out))
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
	// Another process fills the disk.
	if err := os.WriteFile(filepath.Join(dir, "filler"), make([]byte, 200<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	logs := &testenv.Buffer{}
	// A capacity far above what the disk has. No readahead: its stores, racing the reads', would succeed and fail
	// by turns while the disk has a few blocks left, and the test counts the log lines of one failing phase.
	c, err := Open(Options{Dir: dir, CapacityBytes: 1 << 30, BlockSize: testBS, ReadaheadBytes: -1,
		Logger: slog.New(slog.NewTextHandler(logs, nil)), flushInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	src := newSrc(64*testBS, 10)
	r := c.Reader(src.key(), int64(len(src.data)), src)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for off := 0; off < len(src.data); off += testBS {
			checkRead(t, r, src, int64(off), testBS)
		}
		checkRead(t, r, src, 0, len(src.data))
	}()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("reads on a full disk did not finish")
	}
	if st := c.Stats(); st.StoreFailures == 0 {
		t.Fatalf("the full disk was not noticed: %+v", st)
	}
	if n := strings.Count(logs.String(), "cannot store"); n != 1 {
		t.Fatalf("%d log lines about failed stores, want 1", n)
	}
	if err := c.Close(); err != nil {
		t.Logf("close on a full disk: %v", err)
	}
	c = openTest(t, dir, 1<<30, nil)
	defer c.Close()
	r = c.Reader(src.key(), int64(len(src.data)), src)
	checkRead(t, r, src, 0, len(src.data)) // what was recorded is right
}

func TestPassThroughReaders(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<30, nil)
	defer c.Close()
	src := newSrc(3*testBS, 12)
	r := c.Reader("sha256:nothex", int64(len(src.data)), src)
	checkRead(t, r, src, 5, 2*testBS)
	if used, _ := c.Usage(); used != 0 {
		t.Fatal("a blob with an invalid digest was cached")
	}
	// The same digest opened with another size: the old blocks are dropped, the new size is used.
	good := c.Reader(src.key(), int64(len(src.data)), src)
	checkRead(t, good, src, 0, len(src.data))
	short := &memSrc{data: src.data[:testBS]}
	r2 := c.Reader(src.key(), testBS, short)
	checkRead(t, r2, short, 0, testBS)
	if used, _ := c.Usage(); used != testBS {
		t.Fatalf("usage %d after the size change, want one block", used)
	}
	// The old reader no longer uses the cache but still reads right.
	checkRead(t, good, src, 0, len(src.data))
}

func TestOpenValidates(t *testing.T) {
	if _, err := Open(Options{Dir: t.TempDir()}); err == nil {
		t.Fatal("zero capacity accepted")
	}
	if _, err := Open(Options{CapacityBytes: 1}); err == nil {
		t.Fatal("no directory accepted")
	}
	// A smaller capacity at the next start evicts down to it.
	dir := t.TempDir()
	c := openTest(t, dir, 1<<30, nil)
	var srcs []*memSrc
	for i := range 4 {
		src := newSrc(4*testBS, uint64(100+i))
		srcs = append(srcs, src)
		checkRead(t, c.Reader(src.key(), int64(len(src.data)), src), src, 0, len(src.data))
		time.Sleep(time.Millisecond) // distinct access times
	}
	c.Close()
	c = openTest(t, dir, 6*testBS, nil)
	defer c.Close()
	if used, _ := c.Usage(); used > 6*testBS || used < 4*testBS {
		t.Fatalf("reopened with a smaller capacity: %d bytes", used)
	}
	// The most recently used blob is the one kept whole.
	last := srcs[3]
	calls := last.calls.Load()
	checkRead(t, c.Reader(last.key(), int64(len(last.data)), last), last, 0, len(last.data))
	if last.calls.Load() != calls {
		t.Fatal("the most recently used blob was evicted")
	}
}

func TestStateRoundTrip(t *testing.T) {
	for _, size := range []int64{0, 1, 4095, 4096, 4097, 64 * 4096, 65*4096 + 3} {
		nb := numBlocks(size, 4096)
		s := &state{blockSize: 4096, size: size, lastAccess: 12345, present: make([]uint64, (nb+63)/64)}
		for i := int64(0); i < nb; i += 3 {
			s.present[i/64] |= 1 << (i % 64)
		}
		got, err := decodeState(encodeState(s))
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if got.size != s.size || got.blockSize != s.blockSize || got.lastAccess != s.lastAccess || fmt.Sprint(got.present) != fmt.Sprint(s.present) {
			t.Fatalf("size %d: round trip gave %+v", size, got)
		}
	}
}

func FuzzDecodeState(f *testing.F) {
	f.Add(encodeState(&state{blockSize: 4096, size: 10000, lastAccess: 1, present: []uint64{5}}))
	f.Add(encodeState(&state{blockSize: 1, size: 0, present: nil}))
	f.Add([]byte("OBDCACH1"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := decodeState(data)
		if err != nil {
			return
		}
		if !bytes.Equal(encodeState(s), data) {
			t.Fatal("accepted state does not re-encode to the same bytes")
		}
		if pb := s.presentBytes(); pb < 0 || pb > s.size {
			t.Fatalf("present bytes %d of a %d-byte blob", pb, s.size)
		}
	})
}
