// Package zfile reads and writes ZFile, overlaybd's (DADI) seekable compressed container:
// fixed-size blocks compressed independently (LZ4 or zstd) plus an index, so any range reads in O(1).
//
// Layout: [header 512][block0 (+crc)]…[blockN-1 (+crc)][index: u32 record length per block][trailer 512].
// All integers are little-endian. Checksums are CRC32C (Castagnoli) in the raw-register convention used
// upstream (no pre/post inversion): the header/trailer digest and the index CRC use seed 0, the per-block
// CRC seed 100007.
package zfile

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/bits"
)

// Algorithm is the block compression algorithm recorded in a ZFile header.
type Algorithm uint8

// Algorithms known to the format. Only LZ4 and ZSTD are supported.
const (
	// AlgoMiniLZO (0) is recognised but not supported, as upstream no longer implements it.
	AlgoMiniLZO Algorithm = 0
	// AlgoLZ4 is the LZ4 block format (upstream LZ4_compress_default), the default.
	AlgoLZ4 Algorithm = 1
	// AlgoZSTD is one zstd frame per block (upstream level 3).
	AlgoZSTD Algorithm = 2
)

// String returns "lz4", "zstd", "mini_lzo" or "algo(N)".
func (a Algorithm) String() string {
	switch a {
	case AlgoLZ4:
		return "lz4"
	case AlgoZSTD:
		return "zstd"
	case AlgoMiniLZO:
		return "mini_lzo"
	}
	return fmt.Sprintf("algo(%d)", uint8(a))
}

// ParseAlgorithm returns the algorithm a name ("lz4" or "zstd", as String prints them) names.
func ParseAlgorithm(name string) (Algorithm, error) {
	switch name {
	case "lz4":
		return AlgoLZ4, nil
	case "zstd":
		return AlgoZSTD, nil
	}
	return 0, errorf(ErrUnsupported, "compression %q: want lz4 or zstd", name)
}

// Flag bits of the header/trailer flags field.
const (
	FlagHeader          uint64 = 1 << 0 // slot is a header (1) or trailer (0)
	FlagData            uint64 = 1 << 1 // data file (1) or index file (0)
	FlagSealed          uint64 = 1 << 2 // file is complete (set in trailers)
	FlagHeaderOverwrite uint64 = 1 << 3 // header carries the trailer's fields; readers skip the trailer
	FlagDigest          uint64 = 1 << 4 // slot digest and index CRC are valid
	FlagIndexCompressed uint64 = 1 << 5 // index is compressed (in upstream's spec only; never written, ignored)
)

// Format constants.
const (
	// SlotSize is the size of the header and of the trailer.
	SlotSize = 512
	// structSize is the value of the size field: the meaningful prefix of a slot.
	structSize = 96
	// blockCRCSeed seeds the per-block CRC ("NOI_WELL_KNOWN_PRIME" upstream).
	blockCRCSeed = 100007
	// maxIndexSize is upstream's limit on the number of index entries.
	maxIndexSize = 1_000_000_000
	// minBlockSize and maxBlockSize bound the block sizes this package reads.
	minBlockSize = 512
	maxBlockSize = 64 << 10
	// crcSize is the size of the per-block CRC that follows each block when verify is set.
	crcSize = 4
)

// Byte offsets of the header/trailer fields.
const (
	offSize        = 24
	offDigest      = 28
	offFlags       = 32
	offIndexOffset = 40
	offIndexSize   = 48
	offOrigSize    = 56
	offIndexCRC    = 64
	offBlockSize   = 72
	offAlgo        = 76
	offDictSize    = 84
	offVerify      = 88
)

// magic is magic0 ("ZFile\0\1\0", offset 0) followed by magic1 ("tuji.yyf@Alibaba", offset 8).
var magic = [24]byte{
	'Z', 'F', 'i', 'l', 'e', 0, 1, 0,
	't', 'u', 'j', 'i', '.', 'y', 'y', 'f', '@', 'A', 'l', 'i', 'b', 'a', 'b', 'a',
}

// Sentinel errors. Every error returned by this package for a bad file wraps one of them
// (test with errors.Is); I/O errors of the underlying reader or writer are wrapped as they are.
var (
	// ErrFormat reports a structurally invalid file: bad magic, inconsistent header, trailer or index.
	ErrFormat = errors.New("zfile: invalid format")
	// ErrChecksum reports a header digest, index CRC or block CRC mismatch.
	ErrChecksum = errors.New("zfile: checksum mismatch")
	// ErrCorrupt reports a block that does not decompress to its expected length.
	ErrCorrupt = errors.New("zfile: corrupt block")
	// ErrUnsupported reports a valid file using a feature this package does not implement.
	ErrUnsupported = errors.New("zfile: unsupported")
)

// kindError is an error with its own message that matches one of the sentinel errors.
type kindError struct {
	msg  string
	kind error
}

func (e *kindError) Error() string { return e.msg }
func (e *kindError) Unwrap() error { return e.kind }

// errorf returns a "zfile: ..." error wrapping kind.
func errorf(kind error, format string, args ...any) error {
	return &kindError{msg: "zfile: " + fmt.Sprintf(format, args...), kind: kind}
}

