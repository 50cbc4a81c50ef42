package zfile

import (
	"bytes"
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

// countingReaderAt counts the reads of the compressed file.
type countingReaderAt struct {
	r     *bytes.Reader
	reads atomic.Int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	c.reads.Add(1)
	return c.r.ReadAt(p, off)
}

func TestPredecode(t *testing.T) {
	const bs = 16 << 10
	src := mixedData(40*bs+777, 3)
	zf := compressBytes(t, src, Options{Algorithm: AlgoZSTD, BlockSize: bs}, false)
	cr := &countingReaderAt{r: bytes.NewReader(zf)}
	z, err := Open(cr, int64(len(zf)), true)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	pool := NewPredecoded(8 * bs)
	// Blocks 2..5 (the range starts and ends inside blocks) and the short last block.
	if err := z.Predecode(ctx, pool, 2*bs+100, 3*bs+200); err != nil {
		t.Fatal(err)
	}
	if err := z.Predecode(ctx, pool, int64(len(src))-10, 100); err != nil {
		t.Fatal(err)
	}
	if d, _ := pool.Stats(); d != 5 {
		t.Fatalf("%d blocks predecoded, want 5", d)
	}
	z.UsePredecoded(pool)
	before := cr.reads.Load()
	check := func(off, n int64) {
		t.Helper()
		p := make([]byte, n)
		if _, err := z.ReadAt(p, off); err != nil || !bytes.Equal(p, src[off:off+n]) {
			t.Fatalf("ReadAt(%d, %d): %v, or wrong bytes", off, n, err)
		}
	}
	check(2*bs, 4*bs)               // whole blocks 2..5
	check(3*bs+5, 10)               // a piece of block 3, read again
	check(int64(len(src))-777, 777) // the last block
	if got := cr.reads.Load() - before; got != 0 {
		t.Fatalf("reads of predecoded blocks read the file %d times", got)
	}
	check(bs, 2*bs) // block 1 is not held: one read
	if got := cr.reads.Load() - before; got != 1 {
		t.Fatalf("a read of a held and a missing block read the file %d times, want 1", got)
	}
	if _, hits := pool.Stats(); hits != 7 || pool.Missed() != 1 {
		t.Fatalf("%d hits and %d blocks missed, want 7 and 1", hits, pool.Missed())
	}

	// The pool holds 8 blocks: 5 are held, 5 read. Decoding 10 more evicts read blocks, then waits for reads.
	tctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	err = z.Predecode(tctx, pool, 10*bs, 10*bs)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("predecoding past the bound of unread blocks: %v, want to wait until the deadline", err)
	}
	if pool.bytes > pool.max {
		t.Fatalf("the pool holds %d bytes, bound %d", pool.bytes, pool.max)
	}
	// Reading the new blocks makes room for the rest.
	done := make(chan error, 1)
	go func() { done <- z.Predecode(ctx, pool, 10*bs, 10*bs) }()
	for i := int64(10); i < 20; i++ {
		for !pool.has(predecodedKey{z.id, i}) {
			time.Sleep(time.Millisecond)
		}
		check(i*bs, bs)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	z.UsePredecoded(nil)
	check(0, int64(len(src)))

	// A decoding whose context is done stops before its next block, even with room.
	cctx, ccancel := context.WithCancel(ctx)
	ccancel()
	fresh := NewPredecoded(64 * bs)
	if err := z.Predecode(cctx, fresh, 0, int64(len(src))); !errors.Is(err, context.Canceled) {
		t.Fatalf("predecoding with a cancelled context: %v", err)
	}
	if d, _ := fresh.Stats(); d != 0 {
		t.Fatalf("%d blocks decoded with a cancelled context", d)
	}
	// Take: a pool takes another's blocks, as loaded, not decoded, within its bound; the reads find them.
	taker := NewPredecoded(3 * bs)
	if err := z.Predecode(ctx, fresh, 0, 5*bs); err != nil {
		t.Fatal(err)
	}
	taker.Take(fresh)
	if d, _ := taker.Stats(); d != 0 || taker.Loaded() != 3 || len(taker.Held([]*Reader{z})) != 3 {
		t.Fatalf("taken: %d decoded, %d loaded, %d held; want 0, 3, 3", d, taker.Loaded(), len(taker.Held([]*Reader{z})))
	}
	z.UsePredecoded(taker)
	before = cr.reads.Load()
	check(0, 3*bs)
	if got := cr.reads.Load() - before; got != 0 || taker.Missed() != 0 {
		t.Fatalf("reads of taken blocks read the file %d times, missed %d", got, taker.Missed())
	}
	// The blocks a read decodes itself are offered to the pool while it has room; Drop empties it.
	taker.Drop()
	check(5*bs, 2*bs)
	if taker.Offered() != 2 || len(taker.Held([]*Reader{z})) != 2 {
		t.Fatalf("after reads of 2 missing blocks: %d offered, %d held", taker.Offered(), len(taker.Held([]*Reader{z})))
	}
	z.UsePredecoded(nil)
}

func TestPredecodeCorrupt(t *testing.T) {
	const bs = 4 << 10
	src := mixedData(8*bs, 5)
	zf := compressBytes(t, src, Options{Algorithm: AlgoLZ4, BlockSize: bs}, false)
	off, _ := recordOffset(t, zf, 3)
	zf[off+1] ^= 0x40
	z := openBytes(t, zf, true)
	pool := NewPredecoded(1 << 20)
	err := z.Predecode(context.Background(), pool, 0, int64(len(src)))
	var be *BlockError
	if !errors.As(err, &be) || be.Block != 3 {
		t.Fatalf("predecoding a corrupt block: %v, want an error naming block 3", err)
	}
	if pool.has(predecodedKey{z.id, 3}) {
		t.Fatal("a corrupt block was kept")
	}
}
