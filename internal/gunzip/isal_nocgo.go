//go:build !cgo

package gunzip

import (
	"errors"
	"io"
)

func isalAvailable() bool { return false }

func newISAL(io.Reader) (io.ReadCloser, error) { return nil, errors.New("gunzip: ISA-L needs cgo") }
