package zfile

import (
	"bytes"
	"errors"
	"math/rand"
	"testing"
)

// flakyCache serves a ZFile with one block's bytes corrupted until the block is evicted (refetched) fixed times.
type flakyCache struct {
	good, cur []byte
	evicts    int
	healAfter int // evictions after which the data is served correctly; <0 never
}

func (c *flakyCache) ReadAt(p []byte, off int64) (int, error) {
	return bytes.NewReader(c.cur).ReadAt(p, off)
}

func (c *flakyCache) Evict(off, n int64) error {
	c.evicts++
	if c.healAfter >= 0 && c.evicts >= c.healAfter {
		copy(c.cur[off:off+n], c.good[off:off+n])
	}
	return nil
}

func TestReloadEvictsCorruptBlock(t *testing.T) {
	src := make([]byte, 64<<10)
	rand.New(rand.NewSource(1)).Read(src[:32<<10])
	var zf bytes.Buffer
	if _, err := Compress(&zf, bytes.NewReader(src), Options{}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		healAfter, wantEvicts int
		ok                    bool
	}{{1, 1, true}, {2, 2, true}, {-1, MaxReloads, false}} {
		cache := &flakyCache{good: zf.Bytes(), cur: bytes.Clone(zf.Bytes()), healAfter: c.healAfter}
		z, err := Open(cache, int64(zf.Len()), true)
		if err != nil {
			t.Fatal(err)
		}
		rec := z.offset(3)
		cache.cur[rec+1] ^= 0xff // corrupt block 3 after Open
		got := make([]byte, 4096)
		_, err = z.ReadAt(got, 3*4096)
		if c.ok && (err != nil || !bytes.Equal(got, src[3*4096:4*4096])) {
			t.Errorf("heal after %d: %v", c.healAfter, err)
		}
		if !c.ok && !errors.Is(err, ErrChecksum) {
			t.Errorf("never healed: err = %v, want ErrChecksum", err)
		}
		if cache.evicts != c.wantEvicts {
			t.Errorf("heal after %d: %d evictions, want %d", c.healAfter, cache.evicts, c.wantEvicts)
		}
	}
}
