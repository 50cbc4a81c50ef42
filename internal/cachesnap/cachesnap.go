// Package cachesnap is the format of a node cache snapshot: the cached blocks of some blobs, taken from one node's
// block cache and loaded into another's (obd cache export / import).
//
// A snapshot is an index (JSON, media type MediaTypeIndex) and one data blob per cached blob (MediaTypeBlocks): the
// blob's cached blocks, in the order the index lists them. As a file it is a tar of index.json followed by the data
// blobs as blobs/sha256/<hex>; in a registry or an OCI layout it is an artifact whose config is the index and whose
// layers are the data blobs, so snapshots of images that share layers share those data blobs.
package cachesnap

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/trace"
)

// Media types and names of a snapshot.
const (
	MediaTypeIndex  = "application/vnd.obdproject.cache.snapshot.v1+json"
	MediaTypeBlocks = "application/vnd.obdproject.cache.blocks.v1"
	// AnnotationBlob names, on a data layer of a snapshot artifact, the blob whose blocks it holds.
	AnnotationBlob = "org.obdproject.cache.blob"
	indexName      = "index.json"
	// maxIndex bounds the index read from outside.
	maxIndex = 64 << 20
)

// Index lists the blobs of a snapshot.
type Index struct {
	MediaType string  `json:"mediaType"`
	Blobs     []Entry `json:"blobs"`
	// Starts are the starts the exporting node learned of images whose layers the snapshot holds: a node that
	// imports it decodes their blocks ahead of its first start as it would of its own.
	Starts []trace.Start `json:"starts,omitempty"`
}

// Blocks counts the blocks of every blob of the snapshot.
func (idx Index) Blocks() int {
	n := 0
	for _, e := range idx.Blobs {
		n += len(e.Blocks)
	}
	return n
}

// Entry is one blob of a snapshot: which of its blocks the data holds, and the data blob's descriptor.
type Entry struct {
	cache.ExportedBlob
	Data ocispec.Descriptor `json:"data"`
}

// ParseIndex parses and checks a snapshot index.
func ParseIndex(b []byte) (Index, error) {
	var idx Index
	if len(b) > maxIndex {
		return idx, fmt.Errorf("cache snapshot: index of %d bytes exceeds %d", len(b), maxIndex)
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return idx, fmt.Errorf("cache snapshot: index: %w", err)
	}
	if idx.MediaType != MediaTypeIndex {
		return idx, fmt.Errorf("cache snapshot: index media type %q, want %q", idx.MediaType, MediaTypeIndex)
	}
	seen := map[digest.Digest]bool{}
	for _, e := range idx.Blobs {
		if err := e.Validate(); err != nil {
			return idx, err
		}
		if seen[e.Digest] {
			return idx, fmt.Errorf("cache snapshot: blob %s listed twice", e.Digest)
		}
		seen[e.Digest] = true
		if err := e.Data.Digest.Validate(); err != nil || e.Data.Size != e.DataSize() || e.Data.MediaType != MediaTypeBlocks {
			return idx, fmt.Errorf("cache snapshot: blob %s: data %s of %d bytes (%s), want %d bytes of %s", e.Digest, e.Data.Digest,
				e.Data.Size, e.Data.MediaType, e.DataSize(), MediaTypeBlocks)
		}
	}
	for i, st := range idx.Starts {
		if _, err := st.Records(); err != nil {
			return idx, fmt.Errorf("cache snapshot: start %d: %w", i, err)
		}
	}
	return idx, nil
}

// Marshal returns the index's JSON.
func (idx Index) Marshal() ([]byte, error) {
	idx.MediaType = MediaTypeIndex
	return json.Marshal(idx)
}

// WriteTar writes a snapshot file: the index, then each entry's data read from open.
func WriteTar(w io.Writer, idx Index, open func(Entry) (io.ReadCloser, error)) error {
	ib, err := idx.Marshal()
	if err != nil {
		return err
	}
	tw := tar.NewWriter(w)
	if err := tw.WriteHeader(hdr(indexName, int64(len(ib)))); err != nil {
		return err
	}
	if _, err := tw.Write(ib); err != nil {
		return err
	}
	for _, e := range idx.Blobs {
		if err := tw.WriteHeader(hdr(dataName(e.Data.Digest), e.Data.Size)); err != nil {
			return err
		}
		rc, err := open(e)
		if err != nil {
			return err
		}
		_, err = copyData(tw, rc)
		rc.Close()
		if err != nil {
			return fmt.Errorf("cache snapshot: data of blob %s: %w", e.Digest, err)
		}
	}
	return tw.Close()
}

// copyData copies src to dst in reads and writes of 1 MiB: the default 8–32 KiB cost a system call each, which
// halved the throughput of a snapshot through the daemon's socket.
func copyData(dst io.Writer, src io.Reader) (int64, error) {
	// The structs hide ReadFrom and WriteTo, which would pick their own small buffers.
	return io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, make([]byte, 1<<20))
}

