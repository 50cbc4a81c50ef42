package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/gzip"
	digest "github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/gzindex"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/zfile"
)

// TurboOCI layer blobs are a tar.gz of the layer's filesystem metadata (<fstype>.fs.meta: a warp LSMT layer,
// usually in a ZFile), an empty marker file and, when the original layer is gzip'd, its gzip index.
const (
	turboMetaSuffix = ".fs.meta"
	turboMarker     = ".turbo.ociv1"
	turboGzipIndex  = "gzip.meta"
	// maxTurboMember bounds one file of a TurboOCI layer blob, maxTurboInMemory one that ReadTurboMeta holds.
	maxTurboMember   = 16 << 30
	maxTurboInMemory = 1 << 30
)

// TurboMeta is the content of a TurboOCI layer blob: its files, in memory (ReadTurboMeta) or in a directory
// (ExtractTurboMeta).
type TurboMeta struct {
	FSType        string      // filesystem of the metadata: "ext4" or "erofs"
	FSMeta        io.ReaderAt // the warp layer file (ZFile or LSMT)
	FSMetaSize    int64
	GzipIndex     io.ReaderAt // nil when the original layer is an uncompressed tar
	GzipIndexSize int64
	files         []*os.File
	dir           string // of an extraction
}

// Close releases the files of an extracted TurboMeta and removes them.
func (tm *TurboMeta) Close() error {
	var errs []error
	for _, f := range tm.files {
		errs = append(errs, f.Close())
	}
	tm.files = nil
	if tm.dir != "" {
		errs = append(errs, os.RemoveAll(tm.dir))
		tm.dir = ""
	}
	return errors.Join(errs...)
}

// IsTurbo tells a TurboOCI layer from its annotations.
func IsTurbo(annotations map[string]string) bool {
	return annotations[AnnotationTurboTarget] != "" || annotations[AnnotationVersion] == TurboVersion
}

// turboTarget returns the digest of a TurboOCI layer's original blob from its annotations.
func turboTarget(annotations map[string]string) (digest.Digest, error) {
	s := annotations[AnnotationTurboTarget]
	if s == "" {
		s = annotations["containerd.io/snapshot/overlaybd/fastoci/target-digest"] // upstream's earlier name
	}
	if s == "" {
		return "", fmt.Errorf("TurboOCI layer without a %s annotation", AnnotationTurboTarget)
	}
	d, err := digest.Parse(s)
	if err != nil {
		return "", fmt.Errorf("annotation %s: %w", AnnotationTurboTarget, err)
	}
	return d, nil
}

// ReadTurboMeta reads a TurboOCI layer blob (tar.gz, or tar) into memory.
func ReadTurboMeta(r io.Reader) (*TurboMeta, error) {
	tm := &TurboMeta{}
	err := readTurboMeta(r, func(name string, size int64, body io.Reader) (io.ReaderAt, error) {
		if size > maxTurboInMemory {
			return nil, fmt.Errorf("%d bytes, more than %d to hold in memory", size, maxTurboInMemory)
		}
		b := make([]byte, size)
		if _, err := io.ReadFull(body, b); err != nil {
			return nil, err
		}
		return bytes.NewReader(b), nil
	}, tm)
	return tm, err
}

// ExtractTurboMeta reads a TurboOCI layer blob (tar.gz, or tar) into files in dir, which it creates and which Close
// removes: the returned TurboMeta reads them, so the daemon keeps large metadata (a big layer's gzip index is tens of
// megabytes) out of memory.
func ExtractTurboMeta(r io.Reader, dir string) (*TurboMeta, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	tm := &TurboMeta{dir: dir}
	err := readTurboMeta(r, func(name string, size int64, body io.Reader) (io.ReaderAt, error) {
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return nil, err
		}
		tm.files = append(tm.files, f)
		_, err = io.Copy(f, io.LimitReader(body, size))
		return f, err
	}, tm)
	if err != nil {
		tm.Close()
		return nil, err
	}
	return tm, nil
}

