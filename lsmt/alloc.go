package lsmt

import "unsafe"

// hugeThreshold is the size from which index arrays ask for transparent huge pages.
const hugeThreshold = 2 << 20

// makeIndexSlice allocates a zeroed slice of n elements for index data. Large slices are
// advised to be backed by transparent huge pages before they are first touched: random lookups
// into tens of megabytes of index otherwise spend most of their time in TLB misses (measured 2×
// on a 1M-segment index). The memory stays ordinary garbage-collected memory; the advice is a
// hint that is ignored where unsupported.
func makeIndexSlice[T any](n int) []T {
	s := make([]T, n)
	var z T
	if size := n * int(unsafe.Sizeof(z)); size >= hugeThreshold {
		adviseHuge(unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(s))), size))
	}
	return s
}
