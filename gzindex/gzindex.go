// Package gzindex reads and writes the gzip index of TurboOCI images (upstream overlaybd's `gzip.meta`, magic
// "ddgzidx"), byte-compatible with upstream, and reads a gzip blob at any offset of its uncompressed data through it.
//
// The index holds checkpoints of the deflate stream: at a deflate block boundary, the uncompressed offset, the
// compressed offset and bit, and the 32 KiB of output before it (the window a resumed inflate needs). Upstream
// places one checkpoint at the last block boundary at or before each multiple of the span (1 MiB), so a read
// decompresses at most about one span plus a block. See docs/format.md ("gzip index") for the byte layout.
//
// Open parses an index and checks every field against the blob it indexes; Reader reads the blob at random offsets
// with this package's own inflater (pure Go: the node daemon links no cgo), which can resume inside a byte while
// keeping the blob's byte alignment, as stored blocks need; Go's compress/flate cannot. Package gzindex/build writes
// indexes (with zlib, like upstream, so the bytes are the same).
package gzindex

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sort"
)

// Format constants of upstream's index (gzfile_index.h).
const (
	Magic       = "ddgzidx"
	HeaderSize  = 333     // packed IndexFileHeader
	EntrySize   = 29      // packed IndexEntry
	WindowSize  = 32768   // deflate's window: the dictionary stored with each checkpoint
	DefaultSpan = 1 << 20 // upstream's span between checkpoints
	MinSpan     = 65536   // upstream refuses smaller spans
	crcOffset   = HeaderSize - 4

	algoNone = 0
	// AlgoZlib is the window and entry compression upstream writes: each one zlib stream.
	AlgoZlib = 1
	// maxEntries bounds an index read from outside: a checkpoint per 64 KiB of a 1 TiB stream.
	maxEntries = 1 << 24
)

// Header is the fixed header of an index file.
type Header struct {
	Major, Minor     uint8
	DictAlgo         uint8 // 0: windows and entries stored raw; 1: each zlib-compressed
	DictLevel        int8  // zlib level used to compress them
	Flag             uint8
	Span             int32 // uncompressed bytes between checkpoints
	Window           int32 // always WindowSize
	IndexSize        int32 // bytes per entry: always EntrySize
	IndexNum         int64 // entries
	GzipFileSize     int64 // size of the gzip blob indexed
	IndexFileSize    int64 // size of this file
	UncompressedSize int64 // size of the uncompressed stream
	IndexStart       int64 // offset of the (compressed) entry array; windows lie between the header and here
	IndexAreaLen     int64 // its length
	CRC              uint32
}

// Entry is one checkpoint.
type Entry struct {
	Out    int64  // de_pos: offset in the uncompressed stream
	In     int64  // en_pos: offset of the first whole byte of the block in the gzip blob
	WinPos int64  // offset of the stored window in the index file
	Bits   uint8  // bits of the byte before In that belong to the block (0–7)
	WinLen uint32 // length of the stored window
}