// readTurboMeta reads the members of a TurboOCI layer blob into tm, each stored by keep.
func readTurboMeta(r io.Reader, keep func(name string, size int64, body io.Reader) (io.ReaderAt, error), tm *TurboMeta) error {
	br := bufio.NewReader(r)
	var src io.Reader = br
	if magic, _ := br.Peek(2); bytes.Equal(magic, []byte{0x1f, 0x8b}) {
		zr, err := gzip.NewReader(br)
		if err != nil {
			return fmt.Errorf("TurboOCI layer: %w", err)
		}
		src = zr
	}
	tr := tar.NewReader(src)
	marker := false
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("TurboOCI layer: %w", err)
		}
		name := path.Clean(strings.TrimPrefix(hdr.Name, "/"))
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		if hdr.Size > maxTurboMember {
			return fmt.Errorf("TurboOCI layer: %s is %d bytes, more than %d", name, hdr.Size, maxTurboMember)
		}
		switch {
		case name == turboMarker:
			marker = true
		case name == turboGzipIndex:
			if tm.GzipIndex, err = keep(name, hdr.Size, tr); err != nil {
				return fmt.Errorf("TurboOCI layer: %s: %w", name, err)
			}
			tm.GzipIndexSize = hdr.Size
		case strings.HasSuffix(name, turboMetaSuffix) && !strings.Contains(name, "/"):
			fsType := strings.TrimSuffix(name, turboMetaSuffix)
			// Several filesystems' metadata: ext4 is what obd mounts.
			if tm.FSMeta != nil && fsType != "ext4" {
				continue
			}
			if tm.FSMeta, err = keep(name, hdr.Size, tr); err != nil {
				return fmt.Errorf("TurboOCI layer: %s: %w", name, err)
			}
			tm.FSType, tm.FSMetaSize = fsType, hdr.Size
		}
	}
	// Read to the end: a reader that checks the blob's digest does it there.
	if _, err := io.Copy(io.Discard, br); err != nil {
		return fmt.Errorf("TurboOCI layer: %w", err)
	}
	switch {
	case tm.FSMeta == nil:
		return errors.New("TurboOCI layer: no *.fs.meta file")
	case !marker:
		return fmt.Errorf("TurboOCI layer: no %s marker", turboMarker)
	}
	return nil
}

// TargetSize returns the size of the original blob as its gzip index records it; false without an index.
func (tm *TurboMeta) TargetSize() (int64, bool, error) {
	if tm.GzipIndex == nil {
		return 0, false, nil
	}
	h, err := gzindex.ReadHeader(tm.GzipIndex, tm.GzipIndexSize)
	if err != nil {
		return 0, false, err
	}
	return h.GzipFileSize, true, nil
}

// OpenTurboLayer is OpenTurbo for the device path. The layer's "layer file", the space of its trace records
// (observe, if set, sees its reads) and of BlobRange, is the original's uncompressed tar: BlobRange maps a range of
// it to the part of the original blob that holds it (through the gzip index).
func OpenTurboLayer(tm *TurboMeta, target io.ReaderAt, targetSize int64, observe func(off, n int64)) (*Layer, error) {
	l := &Layer{turbo: &turboRanges{size: targetSize}}
	var obs *observed
	f, err := openTurbo(tm, target, targetSize, func(tar io.ReaderAt, ix *gzindex.Index) io.ReaderAt {
		l.turbo.ix = ix
		if observe == nil {
			return tar
		}
		obs = &observed{r: tar, fn: observe}
		return obs
	})
	if err != nil {
		return nil, err
	}
	if obs != nil {
		obs.open.Store(true)
	}
	l.File = f
	return l, nil
}

// turboRanges maps ranges of a TurboOCI layer's original tar to ranges of its blob.
type turboRanges struct {
	ix   *gzindex.Index // nil: the original is the tar itself
	size int64
}

func (t *turboRanges) blobRange(off, n int64) (int64, int64) {
	if t.ix != nil {
		return t.ix.CompressedRange(off, n)
	}
	end := min(off+n, t.size)
	off = max(off, 0)
	return off, max(end-off, 0)
}

// OpenTurbo opens the filesystem metadata of a TurboOCI layer over its original blob target (targetSize bytes):
// remote entries read the original's uncompressed tar, through the gzip index when there is one. Data read through
// the index is checked only by the deflate stream's structure: the caller checks the original blob's digest when
// it has all of it.
func OpenTurbo(tm *TurboMeta, target io.ReaderAt, targetSize int64) (*lsmt.File, error) {
	return openTurbo(tm, target, targetSize, nil)
}

// openTurbo is OpenTurbo; wrap, if set, wraps the reader of the original's tar (and learns its gzip index).
func openTurbo(tm *TurboMeta, target io.ReaderAt, targetSize int64, wrap func(io.ReaderAt, *gzindex.Index) io.ReaderAt) (*lsmt.File, error) {
	if tm.FSType != "ext4" {
		return nil, fmt.Errorf("TurboOCI layer of filesystem %q: obd mounts ext4 ones", tm.FSType)
	}
	meta, size := tm.FSMeta, tm.FSMetaSize
	isZ, err := zfile.IsZFile(meta)
	if err != nil {
		return nil, err
	}
	if isZ {
		z, err := zfile.Open(meta, size, true)
		if err != nil {
			return nil, fmt.Errorf("TurboOCI fs meta: %w", err)
		}
		meta, size = z, z.Size()
	}
	tsize := targetSize
	var ix *gzindex.Index
	if tm.GzipIndex != nil {
		if ix, err = gzindex.Open(tm.GzipIndex, tm.GzipIndexSize, targetSize); err != nil {
			return nil, err
		}
		target, tsize = gzindex.NewReader(ix, target), ix.UncompressedSize
	}
	if wrap != nil {
		target = wrap(target, ix)
	}
	f, err := lsmt.OpenWarp(meta, size, target, tsize)
	if err != nil {
		return nil, fmt.Errorf("TurboOCI fs meta: %w", err)
	}
	return f, nil
}
