package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"path"
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
	// maxTurboMember bounds what is read of one file of a TurboOCI layer blob into memory.
	maxTurboMember = 1 << 30
)

// TurboMeta is the content of a TurboOCI layer blob.
type TurboMeta struct {
	FSType    string // filesystem of the metadata: "ext4" or "erofs"
	FSMeta    []byte // the warp layer file (ZFile or LSMT)
	GzipIndex []byte // nil when the original layer is an uncompressed tar
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

// ReadTurboMeta reads a TurboOCI layer blob (tar.gz, or tar).
func ReadTurboMeta(r io.Reader) (*TurboMeta, error) {
	br := bufio.NewReader(r)
	var src io.Reader = br
	if magic, _ := br.Peek(2); bytes.Equal(magic, []byte{0x1f, 0x8b}) {
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, fmt.Errorf("TurboOCI layer: %w", err)
		}
		src = zr
	}
	tr := tar.NewReader(src)
	tm := &TurboMeta{}
	marker := false
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("TurboOCI layer: %w", err)
		}
		name := path.Clean(strings.TrimPrefix(hdr.Name, "/"))
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		var dst *[]byte
		switch {
		case name == turboMarker:
			marker = true
			continue
		case name == turboGzipIndex:
			dst = &tm.GzipIndex
		case strings.HasSuffix(name, turboMetaSuffix) && !strings.Contains(name, "/"):
			fs := strings.TrimSuffix(name, turboMetaSuffix)
			// Several filesystems' metadata: ext4 is what obd mounts.
			if tm.FSMeta != nil && fs != "ext4" {
				continue
			}
			tm.FSType, dst = fs, &tm.FSMeta
		default:
			continue
		}
		if hdr.Size > maxTurboMember {
			return nil, fmt.Errorf("TurboOCI layer: %s is %d bytes, more than %d", name, hdr.Size, maxTurboMember)
		}
		b := make([]byte, hdr.Size)
		if _, err := io.ReadFull(tr, b); err != nil {
			return nil, fmt.Errorf("TurboOCI layer: %s: %w", name, err)
		}
		*dst = b
	}
	switch {
	case tm.FSMeta == nil:
		return nil, errors.New("TurboOCI layer: no *.fs.meta file")
	case !marker:
		return nil, fmt.Errorf("TurboOCI layer: no %s marker", turboMarker)
	}
	return tm, nil
}

// TargetSize returns the size of the original blob as its gzip index records it; false without an index.
func (tm *TurboMeta) TargetSize() (int64, bool, error) {
	if tm.GzipIndex == nil {
		return 0, false, nil
	}
	h, err := gzindex.ReadHeader(bytes.NewReader(tm.GzipIndex), int64(len(tm.GzipIndex)))
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
	var meta io.ReaderAt = bytes.NewReader(tm.FSMeta)
	size := int64(len(tm.FSMeta))
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
		if ix, err = gzindex.Open(bytes.NewReader(tm.GzipIndex), int64(len(tm.GzipIndex)), targetSize); err != nil {
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
