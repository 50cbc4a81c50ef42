// Package fsmeta finds the metadata of an ext4 filesystem read through an io.ReaderAt — the superblock and group
// descriptors, the used parts of the inode tables, directory blocks, extent tree blocks, extended attribute blocks
// and long symlinks' blocks — without cgo, so that the node daemon can fetch a lazily read image's metadata ahead
// of its first container: every path lookup and stat of a start then finds its blocks local, the way a peer's table
// of contents does.
//
// The bytes come from the image, which the daemon does not trust: every field is checked against the filesystem's
// bounds, and a bad one is an error, never a panic or an out-of-range extent.
package fsmeta

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
)

// Extent is a range of the device, in bytes.
type Extent struct{ Off, Len int64 }

// End returns the first byte after e.
func (e Extent) End() int64 { return e.Off + e.Len }

const (
	superOff   = 1024
	superSize  = 1024
	ext4Magic  = 0xEF53
	extentMag  = 0xF30A
	maxDepth   = 5
	maxGroups  = 1 << 22 // 2^22 groups of 32,768 4 KiB blocks: 512 TiB
	inodeSizeV = 128     // inode size of revision 0 filesystems
	readChunk  = 1 << 20 // inode tables are read in pieces of this size
	maxDirExts = 1 << 16 // extents of one directory followed
	maxTreeBlk = 1 << 12 // tree blocks of one directory read

	incompatMetaBG   = 0x10
	incompat64Bit    = 0x80
	roCompatGDTCsum  = 0x10
	roCompatMetaCsum = 0x400
	bgInodeUninit    = 0x1

	flagExtents = 0x80000
	flagInline  = 0x10000000

	modeType    = 0xF000
	modeDir     = 0x4000
	modeSymlink = 0xA000
	modeRegular = 0x8000
)

// ErrNotExt4 is returned for a device whose superblock is not ext4's.
var ErrNotExt4 = errors.New("fsmeta: no ext4 superblock")

// Layout is an ext4 filesystem's geometry, from its superblock and group descriptors.
type Layout struct {
	BlockSize int64
	blocks    uint64 // blocks in the filesystem
	inodeSize int64
	perGroup  uint32 // inodes per group
	inodes    uint32
	// tables are the used parts of the groups' inode tables, by group: first inode number and byte range.
	tables []table
	// static are the superblock and group descriptor blocks.
	static []Extent
}

type table struct {
	ino uint32 // number of the first inode in the table
	n   uint32 // inodes in use (at the start of the table)
	off int64  // byte offset of the table
}

