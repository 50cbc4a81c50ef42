package convert

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/klauspost/compress/gzip"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	gzbuild "github.com/obdproject/obd/gzindex/build"
	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/iocount"
	"github.com/obdproject/obd/lsmt"
)

// turboTarget is what a TurboOCI layer's conversion keeps of its original layer: the blob (its data stays there)
// and its gzip index.
type turboTarget struct {
	blob  Blob   // the original layer blob, a copy in the work directory
	index []byte // gzip.meta; nil for an uncompressed tar
}

// applyTurbo applies layer i as a TurboOCI layer: the original blob is read once, decompressed and indexed (gzip),
// and its tar applied to fsys with every regular file's blocks mapped into the tar (rw.MapTarget) instead of
// written. The blob is kept in the work directory: the image references it.
func (c *converter) applyTurbo(ctx context.Context, fsys *ext4.FS, rw *lsmt.RW, i int, diffID digest.Digest) (int64, *turboTarget, error) {
	m, _ := c.src.Manifest()
	desc := m.Layers[i]
	rc, err := c.src.OpenLayer(ctx, i)
	if err != nil {
		return 0, nil, err
	}
	defer rc.Close()
	keep, err := c.openFile(fmt.Sprintf("layer%03d.target", i))
	if err != nil {
		return 0, nil, err
	}
	kept := bufio.NewWriterSize(keep, 1<<20)
	br := bufio.NewReaderSize(io.TeeReader(rc, kept), 1<<20)
	magic, err := br.Peek(4)
	if err != nil && err != io.EOF {
		return 0, nil, fmt.Errorf("read layer: %w", err)
	}
	var stream io.Reader = br
	var builder *gzbuild.Builder
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		if builder, err = gzbuild.New(br, 0); err != nil {
			return 0, nil, err
		}
		defer builder.Close()
		stream = builder
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return 0, nil, errors.New("a zstd layer cannot be a TurboOCI target (gzip or uncompressed tar only): convert without --turbo")
	}
	h := sha256.New()
	counted := &iocount.Writer{W: h}
	// Inflating and indexing run ahead in their own goroutine; the tar's digest is taken on this side, which only
	// reads headers and writes metadata.
	ahead := newReadAhead(stream, 1<<20, 4)
	hashed := io.TeeReader(ahead, counted)
	_, err = Apply(ctx, fsys, hashed, ApplyOptions{MapData: rw.MapTarget})
	if err == nil {
		_, err = io.Copy(io.Discard, hashed)
	}
	ahead.Close()
	if err == nil {
		// The original blob's digest is checked at its end: read whatever follows the stream.
		_, err = io.Copy(io.Discard, br)
	}
	if err == nil {
		err = kept.Flush()
	}
	if err != nil {
		return 0, nil, err
	}
	if got := digest.NewDigest(digest.SHA256, h); got != diffID {
		return counted.N, nil, fmt.Errorf("uncompressed content has digest %s, but the config's diff_id is %s", got, diffID)
	}
	t := &turboTarget{blob: Blob{Desc: ocispec.Descriptor{MediaType: desc.MediaType, Digest: desc.Digest, Size: desc.Size}, Path: keep.Name()}}
	if st, err := keep.Stat(); err != nil || st.Size() != desc.Size {
		return 0, nil, fmt.Errorf("layer blob: kept %d bytes of %d (%v)", st.Size(), desc.Size, err)
	}
	if builder != nil {
		if t.index, err = builder.Index(); err != nil {
			return 0, nil, err
		}
	}
	return counted.N, t, nil
}

// TurboOCI layer layout (upstream's turboOCIv1.tar.gz): the committed warp layer, compressed, as <fs>.fs.meta, an
// empty marker file, and the gzip index of a gzip'd original.
const (
	turboFSMeta     = "ext4.fs.meta"
	turboIdentifier = ".turbo.ociv1"
	turboGzipIndex  = "gzip.meta"
)

