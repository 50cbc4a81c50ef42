package lsmt

import (
	"encoding/binary"
	"fmt"
)

// SectorSize is the unit of every offset and length in an LSMT index.
const SectorSize = 512

// MaxLayers is the maximum number of read-only layers in a Stack.
const MaxLayers = 255

// MaxSegmentLength is the largest length, in sectors, an index entry can hold (14 bits).
const MaxSegmentLength = 1<<14 - 1

// EntrySize is the size in bytes of one on-disk index entry.
const EntrySize = 16

// Bit widths and masks of the packed index entry.
const (
	maxOffset     = 1<<50 - 1 // also the offset of an invalid (padding) entry
	maxMOffset    = 1<<55 - 1
	zeroedBit     = 1 << 55
	invalidOffset = maxOffset
)

// Segment is one decoded index entry: Length sectors of the virtual disk starting at sector Offset
// are stored at sector MOffset of the layer's file, or read as zeros when Zeroed is set.
type Segment struct {
	Offset  uint64 // LBA, in sectors (50 bits)
	Length  uint32 // in sectors (14 bits, at most MaxSegmentLength)
	MOffset uint64 // position in the layer file, in sectors (55 bits)
	Zeroed  bool   // explicit zero extent (discard); masks lower layers
	Tag     uint8  // layer number in merged indexes; 0 on disk for normal layers
}

// End returns the first sector after the segment.
func (s Segment) End() uint64 { return s.Offset + uint64(s.Length) }

// Invalid reports whether s is the padding entry (offset 2^50−1, length 0) that readers skip.
func (s Segment) Invalid() bool { return s.Offset == invalidOffset }

// InvalidSegment is the padding entry written to fill index blocks.
var InvalidSegment = Segment{Offset: invalidOffset}

// String formats the segment for logs and test failures.
func (s Segment) String() string {
	z := ""
	if s.Zeroed {
		z = " zeroed"
	}
	return fmt.Sprintf("[%d+%d -> %d%s tag %d]", s.Offset, s.Length, s.MOffset, z, s.Tag)
}

// DecodeEntry decodes one 16-byte little-endian index entry. b must hold at least EntrySize bytes.
func DecodeEntry(b []byte) Segment {
	return unpack(binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint64(b[8:])).segment()
}

// AppendEntry appends the 16-byte encoding of s to dst. Fields wider than the format's bit widths
// (offset 50, length 14, moffset 55 bits) are truncated to them.
func AppendEntry(dst []byte, s Segment) []byte {
	m := pack(s.Offset&maxOffset, s.Length&MaxSegmentLength, s.MOffset&maxMOffset, s.Zeroed, s.Tag)
	return m.append(dst)
}

// mapping is the packed in-memory (and on-disk) form of a Segment: 16 bytes.
type mapping struct{ lo, hi uint64 }

func unpack(lo, hi uint64) mapping { return mapping{lo, hi} }

func pack(off uint64, n uint32, moff uint64, zeroed bool, tag uint8) mapping {
	hi := moff | uint64(tag)<<56
	if zeroed {
		hi |= zeroedBit
	}
	return mapping{off | uint64(n)<<50, hi}
}

func (m mapping) off() uint64    { return m.lo & maxOffset }
func (m mapping) length() uint32 { return uint32(m.lo >> 50) }
func (m mapping) end() uint64    { return m.off() + uint64(m.length()) }
func (m mapping) moff() uint64   { return m.hi & maxMOffset }
func (m mapping) zeroed() bool   { return m.hi&zeroedBit != 0 }
func (m mapping) tag() uint8     { return uint8(m.hi >> 56) }
func (m mapping) invalid() bool  { return m.off() == invalidOffset }

// mend is the end of the mapped range in the file; a zeroed entry maps nothing.
func (m mapping) mend() uint64 {
	if m.zeroed() {
		return m.moff()
	}
	return m.moff() + uint64(m.length())
}

func (m mapping) withTag(t uint8) mapping {
	m.hi = m.hi&^(0xff<<56) | uint64(t)<<56
	return m
}

func (m mapping) withMOff(moff uint64) mapping {
	m.hi = m.hi&^maxMOffset | moff
	return m
}

// trim restricts m to [a, b); the caller guarantees that the ranges overlap.
func (m mapping) trim(a, b uint64) mapping {
	off, end, moff := m.off(), m.end(), m.moff()
	if a > off {
		if !m.zeroed() {
			moff += a - off
		}
		off = a
	}
	if b < end {
		end = b
	}
	return pack(off, uint32(end-off), moff, m.zeroed(), m.tag())
}

func (m mapping) segment() Segment {
	return Segment{Offset: m.off(), Length: m.length(), MOffset: m.moff(), Zeroed: m.zeroed(), Tag: m.tag()}
}

func (m mapping) append(dst []byte) []byte {
	dst = binary.LittleEndian.AppendUint64(dst, m.lo)
	return binary.LittleEndian.AppendUint64(dst, m.hi)
}

func (m mapping) String() string { return m.segment().String() }

var invalidMapping = pack(invalidOffset, 0, 0, false, 0)

// compressIndex merges neighbours that are contiguous in LBA and in the file, have the same
// zeroed flag and tag, and whose combined length stays below MaxSegmentLength (upstream
// compress_raw_index; a merged entry is therefore at most MaxSegmentLength-1 sectors).
func compressIndex(ms []mapping) []mapping {
	if len(ms) < 2 {
		return ms
	}
	i := 0
	for j := 1; j < len(ms); j++ {
		a, b := ms[i], ms[j]
		if a.end() == b.off() && a.mend() == b.moff() && a.zeroed() == b.zeroed() && a.tag() == b.tag() &&
			a.length()+b.length() < MaxSegmentLength {
			ms[i] = pack(a.off(), a.length()+b.length(), a.moff(), a.zeroed(), a.tag())
		} else {
			i++
			ms[i] = b
		}
	}
	return ms[:i+1]
}