// BlockError reports a problem with one compressed block.
type BlockError struct {
	Block  int64 // block index
	Offset int64 // byte offset of the block's record in the ZFile
	Err    error // what is wrong; wraps ErrChecksum, ErrCorrupt or ErrFormat
}

// Error returns "zfile: block N: problem".
func (e *BlockError) Error() string {
	return fmt.Sprintf("zfile: block %d: %v", e.Block, e.Err)
}

// Unwrap returns e.Err.
func (e *BlockError) Unwrap() error { return e.Err }

// blockErr returns a *BlockError whose Err has the given message and kind.
func blockErr(block, offset int64, kind error, format string, args ...any) error {
	return &BlockError{Block: block, Offset: offset, Err: &kindError{msg: fmt.Sprintf(format, args...), kind: kind}}
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32c is CRC32C without pre/post inversion (the hardware crc32 instruction's semantics).
func crc32c(seed uint32, p []byte) uint32 {
	return ^crc32.Update(^seed, castagnoli, p)
}

// slot holds the fields of a header or trailer.
type slot struct {
	digest      uint32
	flags       uint64
	indexOffset uint64
	indexSize   uint64
	origSize    uint64
	indexCRC    uint32
	blockSize   uint32
	algo        Algorithm
	dictSize    uint32
	verify      bool
}

// parseSlot decodes a 512-byte slot. It checks only the magic.
func parseSlot(b []byte) (slot, error) {
	if [24]byte(b[:24]) != magic {
		return slot{}, errorf(ErrFormat, "bad magic")
	}
	le := binary.LittleEndian
	return slot{
		digest:      le.Uint32(b[offDigest:]),
		flags:       le.Uint64(b[offFlags:]),
		indexOffset: le.Uint64(b[offIndexOffset:]),
		indexSize:   le.Uint64(b[offIndexSize:]),
		origSize:    le.Uint64(b[offOrigSize:]),
		indexCRC:    le.Uint32(b[offIndexCRC:]),
		blockSize:   le.Uint32(b[offBlockSize:]),
		algo:        Algorithm(b[offAlgo]),
		dictSize:    le.Uint32(b[offDictSize:]),
		verify:      b[offVerify] != 0,
	}, nil
}

// slotDigest returns the CRC32C of a 512-byte slot with its digest field taken as zero.
func slotDigest(b []byte) uint32 {
	var zero [4]byte
	c := crc32c(0, b[:offDigest])
	c = crc32c(c, zero[:])
	return crc32c(c, b[offDigest+4:SlotSize])
}

// marshal encodes s exactly as upstream writers do (level, use_dict and every undefined byte zero)
// and computes the digest over the slot.
func (s *slot) marshal() []byte {
	b := make([]byte, SlotSize)
	copy(b, magic[:])
	le := binary.LittleEndian
	le.PutUint32(b[offSize:], structSize)
	le.PutUint64(b[offFlags:], s.flags)
	le.PutUint64(b[offIndexOffset:], s.indexOffset)
	le.PutUint64(b[offIndexSize:], s.indexSize)
	le.PutUint64(b[offOrigSize:], s.origSize)
	le.PutUint32(b[offIndexCRC:], s.indexCRC)
	le.PutUint32(b[offBlockSize:], s.blockSize)
	b[offAlgo] = byte(s.algo)
	// level (77) and use_dict (78) stay 0, as upstream writes them.
	le.PutUint32(b[offDictSize:], s.dictSize)
	if s.verify {
		b[offVerify] = 1
	}
	if s.flags&FlagDigest != 0 {
		le.PutUint32(b[offDigest:], slotDigest(b))
	}
	return b
}

// IsZFile reports whether r starts with the ZFile magic. Input shorter than the magic is not a
// ZFile (false, nil); other read errors are returned.
func IsZFile(r io.ReaderAt) (bool, error) {
	var b [24]byte
	n, err := r.ReadAt(b[:], 0)
	if n < len(b) {
		if err == nil || err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
			return false, nil
		}
		return false, err
	}
	return b == magic, nil
}

// Info describes an opened ZFile, as recorded in the header (header-overwrite files) or trailer.
type Info struct {
	Algorithm       Algorithm
	BlockSize       int   // uncompressed block size in bytes
	Blocks          int64 // number of blocks (index entries)
	OriginalSize    int64 // uncompressed size
	Verify          bool  // each block record ends with a CRC32C
	HeaderOverwrite bool  // the header holds the final fields (streaming builder); the trailer is not consulted
	HasDigest       bool  // slot digest and index CRC were present and checked
	IndexOffset     int64 // byte offset of the index
	IndexCRC        uint32
	Size            int64  // compressed (ZFile) size in bytes
	HeaderFlags     uint64 // raw flags of the header (may hold garbage bits from old writers)
	TrailerFlags    uint64 // raw flags of the trailer; 0 if not read (header-overwrite file with a misplaced trailer)
}

// log2 returns log2(n) for a power of two n.
func log2(n uint32) uint {
	return uint(bits.TrailingZeros32(n))
}

// maxRecord returns the largest block record (compressed bytes plus CRC) accepted for a block
// size: twice the block size leaves ample room over the LZ4 and zstd worst cases.
func maxRecord(blockSize int) int {
	return 2*blockSize + 64
}
