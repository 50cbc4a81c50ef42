//go:build !linux

package cache

import (
	"errors"
	"os"
)

// punchHole is not available here: evicted bytes keep their space until they are overwritten or the blob is dropped.
func punchHole(*os.File, int64, int64) error { return errors.ErrUnsupported }

// willNeed is not available here: the bytes are read when they are read.
func willNeed(*os.File, int64, int64) error { return errors.ErrUnsupported }
