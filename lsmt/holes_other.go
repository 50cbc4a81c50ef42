//go:build !linux

package lsmt

import "fmt"

// holeFile returns the hole operations of a sparse layer's data file.
func holeFile(f WriteAtFile) (HoleFile, error) {
	if h, ok := f.(HoleFile); ok {
		return h, nil
	}
	return nil, fmt.Errorf("lsmt: a sparse layer needs a HoleFile on this system, got %T", f)
}
