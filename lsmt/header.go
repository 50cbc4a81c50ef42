package lsmt

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
)

// HeaderSize is the space reserved for a header or trailer at the start or end of a layer file.
const HeaderSize = 4096

// headerStructSize is the size of the packed header struct inside its 4096-byte slot.
const headerStructSize = 390

// userTagSize is the capacity of the commit message field.
const userTagSize = 256

// NullUUID is the UUID written when a layer has no UUID or no parent.
const NullUUID = "00000000-0000-0000-0000-000000000000"

// Header flag bits.
const (
	FlagHeader    = 1 << 0 // header (1) or trailer (0)
	FlagDataFile  = 1 << 1 // data file (1) or index file (0)
	FlagSealed    = 1 << 2 // sealed or committed
	FlagGCLayer   = 1 << 3 // unused by writers
	FlagSparseRW  = 1 << 4 // sparse writable data file
	FlagInfoValid = 1 << 5 // never set by upstream writers
)

var (
	magic0 = [8]byte{'L', 'S', 'M', 'T', 0, 1, 2, 0}
	magic1 = [16]byte{0x65, 0x7E, 0x63, 0xD2, 0x94, 0x44, 0x08, 0x4C, 0xA2, 0xD2, 0xC8, 0xEC, 0x4F, 0xCF, 0xAE, 0x8A}
)

// ErrBadMagic is returned when a header or trailer slot does not start with the LSMT magic.
var ErrBadMagic = errors.New("lsmt: bad magic")

// Header is an LSMT header or trailer (both share one layout; Flags tells them apart).
type Header struct {
	Flags       uint32
	IndexOffset uint64 // bytes
	IndexSize   uint64 // number of 16-byte entries, including padding
	VirtualSize uint64 // bytes
	UUID        string // canonical upper-case form when valid; "" or the raw text otherwise
	ParentUUID  string
	Version     uint8
	SubVersion  uint8
	UserTag     string // commit message, at most 256 bytes
}

// IsHeader reports whether the header bit is set (a trailer has it clear).
func (h Header) IsHeader() bool { return h.Flags&FlagHeader != 0 }

// IsDataFile reports whether the slot belongs to a data file (rather than an RW index file).
func (h Header) IsDataFile() bool { return h.Flags&FlagDataFile != 0 }

// IsSealed reports whether the sealed bit is set.
func (h Header) IsSealed() bool { return h.Flags&FlagSealed != 0 }

// IsSparse reports whether the sparse-RW bit is set.
func (h Header) IsSparse() bool { return h.Flags&FlagSparseRW != 0 }

// ParseHeader decodes a header or trailer from b, which must hold at least the 390-byte struct.
// Only the magic is checked; UUIDs are normalised to upper case when they are valid.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < headerStructSize {
		return Header{}, fmt.Errorf("lsmt: header slot too short (%d bytes)", len(b))
	}
	if !bytes.Equal(b[0:8], magic0[:]) || !bytes.Equal(b[8:24], magic1[:]) {
		return Header{}, ErrBadMagic
	}
	le := binary.LittleEndian
	h := Header{
		Flags:       le.Uint32(b[28:]),
		IndexOffset: le.Uint64(b[32:]),
		IndexSize:   le.Uint64(b[40:]),
		VirtualSize: le.Uint64(b[48:]),
		UUID:        uuidField(b[56:93]),
		ParentUUID:  uuidField(b[93:130]),
		Version:     b[132],
		SubVersion:  b[133],
		UserTag:     cString(b[134 : 134+userTagSize]),
	}
	return h, nil
}

// MarshalBinary encodes h into a 4096-byte slot exactly as upstream writes it. An empty UUID or
// parent UUID is written as the null UUID.
func (h Header) MarshalBinary() ([]byte, error) {
	uuid, err := formatUUID(h.UUID)
	if err != nil {
		return nil, err
	}
	parent, err := formatUUID(h.ParentUUID)
	if err != nil {
		return nil, err
	}
	if len(h.UserTag) > userTagSize {
		return nil, fmt.Errorf("lsmt: user tag too long (%d bytes, at most %d)", len(h.UserTag), userTagSize)
	}
	b := make([]byte, HeaderSize)
	copy(b[0:], magic0[:])
	copy(b[8:], magic1[:])
	le := binary.LittleEndian
	le.PutUint32(b[24:], headerStructSize)
	le.PutUint32(b[28:], h.Flags)
	le.PutUint64(b[32:], h.IndexOffset)
	le.PutUint64(b[40:], h.IndexSize)
	le.PutUint64(b[48:], h.VirtualSize)
	copy(b[56:92], uuid)
	copy(b[93:129], parent)
	b[132] = h.Version
	b[133] = h.SubVersion
	copy(b[134:], h.UserTag)
	return b, nil
}

// newHeader returns a header with the version fields upstream writes.
func newHeader(flags uint32) Header {
	return Header{Flags: flags, Version: 1, SubVersion: 1}
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func uuidField(b []byte) string {
	s := cString(b)
	if u, ok := CanonicalUUID(s); ok {
		return u
	}
	return s
}

func formatUUID(s string) (string, error) {
	if s == "" {
		return NullUUID, nil
	}
	u, ok := CanonicalUUID(s)
	if !ok {
		return "", fmt.Errorf("lsmt: invalid uuid %q", s)
	}
	return u, nil
}

// CanonicalUUID parses a textual UUID (8-4-4-4-12 hex digits, any case) and returns it in upper
// case, as upstream writes it.
func CanonicalUUID(s string) (string, bool) {
	if len(s) != 36 {
		return "", false
	}
	b := []byte(s)
	for i, c := range b {
		switch {
		case i == 8 || i == 13 || i == 18 || i == 23:
			if c != '-' {
				return "", false
			}
		case c >= '0' && c <= '9', c >= 'A' && c <= 'F':
		case c >= 'a' && c <= 'f':
			b[i] = c - 'a' + 'A'
		default:
			return "", false
		}
	}
	return string(b), true
}
