package cache

import "testing"

func TestReaderStatsArePerReader(t *testing.T) {
	c := openTest(t, t.TempDir(), 1<<20, nil)
	defer c.Close()
	a, b := newSrc(10*testBS, 1), newSrc(10*testBS, 2)
	ra, rb := c.Reader(a.key(), int64(len(a.data)), a), c.Reader(b.key(), int64(len(b.data)), b)
	checkRead(t, ra, a, 0, 2*testBS) // two misses
	checkRead(t, ra, a, 0, testBS)   // one hit
	checkRead(t, rb, b, 0, testBS)   // one miss
	if h, m := ra.Stats(); h != 1 || m != 2 {
		t.Errorf("reader a: %d hits, %d misses; want 1, 2", h, m)
	}
	if h, m := rb.Stats(); h != 0 || m != 1 {
		t.Errorf("reader b: %d hits, %d misses; want 0, 1", h, m)
	}
	if s := c.Stats(); s.Hits != 1 || s.Misses != 3 {
		t.Errorf("cache stats %+v: want the sum of the readers'", s)
	}
}
