// Package erofs writes EROFS filesystem images layer by layer, the way overlaybd stacks them: each layer's
// image is the one below it with new blocks appended (file data, inodes, directories) and the superblock and
// the inodes of changed directories rewritten in place, so that a layer's block diff holds only what the layer
// changed. It also reads the images it stacks on. See docs/format.md "EROFS layers".
package erofs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// On-disk constants (the kernel's fs/erofs/erofs_fs.h).
const (
	superMagic  = 0xE0F5E1E2
	superOffset = 1024
	superSize   = 128
	blockBits   = 12
	blockSize   = 1 << blockBits
	slotBits    = 5 // an inode slot (nid unit) is 32 bytes
	slotSize    = 1 << slotBits

	compactSize  = 32
	extendedSize = 64

	layoutFlatPlain  = 0
	layoutFlatInline = 2

	direntSize  = 12
	maxNameLen  = 255
	xattrHeader = 12 // erofs_xattr_ibody_header

	incompat48Bit   = 0x80
	incompatMetabox = 0x100
	compatSBChksum  = 0x1

	// File types of directory entries.
	ftUnknown = 0
	ftReg     = 1
	ftDir     = 2
	ftChr     = 3
	ftBlk     = 4
	ftFIFO    = 5
	ftSock    = 6
	ftSymlink = 7
)

// File type bits of a mode (Linux S_IF*).
const (
	ModeTypeMask = 0o170000
	ModeSocket   = 0o140000
	ModeSymlink  = 0o120000
	ModeRegular  = 0o100000
	ModeBlock    = 0o060000
	ModeDir      = 0o040000
	ModeChar     = 0o020000
	ModeFIFO     = 0o010000
)

// ErrCorrupt is in the errors of reading an image that is not a well-formed EROFS image this package can stack
// on.
var ErrCorrupt = errors.New("erofs: malformed image")

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// superblock holds the fields of the superblock this package reads and writes.
type superblock struct {
	featureCompat   uint32
	rootNid         uint16
	inos            uint64
	epoch           uint64
	fixedNsec       uint32
	blocks          uint32
	metaBlkaddr     uint32
	xattrBlkaddr    uint32
	uuid            [16]byte
	volumeName      [16]byte
	featureIncompat uint32
	u1              uint16
	raw             [superSize]byte // as read, to keep fields this package does not know
}

func readSuperblock(r io.ReaderAt) (superblock, error) {
	var sb superblock
	if _, err := r.ReadAt(sb.raw[:], superOffset); err != nil {
		return sb, fmt.Errorf("erofs: read superblock: %w", err)
	}
	b := sb.raw[:]
	le := binary.LittleEndian
	if m := le.Uint32(b[0:]); m != superMagic {
		return sb, corrupt("superblock magic %#x, want %#x", m, superMagic)
	}
	if b[12] != blockBits {
		return sb, corrupt("block size 2^%d: only 4 KiB blocks are supported", b[12])
	}
	sb.featureCompat = le.Uint32(b[8:])
	sb.rootNid = le.Uint16(b[14:])
	sb.inos = le.Uint64(b[16:])
	sb.epoch = le.Uint64(b[24:])
	sb.fixedNsec = le.Uint32(b[32:])
	sb.blocks = le.Uint32(b[36:])
	sb.metaBlkaddr = le.Uint32(b[40:])
	sb.xattrBlkaddr = le.Uint32(b[44:])
	copy(sb.uuid[:], b[48:64])
	copy(sb.volumeName[:], b[64:80])
	sb.featureIncompat = le.Uint32(b[80:])
	sb.u1 = le.Uint16(b[84:])
	if f := sb.featureIncompat & (incompat48Bit | incompatMetabox); f != 0 {
		return sb, corrupt("incompatible features %#x (48-bit block addresses, metabox): not supported", f)
	}
	if extra := le.Uint16(b[86:]); extra != 0 {
		return sb, corrupt("%d extra devices: not supported", extra)
	}
	if b[90] != 0 {
		return sb, corrupt("directory block size differs from the block size: not supported")
	}
	if b[91] != 0 {
		return sb, corrupt("long xattr name prefixes: not supported")
	}
	return sb, nil
}

// encode returns the superblock's 128 bytes: those read, with this package's fields set over them.
func (sb *superblock) encode() []byte {
	b := sb.raw
	le := binary.LittleEndian
	le.PutUint32(b[0:], superMagic)
	le.PutUint32(b[4:], 0)
	le.PutUint32(b[8:], sb.featureCompat&^compatSBChksum) // the checksum is not kept up to date
	b[12] = blockBits
	le.PutUint16(b[14:], sb.rootNid)
	le.PutUint64(b[16:], sb.inos)
	le.PutUint64(b[24:], sb.epoch)
	le.PutUint32(b[32:], sb.fixedNsec)
	le.PutUint32(b[36:], sb.blocks)
	le.PutUint32(b[40:], sb.metaBlkaddr)
	le.PutUint32(b[44:], sb.xattrBlkaddr)
	copy(b[48:64], sb.uuid[:])
	copy(b[64:80], sb.volumeName[:])
	le.PutUint32(b[80:], sb.featureIncompat)
	le.PutUint16(b[84:], sb.u1)
	return b[:]
}

// inode is an on-disk inode as read.
type inode struct {
	nid        uint64
	mode       uint32
	uid, gid   uint32
	size       uint64
	mtime      time.Time
	rdev       uint32
	ino        uint32
	layout     int
	startBlk   uint32
	isize      int     // inode core size: 32 or 64
	xattrSize  int     // inline xattr body size
	xattrs     []xattr // inline and shared, in the order stored
	inlineData []byte  // FLAT_INLINE tail
}

// slot is the bytes an inode occupies at its nid: what a rewrite in place may use.
func (in *inode) slot() int {
	n := in.isize + in.xattrSize
	if in.layout == layoutFlatInline {
		n += len(in.inlineData)
	}
	return n
}

type xattr struct {
	name  string // full name, prefix included
	value []byte
}

// Xattr name prefixes by erofs name index.
var xattrPrefixes = [...]string{1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default", 4: "trusted.", 5: "lustre.", 6: "security."}

// xattrIndex splits a full xattr name into its erofs name index and the rest.
func xattrIndex(name string) (byte, string, bool) {
	for i, p := range xattrPrefixes {
		if p == "" || len(name) < len(p) || name[:len(p)] != p {
			continue
		}
		if i == 2 || i == 3 {
			if len(name) != len(p) {
				continue
			}
		}
		return byte(i), name[len(p):], true
	}
	return 0, "", false
}