// ReadLayout reads the superblock and group descriptors of the ext4 filesystem on r, a device of size bytes.
func ReadLayout(r io.ReaderAt, size int64) (*Layout, error) {
	sb := make([]byte, superSize)
	if _, err := r.ReadAt(sb, superOff); err != nil {
		return nil, fmt.Errorf("fsmeta: read superblock: %w", err)
	}
	le := binary.LittleEndian
	if le.Uint16(sb[0x38:]) != ext4Magic {
		return nil, ErrNotExt4
	}
	logBlock := le.Uint32(sb[0x18:])
	if logBlock > 6 {
		return nil, fmt.Errorf("fsmeta: block size 2^%d KiB", logBlock)
	}
	incompat := le.Uint32(sb[0x60:])
	l := &Layout{BlockSize: 1024 << logBlock, inodes: le.Uint32(sb[0x0:]), perGroup: le.Uint32(sb[0x28:])}
	l.blocks = uint64(le.Uint32(sb[0x4:]))
	if incompat&incompat64Bit != 0 {
		l.blocks |= uint64(le.Uint32(sb[0x150:])) << 32
	}
	firstData := uint64(le.Uint32(sb[0x14:]))
	perGroupBlocks := uint64(le.Uint32(sb[0x20:]))
	l.inodeSize = inodeSizeV
	if le.Uint32(sb[0x4C:]) >= 1 {
		l.inodeSize = int64(le.Uint16(sb[0x58:]))
	}
	switch {
	case l.blocks == 0 || l.blocks > uint64(size)/uint64(l.BlockSize):
		return nil, fmt.Errorf("fsmeta: %d blocks of %d bytes on a device of %d bytes", l.blocks, l.BlockSize, size)
	case firstData >= l.blocks:
		return nil, fmt.Errorf("fsmeta: first data block %d of %d", firstData, l.blocks)
	case perGroupBlocks == 0 || perGroupBlocks > 8*uint64(l.BlockSize):
		return nil, fmt.Errorf("fsmeta: %d blocks per group", perGroupBlocks)
	case l.inodeSize < inodeSizeV || l.inodeSize > l.BlockSize || l.inodeSize&(l.inodeSize-1) != 0:
		return nil, fmt.Errorf("fsmeta: inode size %d", l.inodeSize)
	case l.perGroup == 0 || int64(l.perGroup) > 8*l.BlockSize:
		return nil, fmt.Errorf("fsmeta: %d inodes per group", l.perGroup)
	case incompat&incompatMetaBG != 0:
		return nil, errors.New("fsmeta: meta_bg group descriptors are not supported")
	}
	groups := (l.blocks - firstData + perGroupBlocks - 1) / perGroupBlocks
	if groups > maxGroups || uint64(l.inodes) > groups*uint64(l.perGroup) {
		return nil, fmt.Errorf("fsmeta: %d groups with %d inodes", groups, l.inodes)
	}
	descSize := int64(32)
	if incompat&incompat64Bit != 0 {
		descSize = int64(le.Uint16(sb[0xFE:]))
		if descSize < 64 || descSize > 1024 || descSize&(descSize-1) != 0 {
			return nil, fmt.Errorf("fsmeta: group descriptor size %d", descSize)
		}
	}
	csum := le.Uint32(sb[0x64:])&(roCompatGDTCsum|roCompatMetaCsum) != 0
	gdtOff := int64(firstData+1) * l.BlockSize
	gdt := make([]byte, int64(groups)*descSize)
	if _, err := r.ReadAt(gdt, gdtOff); err != nil {
		return nil, fmt.Errorf("fsmeta: read group descriptors: %w", err)
	}
	l.static = []Extent{{0, gdtOff + roundUp(int64(len(gdt)), l.BlockSize)}}
	tableBlocks := (int64(l.perGroup)*l.inodeSize + l.BlockSize - 1) / l.BlockSize
	for g := range groups {
		d := gdt[int64(g)*descSize:]
		blk := uint64(le.Uint32(d[0x8:]))
		unused := uint32(le.Uint16(d[0x1C:]))
		if descSize >= 64 {
			blk |= uint64(le.Uint32(d[0x28:])) << 32
			unused |= uint32(le.Uint16(d[0x32:])) << 16
		}
		if blk == 0 || blk+uint64(tableBlocks) > l.blocks {
			return nil, fmt.Errorf("fsmeta: group %d: inode table at block %d", g, blk)
		}
		used := l.perGroup
		if csum {
			if le.Uint16(d[0x12:])&bgInodeUninit != 0 {
				continue
			}
			if unused > l.perGroup {
				return nil, fmt.Errorf("fsmeta: group %d: %d unused inodes of %d", g, unused, l.perGroup)
			}
			used -= unused
		}
		first := uint32(g)*l.perGroup + 1
		if uint64(first) > uint64(l.inodes) {
			break
		}
		used = min(used, l.inodes-first+1)
		if used > 0 {
			l.tables = append(l.tables, table{ino: first, n: used, off: int64(blk) * l.BlockSize})
		}
	}
	// Inode tables must not overlap: their bytes then add up to less than the device's.
	byOff := slices.SortedFunc(slices.Values(l.tables), func(a, b table) int { return cmp.Compare(a.off, b.off) })
	for i := 1; i < len(byOff); i++ {
		if prev := byOff[i-1]; prev.off+int64(prev.n)*l.inodeSize > byOff[i].off {
			return nil, fmt.Errorf("fsmeta: the inode tables at bytes %d and %d overlap", prev.off, byOff[i].off)
		}
	}
	return l, nil
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// Tables returns the superblock and group descriptor blocks and the used parts of the inode tables (whole blocks):
// what Scan reads.
func (l *Layout) Tables() []Extent {
	out := slices.Clone(l.static)
	for _, t := range l.tables {
		out = append(out, Extent{t.off, roundUp(int64(t.n)*l.inodeSize, l.BlockSize)})
	}
	return Merge(out)
}

// Scan reads the used inode tables through r and returns the blocks of directories (and the extent tree blocks
// that map them), the extent tree blocks of other files, extended attribute blocks and the blocks of symlinks
// too long to live in their inode, merged. It stops after about max bytes, read or found (the lowest inode numbers
// come first). The tree blocks of a deep directory are read through r to find its blocks.
func (l *Layout) Scan(r io.ReaderAt, max int64) ([]Extent, error) {
	s := &scan{l: l, r: r, max: max}
	buf := make([]byte, readChunk)
	var read int64
	for _, t := range l.tables {
		size := int64(t.n) * l.inodeSize
		for done := int64(0); done < size && s.total < max && read < max; {
			b := buf[:min(int64(len(buf)), size-done)]
			if _, err := r.ReadAt(b, t.off+done); err != nil {
				return nil, fmt.Errorf("fsmeta: read inode table at %d: %w", t.off+done, err)
			}
			for i := int64(0); i+l.inodeSize <= int64(len(b)); i += l.inodeSize {
				ino := t.ino + uint32((done+i)/l.inodeSize)
				if err := s.inode(ino, b[i:i+l.inodeSize]); errors.Is(err, errEnough) {
					return Merge(s.out), nil
				} else if err != nil {
					return nil, err
				}
			}
			done += int64(len(b))
			read += int64(len(b))
		}
	}
	return Merge(s.out), nil
}

// FileExtent is a part of a regular file's data: the device bytes Extent hold the file's bytes from Logical on.
// Ino and Gen name the file (its inode number and generation), as a file handle of the filesystem does.
type FileExtent struct {
	Extent
	Ino, Gen uint32
	Logical  int64
}

// Files returns the parts of regular files' data that lie in want, sorted by device offset. It reads only the
// parts of the inode tables, and the extent tree blocks, that lie in meta: a file whose inode, or a tree block
// that maps a part of it, lies outside is not found. want would be what a container's start read, and meta that
// with the metadata the kernel had cached before: reading no more costs no more than the start did. want and
// meta are extents sorted by offset, not overlapping (see Merge). Extents not yet written (uninitialised, read
// as zeros) are left out.
func (l *Layout) Files(r io.ReaderAt, want, meta []Extent) ([]FileExtent, error) {
	var out []FileExtent
	in := func(es []Extent, e Extent) int {
		i, _ := slices.BinarySearchFunc(es, e.Off, func(w Extent, off int64) int { return cmp.Compare(w.End(), off+1) })
		return i
	}
	s := &scan{l: l, r: r, max: math.MaxInt64}
	s.files = func(ino, gen uint32, logical, blk, n uint64) {
		e := Extent{int64(blk) * l.BlockSize, int64(n) * l.BlockSize}
		for i := in(want, e); i < len(want) && want[i].Off < e.End(); i++ {
			off, end := max(e.Off, want[i].Off), min(e.End(), want[i].End())
			if end > off {
				out = append(out, FileExtent{Extent{off, end - off}, ino, gen, int64(logical)*l.BlockSize + off - e.Off})
			}
		}
	}
	s.node = func(blk uint64) bool {
		e := Extent{int64(blk) * l.BlockSize, l.BlockSize}
		i := in(meta, e)
		return i < len(meta) && meta[i].Off <= e.Off && meta[i].End() >= e.End()
	}
	var buf []byte
	for _, t := range l.tables {
		table := Extent{t.off, int64(t.n) * l.inodeSize}
		for i := in(meta, table); i < len(meta) && meta[i].Off < table.End(); i++ {
			// The inodes of the table that lie in meta[i], whole.
			from := (max(meta[i].Off, table.Off) - table.Off + l.inodeSize - 1) / l.inodeSize * l.inodeSize
			to := (min(meta[i].End(), table.End()) - table.Off) / l.inodeSize * l.inodeSize
			for from < to {
				n := min(to-from, readChunk)
				if int64(len(buf)) < n {
					buf = make([]byte, readChunk)
				}
				b := buf[:n]
				if _, err := r.ReadAt(b, table.Off+from); err != nil {
					return nil, fmt.Errorf("fsmeta: read inode table at %d: %w", table.Off+from, err)
				}
				for k := int64(0); k < n; k += l.inodeSize {
					if err := s.inode(t.ino+uint32((from+k)/l.inodeSize), b[k:k+l.inodeSize]); err != nil {
						return nil, err
					}
				}
				from += n
			}
		}
	}
	slices.SortFunc(out, func(a, b FileExtent) int { return cmp.Compare(a.Off, b.Off) })
	return out, nil
}

type scan struct {
	l     *Layout
	r     io.ReaderAt
	max   int64
	total int64
	out   []Extent
	xattr map[uint64]bool
	nodes int // extent tree blocks read for the current inode
	// files, when set, makes the scan follow the extent trees of regular files only and hand it their leaves
	// (the file's logical block, the first device block, the length in blocks) instead of recording blocks.
	files func(ino, gen uint32, logical, blk, n uint64)
	node  func(blk uint64) bool // with files: whether to read the extent tree block blk
	gen   uint32                // generation of the current inode
}

// errEnough stops a scan that found max bytes.
var errEnough = errors.New("fsmeta: enough found")

// add records n blocks at blk, which must lie in the filesystem.
func (s *scan) add(ino uint32, blk, n uint64) error {
	if s.total >= s.max {
		return errEnough
	}
	if n == 0 {
		return nil
	}
	if blk >= s.l.blocks || n > s.l.blocks-blk {
		return fmt.Errorf("fsmeta: inode %d: blocks %d+%d outside the filesystem's %d", ino, blk, n, s.l.blocks)
	}
	e := Extent{int64(blk) * s.l.BlockSize, int64(n) * s.l.BlockSize}
	s.out = append(s.out, e)
	s.total += e.Len
	return nil
}

func (s *scan) inode(ino uint32, b []byte) error {
	le := binary.LittleEndian
	mode := le.Uint16(b[0x0:])
	if mode == 0 || le.Uint16(b[0x1A:]) == 0 {
		return nil // free
	}
	flags := le.Uint32(b[0x20:])
	if s.files != nil {
		if mode&modeType != modeRegular || flags&flagInline != 0 || flags&flagExtents == 0 {
			return nil
		}
		s.nodes, s.gen = 0, le.Uint32(b[0x64:])
		return s.tree(ino, b[0x28:0x28+60], true, 0)
	}
	if acl := uint64(le.Uint32(b[0x68:])) | uint64(le.Uint16(b[0x76:]))<<32; acl != 0 {
		if s.xattr == nil {
			s.xattr = map[uint64]bool{}
		}
		if !s.xattr[acl] {
			s.xattr[acl] = true
			if err := s.add(ino, acl, 1); err != nil {
				return err
			}
		}
	}
	if flags&flagInline != 0 || flags&flagExtents == 0 {
		return nil // data in the inode, or block maps (not followed)
	}
	size := uint64(le.Uint32(b[0x4:])) | uint64(le.Uint32(b[0x6C:]))<<32
	s.nodes = 0
	root := b[0x28 : 0x28+60]
	switch mode & modeType {
	case modeDir:
		return s.tree(ino, root, true, 0)
	case modeSymlink:
		if size >= 60 {
			return s.tree(ino, root, true, 0)
		}
		return nil
	default:
		return s.tree(ino, root, false, 0)
	}
}

// tree records the blocks of the extent tree node b at depth level: with data, the blocks it maps (reading deeper
// nodes through r); without, only the nodes below the inode (the blocks a read of the file looks up first).
func (s *scan) tree(ino uint32, b []byte, data bool, level int) error {
	le := binary.LittleEndian
	if len(b) < 12 || le.Uint16(b[0:]) != extentMag {
		return fmt.Errorf("fsmeta: inode %d: bad extent header", ino)
	}
	entries, depth := int(le.Uint16(b[2:])), int(le.Uint16(b[6:]))
	if depth > maxDepth || level > maxDepth || 12+12*entries > len(b) {
		return fmt.Errorf("fsmeta: inode %d: extent node of depth %d with %d entries", ino, depth, entries)
	}
	if data && entries > maxDirExts {
		entries = maxDirExts
	}
	for i := range entries {
		e := b[12+12*i:]
		if depth == 0 {
			if !data {
				return nil
			}
			n := uint64(le.Uint16(e[4:]))
			if n > 32768 {
				continue // uninitialised: reads as zeros
			}
			start := uint64(le.Uint16(e[6:]))<<32 | uint64(le.Uint32(e[8:]))
			if s.files != nil {
				if start >= s.l.blocks || n > s.l.blocks-start {
					return fmt.Errorf("fsmeta: inode %d: blocks %d+%d outside the filesystem's %d", ino, start, n, s.l.blocks)
				}
				s.files(ino, s.gen, uint64(le.Uint32(e[0:])), start, n)
				continue
			}
			if err := s.add(ino, start, n); err != nil {
				return err
			}
			continue
		}
		child := uint64(le.Uint32(e[4:])) | uint64(le.Uint16(e[8:]))<<32
		if s.files != nil {
			if child >= s.l.blocks {
				return fmt.Errorf("fsmeta: inode %d: extent node at block %d outside the filesystem's %d", ino, child, s.l.blocks)
			}
			if !s.node(child) {
				continue
			}
		} else if err := s.add(ino, child, 1); err != nil {
			return err
		}
		if !data {
			continue // the first level below the inode is what a read looks up first
		}
		if s.nodes++; s.nodes > maxTreeBlk {
			return fmt.Errorf("fsmeta: inode %d: more than %d extent tree blocks", ino, maxTreeBlk)
		}
		node := make([]byte, s.l.BlockSize)
		if _, err := s.r.ReadAt(node, int64(child)*s.l.BlockSize); err != nil {
			return fmt.Errorf("fsmeta: inode %d: read extent node: %w", ino, err)
		}
		if err := s.tree(ino, node, data, level+1); err != nil {
			return err
		}
	}
	return nil
}

// Merge sorts extents and joins those that overlap or touch.
func Merge(es []Extent) []Extent {
	slices.SortFunc(es, func(a, b Extent) int { return cmp.Compare(a.Off, b.Off) })
	var out []Extent
	for _, e := range es {
		if e.Len <= 0 {
			continue
		}
		if n := len(out); n > 0 && e.Off <= out[n-1].End() {
			out[n-1].Len = max(out[n-1].End(), e.End()) - out[n-1].Off
			continue
		}
		out = append(out, e)
	}
	return out
}
