package lsmt

import (
	"math/rand"
	"sort"
	"testing"
)

// randomIndex returns n sorted, non-overlapping mappings with random gaps and lengths.
func randomIndex(rng *rand.Rand, n int) []mapping {
	ms := make([]mapping, 0, n)
	off := uint64(0)
	for i := 0; i < n; i++ {
		off += uint64(rng.Intn(4))
		l := uint32(1 + rng.Intn(64))
		ms = append(ms, pack(off, l, 8+uint64(i)*64, rng.Intn(8) == 0, 0))
		off += uint64(l)
	}
	return ms
}

func TestSegIndexFind(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for _, n := range []int{0, 1, 2, 15, 16, 17, 255, 256, 257, 4095, 4096, 4097, 70000} {
		ms := randomIndex(rng, n)
		ref := append([]mapping(nil), ms...)
		x := newSegIndex(ms)
		max := uint64(0)
		if n > 0 {
			max = ref[n-1].end()
		}
		check := func(lba uint64) {
			want := sort.Search(len(ref), func(i int) bool { return ref[i].end() > lba })
			if got := x.find(lba); got != want {
				t.Fatalf("n=%d find(%d)=%d want %d", n, lba, got, want)
			}
		}
		for lba := uint64(0); lba < max+3 && lba < 5000; lba++ {
			check(lba)
		}
		for k := 0; k < 20000; k++ {
			check(uint64(rng.Int63n(int64(max) + 10)))
		}
	}
}
