//go:build !cgo

package lz4c

// Available is false without cgo.
func Available() bool { return false }

// Batch always fails without cgo: the caller compresses with Go.
func Batch([]byte, int, []byte, int, []int32) (int, bool) { return 0, false }
