package image

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/obdproject/obd/lsmt"
)

// ExportRaw writes the virtual disk of a layer stack to w, which must read as zeros where it is not written (a new
// file truncated to the stack's virtual size): only the stack's data extents are written, and within them only
// the 4 KiB blocks that are not all zero, so holes stay holes. progress, if set, is called with the bytes done and
// the total after each chunk. It returns the bytes written.
func ExportRaw(ctx context.Context, s *lsmt.Stack, w io.WriterAt, progress func(done, total int64)) (int64, error) {
	extents := s.Extents()
	var total int64
	for _, e := range extents {
		total += int64(e.Length) * lsmt.SectorSize
	}
	const chunk = 1 << 20
	buf := make([]byte, chunk)
	var done, written int64
	for _, e := range extents {
		off, end := int64(e.Offset)*lsmt.SectorSize, int64(e.End())*lsmt.SectorSize
		for off < end {
			if err := ctx.Err(); err != nil {
				return written, err
			}
			b := buf[:min(int64(chunk), end-off)]
			if _, err := s.ReadAt(b, off); err != nil {
				return written, fmt.Errorf("read virtual disk at offset %d: %w", off, err)
			}
			n, err := writeNonZero(w, b, off)
			written += n
			if err != nil {
				return written, err
			}
			off += int64(len(b))
			done += int64(len(b))
			if progress != nil {
				progress(done, total)
			}
		}
	}
	return written, nil
}

// writeNonZero writes the 4 KiB blocks of b that are not all zero.
func writeNonZero(w io.WriterAt, b []byte, off int64) (int64, error) {
	const blk = 4096
	var zero [blk]byte
	var written int64
	isZero := func(i int) bool { return bytes.Equal(b[i:min(i+blk, len(b))], zero[:min(blk, len(b)-i)]) }
	for i := 0; i < len(b); {
		if isZero(i) {
			i += blk
			continue
		}
		j := i + blk
		for j < len(b) && !isZero(j) {
			j += blk
		}
		j = min(j, len(b))
		if _, err := w.WriteAt(b[i:j], off+int64(i)); err != nil {
			return written, err
		}
		written += int64(j - i)
		i = j
	}
	return written, nil
}

// ExportRawFile writes the stack's virtual disk to path as a sparse file (ExportRaw), through a temporary file
// renamed at the end so that a failure never leaves a partial disk under the final name. progress is as for
// ExportRaw. It returns the data bytes written.
func ExportRawFile(ctx context.Context, s *lsmt.Stack, path string, progress func(done, total int64)) (int64, error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return 0, err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if err := tmp.Truncate(s.VirtualSize()); err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	n, err := ExportRaw(ctx, s, tmp, progress)
	if err != nil {
		return n, fmt.Errorf("%s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		return n, fmt.Errorf("%s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return n, fmt.Errorf("%s: %w", path, err)
	}
	return n, os.Rename(tmp.Name(), path)
}