// hdr is the tar header of a member of a snapshot file.
func hdr(name string, size int64) *tar.Header {
	return &tar.Header{Name: name, Mode: 0o644, Size: size, Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
}

func dataName(d digest.Digest) string { return "blobs/" + d.Algorithm().String() + "/" + d.Encoded() }

// ReadTar reads a snapshot file: its index, then each entry's data, which it hands to load in index order (load
// must read all of it; Verified checks it against its digest). It returns the index.
func ReadTar(r io.Reader, load func(Entry, io.Reader) error) (Index, error) {
	tr := tar.NewReader(r)
	h, err := tr.Next()
	if err != nil {
		return Index{}, fmt.Errorf("cache snapshot: %w", err)
	}
	if h.Name != indexName {
		return Index{}, fmt.Errorf("cache snapshot: first member %q, want %s", h.Name, indexName)
	}
	ib, err := io.ReadAll(io.LimitReader(tr, maxIndex+1))
	if err != nil {
		return Index{}, fmt.Errorf("cache snapshot: %w", err)
	}
	idx, err := ParseIndex(ib)
	if err != nil {
		return idx, err
	}
	for _, e := range idx.Blobs {
		h, err := tr.Next()
		if err != nil {
			return idx, fmt.Errorf("cache snapshot: data of blob %s: %w", e.Digest, err)
		}
		if h.Name != dataName(e.Data.Digest) || h.Size != e.Data.Size {
			return idx, fmt.Errorf("cache snapshot: member %q (%d bytes) where the data of blob %s belongs", h.Name, h.Size, e.Digest)
		}
		if err := load(e, tr); err != nil {
			return idx, err
		}
	}
	return idx, nil
}

// ErrDataDigest means the data of a blob in a snapshot does not match its digest: some of its blocks are damaged.
var ErrDataDigest = errors.New("cache snapshot: data does not match its digest")

// Verified returns a reader of e's data from r and a check, to call once the data is read, that it was all read
// and matches its digest (an error wrapping ErrDataDigest).
func Verified(e Entry, r io.Reader) (io.Reader, func() error) {
	v := e.Data.Digest.Verifier()
	lr := &io.LimitedReader{R: io.TeeReader(r, v), N: e.Data.Size}
	return lr, func() error {
		if lr.N != 0 {
			return fmt.Errorf("cache snapshot: data of blob %s: %d bytes left unread", e.Digest, lr.N)
		}
		if !v.Verified() {
			return fmt.Errorf("%w: blob %s, data %s", ErrDataDigest, e.Digest, e.Data.Digest)
		}
		return nil
	}
}

// ErrEmpty means a snapshot would hold no block.
var ErrEmpty = errors.New("cache snapshot: no cached block to export")

// Artifact returns the manifest and config of a snapshot artifact for idx.
func Artifact(idx Index) (manifest, config []byte, err error) {
	config, err = idx.Marshal()
	if err != nil {
		return nil, nil, err
	}
	m := ocispec.Manifest{
		MediaType:    ocispec.MediaTypeImageManifest,
		ArtifactType: MediaTypeIndex,
		Config:       ocispec.Descriptor{MediaType: MediaTypeIndex, Digest: digest.FromBytes(config), Size: int64(len(config))},
	}
	m.SchemaVersion = 2
	for _, e := range idx.Blobs {
		d := e.Data
		d.Annotations = map[string]string{AnnotationBlob: e.Digest.String()}
		m.Layers = append(m.Layers, d)
	}
	if len(m.Layers) == 0 {
		return nil, nil, ErrEmpty
	}
	manifest, err = json.Marshal(m)
	return manifest, config, err
}

// ParseArtifact parses a snapshot artifact's manifest and checks that it is one; once the caller has fetched and
// parsed its config (the index), CheckArtifact ties the two together.
func ParseArtifact(b []byte) (ocispec.Manifest, error) {
	var m ocispec.Manifest
	if err := json.NewDecoder(bytes.NewReader(b)).Decode(&m); err != nil {
		return m, fmt.Errorf("cache snapshot artifact: %w", err)
	}
	if m.ArtifactType != MediaTypeIndex || m.Config.MediaType != MediaTypeIndex {
		return m, fmt.Errorf("cache snapshot artifact: artifact type %q, config %q: not an obd cache snapshot", m.ArtifactType, m.Config.MediaType)
	}
	return m, nil
}

// CheckArtifact checks that the layers of a snapshot artifact are the data blobs its index lists, in order.
func CheckArtifact(m ocispec.Manifest, idx Index) error {
	if len(m.Layers) != len(idx.Blobs) {
		return fmt.Errorf("cache snapshot artifact: %d layers for %d blobs", len(m.Layers), len(idx.Blobs))
	}
	for i, l := range m.Layers {
		if l.Digest != idx.Blobs[i].Data.Digest || l.Size != idx.Blobs[i].Data.Size {
			return fmt.Errorf("cache snapshot artifact: layer %d is %s, the index says %s", i, l.Digest, idx.Blobs[i].Data.Digest)
		}
	}
	return nil
}