// packTurbo commits a frozen warp layer into a ZFile and archives it with its marker and gzip index into the
// layer's tar.gz blob.
func (c *converter) packTurbo(l frozen) (Blob, error) {
	start := time.Now()
	meta, err := c.openFile(l.name + ".fsmeta")
	if err != nil {
		return Blob{}, err
	}
	committed, err := lsmt.NewCommitReader(l.rw, lsmt.CommitOptions{UUID: l.uuid, ParentUUID: l.parentUUID, Warp: true})
	if err != nil {
		return Blob{}, fmt.Errorf("commit: %w", err)
	}
	zsize, err := WriteLayer(meta, committed, true, false, c.opts.ZFile)
	if err != nil {
		return Blob{}, fmt.Errorf("commit and compress: %w", err)
	}
	c.stage(Progress{Layer: l.i, Layers: l.n, Stage: "compress", Bytes: zsize}, start)

	start = time.Now()
	out, err := c.openFile(l.name + ".blob")
	if err != nil {
		return Blob{}, err
	}
	blobHash, diffHash := sha256.New(), sha256.New()
	counted := &iocount.Writer{W: io.MultiWriter(out, blobHash)}
	zw := gzip.NewWriter(counted)
	tw := tar.NewWriter(io.MultiWriter(zw, diffHash))
	files := []struct {
		name string
		r    io.Reader
		size int64
	}{
		{turboFSMeta, io.NewSectionReader(meta, 0, zsize), zsize},
		{turboIdentifier, bytes.NewReader(nil), 0},
	}
	if l.turbo.index != nil {
		files = append(files, struct {
			name string
			r    io.Reader
			size int64
		}{turboGzipIndex, bytes.NewReader(l.turbo.index), int64(len(l.turbo.index))})
	}
	for _, f := range files {
		// As upstream's builder: name, mode, size and type only (no times, owners).
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Mode: 0o644, Size: f.size, Typeflag: tar.TypeReg}); err != nil {
			return Blob{}, err
		}
		if _, err := io.Copy(tw, f.r); err != nil {
			return Blob{}, fmt.Errorf("layer archive: %w", err)
		}
	}
	if err := tw.Close(); err != nil {
		return Blob{}, err
	}
	if err := zw.Close(); err != nil {
		return Blob{}, err
	}
	mt := ocispec.MediaTypeImageLayerGzip
	if !c.opts.OCI {
		mt = image.MediaTypeDockerLayerGzip
	}
	d := digest.NewDigest(digest.SHA256, blobHash)
	target := l.turbo.blob.Desc
	blob := Blob{
		Desc: ocispec.Descriptor{MediaType: mt, Digest: d, Size: counted.N, Annotations: map[string]string{
			image.AnnotationVersion:          image.TurboVersion,
			image.AnnotationBlobDigest:       d.String(),
			image.AnnotationBlobSize:         strconv.FormatInt(counted.N, 10),
			image.AnnotationTurboTarget:      target.Digest.String(),
			image.AnnotationTurboTargetMedia: turboTargetMediaType(target.MediaType, l.turbo.index != nil),
		}},
		Path:   out.Name(),
		DiffID: digest.NewDigest(digest.SHA256, diffHash),
	}
	os.Remove(meta.Name())
	c.stage(Progress{Layer: l.i, Layers: l.n, Stage: "done", Bytes: counted.N, Digest: d}, start)
	return blob, nil
}

// turboTargetMediaType is the target-media-type annotation upstream writes: the original's kind (Docker or OCI)
// and compression.
func turboTargetMediaType(mt string, gzipped bool) string {
	docker := mt == image.MediaTypeDockerLayer || mt == image.MediaTypeDockerLayerGzip
	switch {
	case docker && gzipped:
		return image.MediaTypeDockerLayerGzip
	case docker:
		return image.MediaTypeDockerLayer
	case gzipped:
		return ocispec.MediaTypeImageLayerGzip
	}
	return ocispec.MediaTypeImageLayer
}
