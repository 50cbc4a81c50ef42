//go:build !cgo

package zfile

func lz4C() bool { return false }

func lz4Batch([]byte, int, []byte, int, []int32) (int, bool) { return 0, false }
