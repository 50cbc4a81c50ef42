package lsmt

import (
	"syscall"
	"unsafe"
)

const hugePage = 2 << 20

// adviseHuge marks the 2 MiB-aligned interior of b as eligible for transparent huge pages.
func adviseHuge(b []byte) {
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	start := (p+hugePage-1)&^(hugePage-1) - p
	end := (p+uintptr(len(b)))&^(hugePage-1) - p
	if end > start {
		_ = syscall.Madvise(b[start:end], syscall.MADV_HUGEPAGE) // a hint: failure only costs speed
	}
}