// Index is a parsed index file.
type Index struct {
	Header
	Entries []Entry
	r       io.ReaderAt // the index file, for the windows
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32c is photon's crc32c: CRC-32C without the initial and final inversion.
func crc32c(p []byte) uint32 { return ^crc32.Update(^uint32(0), castagnoli, p) }

// Marshal returns the header's bytes, with its CRC (which it sets).
func (h *Header) Marshal() []byte {
	b := make([]byte, HeaderSize)
	copy(b, Magic)
	b[8], b[9], b[10], b[11], b[12] = h.Major, h.Minor, h.DictAlgo, byte(h.DictLevel), h.Flag
	le := binary.LittleEndian
	le.PutUint32(b[13:], uint32(h.Span))
	le.PutUint32(b[17:], uint32(h.Window))
	le.PutUint32(b[21:], uint32(h.IndexSize))
	le.PutUint64(b[25:], uint64(h.IndexNum))
	le.PutUint64(b[33:], uint64(h.GzipFileSize))
	le.PutUint64(b[41:], uint64(h.IndexFileSize))
	le.PutUint64(b[49:], uint64(h.UncompressedSize))
	// 256 reserved bytes at 57.
	le.PutUint64(b[313:], uint64(h.IndexStart))
	le.PutUint64(b[321:], uint64(h.IndexAreaLen))
	h.CRC = crc32c(b[:crcOffset])
	le.PutUint32(b[crcOffset:], h.CRC)
	return b
}

func parseHeader(b []byte) Header {
	le := binary.LittleEndian
	return Header{
		Major: b[8], Minor: b[9], DictAlgo: b[10], DictLevel: int8(b[11]), Flag: b[12],
		Span: int32(le.Uint32(b[13:])), Window: int32(le.Uint32(b[17:])), IndexSize: int32(le.Uint32(b[21:])),
		IndexNum: int64(le.Uint64(b[25:])), GzipFileSize: int64(le.Uint64(b[33:])),
		IndexFileSize: int64(le.Uint64(b[41:])), UncompressedSize: int64(le.Uint64(b[49:])),
		IndexStart: int64(le.Uint64(b[313:])), IndexAreaLen: int64(le.Uint64(b[321:])),
		CRC: le.Uint32(b[crcOffset:]),
	}
}

// MarshalEntries returns the entries' bytes, uncompressed.
func MarshalEntries(es []Entry) []byte {
	b := make([]byte, len(es)*EntrySize)
	le := binary.LittleEndian
	for i, e := range es {
		p := b[i*EntrySize:]
		le.PutUint64(p, uint64(e.Out))
		le.PutUint64(p[8:], uint64(e.In))
		le.PutUint64(p[16:], uint64(e.WinPos))
		p[24] = e.Bits
		le.PutUint32(p[25:], e.WinLen)
	}
	return b
}

// ReadHeader reads and checks the header of the index file r of size bytes (see Open): for the size of the gzip
// blob it indexes before the blob is opened.
func ReadHeader(r io.ReaderAt, size int64) (Header, error) {
	if size < HeaderSize {
		return Header{}, fmt.Errorf("gzip index: %d bytes, shorter than its %d-byte header", size, HeaderSize)
	}
	b := make([]byte, HeaderSize)
	if _, err := r.ReadAt(b, 0); err != nil {
		return Header{}, fmt.Errorf("gzip index: reading the header: %w", err)
	}
	if string(b[:len(Magic)]) != Magic || b[7] != 0 {
		return Header{}, fmt.Errorf("gzip index: bad magic %q", b[:8])
	}
	h := parseHeader(b)
	switch {
	case crc32c(b[:crcOffset]) != h.CRC:
		return h, errors.New("gzip index: header CRC mismatch")
	case h.Major != 1:
		return h, fmt.Errorf("gzip index: version %d.%d, only 1.x is known", h.Major, h.Minor)
	case h.IndexSize != EntrySize:
		return h, fmt.Errorf("gzip index: entries of %d bytes, want %d", h.IndexSize, EntrySize)
	case h.Window != WindowSize:
		return h, fmt.Errorf("gzip index: window of %d bytes, want %d", h.Window, WindowSize)
	case h.DictAlgo != algoNone && h.DictAlgo != AlgoZlib:
		return h, fmt.Errorf("gzip index: unknown window compression %d", h.DictAlgo)
	case h.IndexFileSize != size:
		return h, fmt.Errorf("gzip index: header says %d bytes, the file has %d", h.IndexFileSize, size)
	case h.IndexStart < HeaderSize || h.IndexAreaLen < 0 || h.IndexStart > size || h.IndexAreaLen != size-h.IndexStart:
		return h, fmt.Errorf("gzip index: entry area %d+%d does not end the %d-byte file", h.IndexStart, h.IndexAreaLen, size)
	case h.IndexNum < 1 || h.IndexNum > maxEntries:
		return h, fmt.Errorf("gzip index: %d entries", h.IndexNum)
	case h.UncompressedSize < 0 || h.GzipFileSize < 0:
		return h, fmt.Errorf("gzip index: sizes %d (uncompressed), %d (gzip)", h.UncompressedSize, h.GzipFileSize)
	}
	return h, nil
}

// Open parses the index file r of size bytes and checks it against the gzip blob it indexes, of gzipSize bytes:
// header CRC, sizes, and every entry (in order, inside the blob, the uncompressed stream and the file).
func Open(r io.ReaderAt, size, gzipSize int64) (*Index, error) {
	h, err := ReadHeader(r, size)
	if err != nil {
		return nil, err
	}
	if h.GzipFileSize != gzipSize {
		return nil, fmt.Errorf("gzip index: indexes a %d-byte gzip blob, this one has %d bytes", h.GzipFileSize, gzipSize)
	}
	area := make([]byte, h.IndexAreaLen)
	if _, err := r.ReadAt(area, h.IndexStart); err != nil {
		return nil, fmt.Errorf("gzip index: reading the entries: %w", err)
	}
	raw := area
	want := h.IndexNum * EntrySize
	if h.DictAlgo == AlgoZlib {
		var err error
		if raw, err = inflateZlib(area, want); err != nil {
			return nil, fmt.Errorf("gzip index: entries: %w", err)
		}
	}
	if int64(len(raw)) != want {
		return nil, fmt.Errorf("gzip index: entry area holds %d bytes, %d entries need %d", len(raw), h.IndexNum, want)
	}
	ix := &Index{Header: h, Entries: make([]Entry, h.IndexNum), r: r}
	le := binary.LittleEndian
	for i := range ix.Entries {
		p := raw[i*EntrySize:]
		e := Entry{Out: int64(le.Uint64(p)), In: int64(le.Uint64(p[8:])), WinPos: int64(le.Uint64(p[16:])),
			Bits: p[24], WinLen: le.Uint32(p[25:])}
		switch {
		case e.Bits > 7:
			return nil, fmt.Errorf("gzip index: entry %d: %d bits", i, e.Bits)
		case e.Out < 0 || e.Out > h.UncompressedSize || (i > 0 && e.Out <= ix.Entries[i-1].Out) || (i == 0 && e.Out != 0):
			return nil, fmt.Errorf("gzip index: entry %d: uncompressed offset %d out of order or outside the %d-byte stream", i, e.Out, h.UncompressedSize)
		case e.In < 1 || e.In > gzipSize || (i > 0 && e.In < ix.Entries[i-1].In):
			return nil, fmt.Errorf("gzip index: entry %d: compressed offset %d out of order or outside the %d-byte blob", i, e.In, gzipSize)
		case e.WinPos < HeaderSize || e.WinLen == 0 || e.WinLen > WindowSize+1024 || e.WinPos > h.IndexStart-int64(e.WinLen):
			return nil, fmt.Errorf("gzip index: entry %d: window %d+%d outside the window area", i, e.WinPos, e.WinLen)
		case h.DictAlgo == algoNone && e.WinLen != WindowSize:
			return nil, fmt.Errorf("gzip index: entry %d: raw window of %d bytes", i, e.WinLen)
		}
		ix.Entries[i] = e
	}
	return ix, nil
}

// find returns the last entry at or before uncompressed offset off.
func (ix *Index) find(off int64) int {
	i := sort.Search(len(ix.Entries), func(i int) bool { return ix.Entries[i].Out > off })
	return max(i-1, 0)
}

// CompressedRange returns the range of the gzip blob (offset, length) a Reader reads to return the uncompressed
// bytes [off, off+n): from the checkpoint at or before off (its partial byte included) to the first checkpoint at
// or after off+n, plus the input a Reader reads ahead, or to the blob's end. It is empty when the range is empty or
// outside the stream.
func (ix *Index) CompressedRange(off, n int64) (int64, int64) {
	end := min(off+n, ix.UncompressedSize)
	off = max(off, 0)
	if end <= off {
		return 0, 0
	}
	e := ix.Entries[ix.find(off)]
	start := e.In
	if e.Bits > 0 {
		start--
	}
	stop := ix.GzipFileSize
	if j := sort.Search(len(ix.Entries), func(j int) bool { return ix.Entries[j].Out >= end }); j < len(ix.Entries) {
		stop = min(ix.Entries[j].In+2*inChunk, stop)
	}
	return start, stop - start
}

// window returns the 32 KiB dictionary of entry i.
func (ix *Index) window(i int) ([]byte, error) {
	e := ix.Entries[i]
	b := make([]byte, e.WinLen)
	if _, err := ix.r.ReadAt(b, e.WinPos); err != nil {
		return nil, fmt.Errorf("gzip index: reading window %d: %w", i, err)
	}
	if ix.DictAlgo == algoNone {
		return b, nil
	}
	w, err := inflateZlib(b, WindowSize)
	if err != nil {
		return nil, fmt.Errorf("gzip index: window %d: %w", i, err)
	}
	if len(w) != WindowSize {
		return nil, fmt.Errorf("gzip index: window %d holds %d bytes, want %d", i, len(w), WindowSize)
	}
	return w, nil
}

// inflateZlib decompresses a zlib stream of at most limit bytes.
func inflateZlib(b []byte, limit int64) ([]byte, error) {
	zr, err := zlib.NewReader(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	out, err := io.ReadAll(io.LimitReader(zr, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(out)) > limit {
		return nil, fmt.Errorf("zlib stream longer than %d bytes", limit)
	}
	return out, nil
}
