package cachesnap

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/atomicfile"
	"github.com/obdproject/obd/internal/image"
)

// WriteFile copies the snapshot file read from r to path, checking its structure on the way (a short or damaged
// answer leaves no file), and returns its data bytes and index. The data's digests are checked where the snapshot
// is read: by import, block by block.
func WriteFile(r io.Reader, path string) (int64, Index, error) {
	var n int64
	var idx Index
	err := atomicfile.Replace(path, 0o644, func(f *os.File) error {
		bw := bufio.NewWriterSize(f, 1<<20)
		var err error
		idx, err = ReadTar(io.TeeReader(r, bw), func(e Entry, d io.Reader) error {
			m, err := copyData(io.Discard, d)
			n += m
			if err == nil && m != e.Data.Size {
				err = fmt.Errorf("cache snapshot: data of blob %s: %d of %d bytes", e.Digest, m, e.Data.Size)
			}
			return err
		})
		if err != nil {
			return err
		}
		// The tar's end: its two zero blocks and padding.
		if _, err := io.Copy(bw, r); err != nil {
			return err
		}
		return bw.Flush()
	})
	return n, idx, err
}

// WriteArtifact writes the snapshot file read from r to sink as an artifact tagged tag, and returns its data bytes
// and index.
func WriteArtifact(ctx context.Context, r io.Reader, sink image.Sink, tag string) (int64, Index, error) {
	dir, err := os.MkdirTemp("", "obd-cache-snapshot-")
	if err != nil {
		return 0, Index{}, err
	}
	defer os.RemoveAll(dir)
	var n int64
	idx, err := ReadTar(r, func(e Entry, d io.Reader) error {
		f, err := os.Create(filepath.Join(dir, e.Data.Digest.Encoded()))
		if err != nil {
			return err
		}
		vr, check := Verified(e, d)
		m, err := copyData(f, vr)
		n += m
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
		return check()
	})
	if err != nil {
		return n, idx, err
	}
	manifest, config, err := Artifact(idx)
	if err != nil {
		return n, idx, err
	}
	img := &image.Image{Manifest: manifest, Config: config,
		ManifestDesc: ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(manifest),
			Size: int64(len(manifest)), ArtifactType: MediaTypeIndex},
		ConfigDesc: ocispec.Descriptor{MediaType: MediaTypeIndex, Digest: digest.FromBytes(config), Size: int64(len(config))}}
	for _, e := range idx.Blobs {
		img.Layers = append(img.Layers, image.Blob{Desc: e.Data, Path: filepath.Join(dir, e.Data.Digest.Encoded())})
	}
	return n, idx, sink.PutImage(ctx, img, tag, false)
}

// OpenArtifact returns the snapshot file of the snapshot artifact whose manifest is manifest, its blobs opened with
// open; done is called when the stream ends or cannot be made.
func OpenArtifact(manifest []byte, open func(ocispec.Descriptor) (io.ReadCloser, error), done func()) (io.ReadCloser, error) {
	idx, m, err := artifactIndex(manifest, open)
	if err != nil {
		done()
		return nil, err
	}
	pr, pw := io.Pipe()
	go func() {
		defer done()
		pw.CloseWithError(WriteTar(pw, idx, func(e Entry) (io.ReadCloser, error) {
			for _, l := range m.Layers {
				if l.Digest == e.Data.Digest {
					return open(l)
				}
			}
			return nil, fmt.Errorf("cache snapshot artifact: no layer for the data of blob %s", e.Digest)
		}))
	}()
	return pr, nil
}

// artifactIndex checks a snapshot artifact's manifest, reads its index and checks that the two agree.
func artifactIndex(manifest []byte, open func(ocispec.Descriptor) (io.ReadCloser, error)) (Index, ocispec.Manifest, error) {
	m, err := ParseArtifact(manifest)
	if err != nil {
		return Index{}, m, err
	}
	rc, err := open(m.Config)
	if err != nil {
		return Index{}, m, err
	}
	config, err := io.ReadAll(io.LimitReader(rc, maxIndex+1))
	rc.Close()
	if err != nil {
		return Index{}, m, err
	}
	if digest.FromBytes(config) != m.Config.Digest {
		return Index{}, m, errors.New("cache snapshot artifact: the index does not match its digest")
	}
	idx, err := ParseIndex(config)
	if err != nil {
		return idx, m, err
	}
	return idx, m, CheckArtifact(m, idx)
}
