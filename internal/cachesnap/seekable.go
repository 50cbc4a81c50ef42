package cachesnap

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"math"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/iocount"
	"github.com/obdproject/obd/trace"
)

// ExportFunc exports the data of one blob of a snapshot: it calls begin with the data's size before it writes the
// data to the writer begin returns, and returns the blob's description and the data's digest. A blob without
// cached blocks does not call begin and writes nothing.
type ExportFunc func(begin func(size int64) (io.Writer, error)) (cache.ExportedBlob, digest.Digest, error)

// FileWriter is where WriteSeekable writes: in order, and back into what it wrote.
type FileWriter interface {
	io.Writer
	io.WriterAt
}

// WriteSeekable writes a snapshot file to f in one pass over the data, for exports that learn a blob's CRCs and
// data digest only as they write its data: the index member gets room for maxBlocks[k] blocks of each blob k
// first, each data member is written as export(k) gives it (its header named once its digest is known), and the
// index goes into its room at the end, padded with spaces (which JSON allows). It returns the index and the data
// bytes; ErrEmpty when no block was exported.
func WriteSeekable(f FileWriter, maxBlocks []int, starts []trace.Start, export func(k int) ExportFunc) (Index, int64, error) {
	idx := Index{MediaType: MediaTypeIndex, Starts: starts}
	room, err := indexRoom(maxBlocks, starts)
	if err != nil {
		return idx, 0, err
	}
	w := &iocount.Writer{W: f}
	ih, err := headerBytes(indexName, room)
	if err != nil {
		return idx, 0, err
	}
	if _, err := w.Write(ih); err != nil {
		return idx, 0, err
	}
	indexAt := w.N
	if _, err := io.Copy(w, io.LimitReader(spaces{}, room)); err != nil {
		return idx, 0, err
	}
	if err := pad(w); err != nil {
		return idx, 0, err
	}
	placeholder := digest.NewDigestFromEncoded(digest.SHA256, strings.Repeat("0", 64))
	var dataBytes int64
	for k := range maxBlocks {
		hdrAt, size := int64(-1), int64(0)
		var h []byte
		e, dg, err := export(k)(func(n int64) (io.Writer, error) {
			var herr error
			if h, herr = headerBytes(dataName(placeholder), n); herr != nil {
				return nil, herr
			}
			hdrAt, size = w.N, n
			_, herr = w.Write(h)
			return w, herr
		})
		if err != nil {
			return idx, 0, err
		}
		if hdrAt < 0 {
			continue
		}
		if got := w.N - hdrAt - int64(len(h)); got != size || len(e.Blocks) > maxBlocks[k] {
			return idx, 0, fmt.Errorf("cache snapshot: blob %s: %d bytes in %d blocks written for %d bytes in at most %d blocks",
				e.Digest, got, len(e.Blocks), size, maxBlocks[k])
		}
		if err := pad(w); err != nil {
			return idx, 0, err
		}
		named, err := headerBytes(dataName(dg), size)
		if err != nil {
			return idx, 0, err
		}
		if len(named) != len(h) {
			return idx, 0, fmt.Errorf("cache snapshot: internal error: headers of %d and %d bytes", len(named), len(h))
		}
		if _, err := f.WriteAt(named, hdrAt); err != nil {
			return idx, 0, err
		}
		idx.Blobs = append(idx.Blobs, Entry{ExportedBlob: e, Data: ocispec.Descriptor{MediaType: MediaTypeBlocks, Digest: dg, Size: size}})
		dataBytes += size
	}
	if len(idx.Blobs) == 0 {
		return idx, 0, ErrEmpty
	}
	if _, err := w.Write(make([]byte, 2*512)); err != nil { // the tar's end
		return idx, 0, err
	}
	ib, err := idx.Marshal()
	if err != nil {
		return idx, 0, err
	}
	if int64(len(ib)) > room {
		return idx, 0, fmt.Errorf("cache snapshot: internal error: index of %d bytes for %d of room", len(ib), room)
	}
	if _, err := f.WriteAt(ib, indexAt); err != nil {
		return idx, 0, err
	}
	return idx, dataBytes, nil
}

// indexRoom bounds the size of an index with maxBlocks[k] blocks of blob k and the starts: an entry's JSON with one
// block of the largest numbers, and for each further block its index and CRC with their commas.
func indexRoom(maxBlocks []int, starts []trace.Start) (int64, error) {
	d := digest.NewDigestFromEncoded(digest.SHA256, strings.Repeat("f", 64))
	worst := Entry{ExportedBlob: cache.ExportedBlob{Digest: d, Size: math.MaxInt64, BlockSize: math.MaxInt64,
		Blocks: []int64{math.MaxInt64}, CRCs: []uint32{math.MaxUint32}},
		Data: ocispec.Descriptor{MediaType: MediaTypeBlocks, Digest: d, Size: math.MaxInt64}}
	idx := Index{Blobs: make([]Entry, len(maxBlocks)), Starts: starts}
	var more int64
	for k, n := range maxBlocks {
		idx.Blobs[k] = worst
		more += int64(max(n-1, 0)) * int64(len(",9223372036854775807,4294967295"))
	}
	b, err := idx.Marshal()
	room := int64(len(b)) + more
	if err == nil && room > maxIndex {
		err = fmt.Errorf("cache snapshot: the index of %d blobs could take %d bytes, more than %d", len(maxBlocks), room, maxIndex)
	}
	return room, err
}

// headerBytes returns a member's tar header.
func headerBytes(name string, size int64) ([]byte, error) {
	var b bytes.Buffer
	if err := tar.NewWriter(&b).WriteHeader(hdr(name, size)); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// pad ends a tar member: zeros up to the next 512-byte block.
func pad(w *iocount.Writer) error {
	_, err := w.Write(make([]byte, (512-w.N%512)%512))
	return err
}

// spaces reads as an endless run of spaces.
type spaces struct{}

func (spaces) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = ' '
	}
	return len(p), nil
}
