package cache

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/bits"
)

// The state file of a blob records which blocks of its data file hold fetched bytes. It is replaced atomically
// (temporary file, fsync, rename) and only ever lists blocks whose bytes were made durable before it was written.
//
//	off  size  field
//	0    8     magic "OBDCACH1"
//	8    4     version (1)
//	12   4     reserved, 0
//	16   8     block size in bytes
//	24   8     blob size in bytes
//	32   8     last access, Unix nanoseconds (LRU order across restarts)
//	40   8     number of blocks = ceil(blob size / block size)
//	48   n     bitmap, bit i of byte i/8 (LSB first) = block i present; n = ceil(blocks/8); unused bits 0
//	48+n 4     CRC32C (Castagnoli) of all preceding bytes
//
// All integers are little-endian.
const (
	stateMagic      = "OBDCACH1"
	stateVersion    = 1
	stateHeaderSize = 48
	// maxStateBlocks bounds the bitmap a state file may declare (2^34 blocks: a 4 PiB blob at 256 KiB).
	maxStateBlocks = 1 << 34
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// state is the decoded content of a state file.
type state struct {
	blockSize  int64
	size       int64
	lastAccess int64
	present    []uint64 // bitmap over blocks, LSB first
}

// numBlocks returns ceil(size/blockSize).
func numBlocks(size, blockSize int64) int64 {
	return (size + blockSize - 1) / blockSize
}

// encodeState serializes s.
func encodeState(s *state) []byte {
	nb := numBlocks(s.size, s.blockSize)
	n := (nb + 7) / 8
	buf := make([]byte, stateHeaderSize+n+4)
	copy(buf, stateMagic)
	binary.LittleEndian.PutUint32(buf[8:], stateVersion)
	binary.LittleEndian.PutUint64(buf[16:], uint64(s.blockSize))
	binary.LittleEndian.PutUint64(buf[24:], uint64(s.size))
	binary.LittleEndian.PutUint64(buf[32:], uint64(s.lastAccess))
	binary.LittleEndian.PutUint64(buf[40:], uint64(nb))
	bm := buf[stateHeaderSize : stateHeaderSize+n]
	for i := range bm {
		bm[i] = byte(s.present[i/8] >> (8 * (i % 8)))
	}
	binary.LittleEndian.PutUint32(buf[stateHeaderSize+n:], crc32.Checksum(buf[:stateHeaderSize+n], castagnoli))
	return buf
}

// decodeState parses and validates a state file.
func decodeState(buf []byte) (*state, error) {
	if len(buf) < stateHeaderSize+4 {
		return nil, fmt.Errorf("state file of %d bytes is too short", len(buf))
	}
	if string(buf[:8]) != stateMagic {
		return nil, errors.New("bad magic")
	}
	if v := binary.LittleEndian.Uint32(buf[8:]); v != stateVersion {
		return nil, fmt.Errorf("unknown version %d", v)
	}
	bs := binary.LittleEndian.Uint64(buf[16:])
	size := binary.LittleEndian.Uint64(buf[24:])
	last := binary.LittleEndian.Uint64(buf[32:])
	nb := binary.LittleEndian.Uint64(buf[40:])
	if bs == 0 || bs > 1<<40 || size > 1<<62 {
		return nil, fmt.Errorf("implausible block size %d or blob size %d", bs, size)
	}
	if want := numBlocks(int64(size), int64(bs)); uint64(want) != nb || nb > maxStateBlocks {
		return nil, fmt.Errorf("block count %d does not match blob size %d and block size %d", nb, size, bs)
	}
	n := (nb + 7) / 8
	if uint64(len(buf)) != stateHeaderSize+n+4 {
		return nil, fmt.Errorf("state file has %d bytes, want %d", len(buf), stateHeaderSize+n+4)
	}
	if got, want := crc32.Checksum(buf[:stateHeaderSize+n], castagnoli), binary.LittleEndian.Uint32(buf[stateHeaderSize+n:]); got != want {
		return nil, fmt.Errorf("checksum %08x, want %08x", got, want)
	}
	bm := buf[stateHeaderSize : stateHeaderSize+n]
	if rem := nb % 8; rem != 0 && bm[n-1]>>rem != 0 {
		return nil, errors.New("bits set beyond the last block")
	}
	s := &state{blockSize: int64(bs), size: int64(size), lastAccess: int64(last), present: make([]uint64, (nb+63)/64)}
	for i, b := range bm {
		s.present[i/8] |= uint64(b) << (8 * (i % 8))
	}
	return s, nil
}

// split returns s in blocks of bs, a divisor of its block size.
func (s *state) split(bs int64) *state {
	k := s.blockSize / bs
	out := &state{blockSize: bs, size: s.size, lastAccess: s.lastAccess}
	nb := numBlocks(s.size, bs)
	out.present = make([]uint64, (nb+63)/64)
	for i := range nb {
		if bitSet(s.present, i/k) {
			out.present[i/64] |= 1 << (i % 64)
		}
	}
	return out
}

// presentBytes sums the sizes of the present blocks of s.
func (s *state) presentBytes() int64 {
	var count int64
	for _, w := range s.present {
		count += int64(bits.OnesCount64(w))
	}
	total := count * s.blockSize
	nb := numBlocks(s.size, s.blockSize)
	if nb > 0 && bitSet(s.present, nb-1) {
		total -= nb*s.blockSize - s.size // the last block is short
	}
	return total
}

// bitSet reports whether bit i is set.
func bitSet(bm []uint64, i int64) bool { return bm[i/64]&(1<<(i%64)) != 0 }
