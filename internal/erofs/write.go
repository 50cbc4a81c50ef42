package erofs

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"strings"
)

// dirJob is a directory whose entries are written, with its parent (for "..").
type dirJob struct{ dir, parent *node }

// layout is what Close writes.
type layout struct {
	moved   []*node // inodes written at new nids: new ones, and lower directories that outgrew their slot
	inplace []*node // lower directories (and the root) rewritten at their nid
	dirs    []dirJob
	seen    map[*node]bool
	lowers  map[uint64]bool // lower directories rewritten
	added   uint64          // new inodes
}

// Close writes the layer's metadata: the new inodes and directories after the data written so far, the
// inodes of changed lower directories in place, then the superblock. The Builder cannot be used after.
func (b *Builder) Close() error {
	if b.closed {
		return errClosed
	}
	b.closed = true
	l := &layout{seen: map[*node]bool{}, lowers: map[uint64]bool{}}
	if _, err := b.markMoves(b.root); err != nil {
		return err
	}
	if err := b.collect(l, b.root, b.root, false); err != nil {
		return err
	}
	for _, n := range append(slices.Clone(l.moved), l.inplace...) {
		ib, err := encodeXattrs(n.xattrs)
		if err != nil {
			return err
		}
		n.ibody = ib
	}
	for _, n := range l.inplace {
		slot := blockSize
		if n.lower != nil {
			slot = n.lower.slot()
		}
		if n.inodeSize() > slot {
			return fmt.Errorf("erofs: inode %d with its xattrs (%d bytes) does not fit its slot of %d bytes", n.nid, n.inodeSize(), slot)
		}
	}

	// Inodes first, none crossing a block boundary, then the directories' blocks.
	start := int64(b.next) * blockSize
	metaBase := int64(b.sb.metaBlkaddr) * blockSize
	pos := start
	for _, n := range l.moved {
		size := int64(n.inodeSize())
		if size > blockSize {
			return fmt.Errorf("erofs: an inode with %d bytes of xattrs does not fit a block", len(n.ibody))
		}
		pos = (pos + slotSize - 1) &^ (slotSize - 1)
		if pos%blockSize+size > blockSize {
			pos = (pos + blockSize - 1) &^ (blockSize - 1)
		}
		n.nid, n.placed = uint64(pos-metaBase)>>slotBits, true
		pos += size
	}
	blk := uint64(pos+blockSize-1) / blockSize
	dirBlocks := make([][][]byte, len(l.dirs))
	for i, j := range l.dirs {
		blocks, size := dirData(j)
		j.dir.dirBlk, j.dir.dirSize = uint32(blk), size
		dirBlocks[i] = blocks
		blk += uint64(len(blocks))
	}
	if err := b.reserve(blk - b.next); err != nil {
		return err
	}
	b.next = blk

	meta := make([]byte, int64(b.next)*blockSize-start)
	for _, n := range l.moved {
		off := int64(n.nid)<<slotBits + metaBase - start
		copy(meta[off:], b.encodeInode(n))
	}
	for i, j := range l.dirs {
		off := int64(j.dir.dirBlk)*blockSize - start
		for _, blk := range dirBlocks[i] {
			copy(meta[off:], blk)
			off += blockSize
		}
	}
	if _, err := b.dev.WriteAt(meta, start); err != nil {
		return fmt.Errorf("erofs: write metadata: %w", err)
	}
	for _, n := range l.inplace {
		if _, err := b.dev.WriteAt(b.encodeInode(n), int64(n.nid)<<slotBits+metaBase); err != nil {
			return fmt.Errorf("erofs: write inode %d: %w", n.nid, err)
		}
	}
	b.sb.blocks = uint32(b.next)
	b.sb.inos += l.added
	if _, err := b.dev.WriteAt(b.sb.encode(), superOffset); err != nil {
		return fmt.Errorf("erofs: write superblock: %w", err)
	}
	return nil
}

// collect walks the directories whose entries are known and lists what Close writes. A lower directory that
// changed is rewritten in place if its new inode fits where the old one was, else moved; the subdirectories of a
// moved directory are rewritten too (their ".." changes).
func (b *Builder) collect(l *layout, n, parent *node, parentMoved bool) error {
	var moved bool
	switch {
	case !n.lowered:
		if l.seen[n] {
			return nil // another name of a hardlinked inode
		}
		l.seen[n] = true
		l.added++
		n.ino = uint32(b.sb.inos + l.added)
		if n == b.root {
			n.nid, n.placed = rootNid, true
			l.inplace = append(l.inplace, n)
		} else {
			l.moved = append(l.moved, n)
		}
		if !n.isDir() {
			return nil
		}
		moved = true
	case !n.isDir():
		return nil
	case n.changed || parentMoved:
		if l.lowers[n.lowerNid] {
			return corrupt("directory %d is reached twice", n.lowerNid)
		}
		l.lowers[n.lowerNid] = true
		if err := b.load(n); err != nil {
			return err
		}
		if _, err := b.entries(n); err != nil {
			return err
		}
		fits, err := fitsSlot(n)
		if err != nil {
			return err
		}
		if n != b.root && (n.moves || !fits) {
			moved = true
			l.moved = append(l.moved, n)
		} else {
			n.nid, n.placed = n.lowerNid, true
			l.inplace = append(l.inplace, n)
		}
	case n.children == nil:
		return nil // unchanged, and nothing below it was looked at
	default:
		for _, name := range slices.Sorted(maps.Keys(n.children)) {
			if err := b.collect(l, n.children[name], n, false); err != nil {
				return err
			}
		}
		return nil
	}
	l.dirs = append(l.dirs, dirJob{dir: n, parent: parent})
	for _, name := range slices.Sorted(maps.Keys(n.children)) {
		if err := b.collect(l, n.children[name], n, moved); err != nil {
			return err
		}
	}
	return nil
}

// markMoves finds the changed lower directories below n (n included) whose new inode does not fit where the old
// one was: they move to a new nid, so their parents are rewritten too. It reports whether n moves.
func (b *Builder) markMoves(n *node) (bool, error) {
	if !n.lowered || !n.isDir() || (n.children == nil && !n.changed) {
		return false, nil
	}
	for _, c := range n.children {
		moves, err := b.markMoves(c)
		if err != nil {
			return false, err
		}
		if moves {
			n.changed = true
		}
	}
	if !n.changed || n == b.root {
		return false, nil
	}
	fits, err := fitsSlot(n)
	n.moves = !fits
	return n.moves, err
}

// fitsSlot reports whether the new inode of lower directory n fits the bytes its old inode took.
func fitsSlot(n *node) (bool, error) {
	ib, err := encodeXattrs(n.xattrs)
	return extendedSize+len(ib) <= n.lower.slot(), err
}

// nidOf is the nid a directory entry for n holds.
func nidOf(n *node) uint64 {
	if n.placed {
		return n.nid
	}
	return n.lowerNid
}

// dirData returns the blocks of a directory (entries sorted by name, "." and ".." among them) and its size, and
// counts the links of its entries.
func dirData(j dirJob) ([][]byte, int64) {
	type ent struct {
		name string
		n    *node
	}
	ents := []ent{{".", j.dir}, {"..", j.parent}}
	subdirs := uint32(0)
	for name, c := range j.dir.children {
		ents = append(ents, ent{name, c})
		if c.isDir() {
			subdirs++
		} else if !c.lowered {
			c.nlink++
		}
	}
	j.dir.nlink = 2 + subdirs
	slices.SortFunc(ents, func(a, b ent) int { return strings.Compare(a.name, b.name) })
	var blocks [][]byte
	last := 0
	for len(ents) > 0 {
		k, used := 0, 0
		for k < len(ents) && used+direntSize+len(ents[k].name) <= blockSize {
			used += direntSize + len(ents[k].name)
			k++
		}
		blk := make([]byte, blockSize)
		nameOff := direntSize * k
		for i, e := range ents[:k] {
			d := blk[i*direntSize:]
			binary.LittleEndian.PutUint64(d[0:], nidOf(e.n))
			binary.LittleEndian.PutUint16(d[8:], uint16(nameOff))
			d[10] = typeOfMode(e.n.mode)
			nameOff += copy(blk[nameOff:], e.name)
		}
		blocks = append(blocks, blk)
		last, ents = used, ents[k:]
	}
	return blocks, int64(len(blocks)-1)*blockSize + int64(last)
}

// encodeInode returns the extended inode of n with its xattrs and inline data.
func (b *Builder) encodeInode(n *node) []byte {
	buf := make([]byte, n.inodeSize())
	le := binary.LittleEndian
	layout, size, iu := layoutFlatPlain, n.size, uint32(0)
	switch n.mode & ModeTypeMask {
	case ModeDir:
		size, iu = n.dirSize, n.dirBlk
	case ModeRegular:
		iu = n.blk
	case ModeSymlink:
		if n.inlineTarget() {
			layout = layoutFlatInline
			copy(buf[extendedSize+len(n.ibody):], n.target)
		} else {
			iu = n.blk
		}
	case ModeChar, ModeBlock:
		iu = n.rdev
	}
	le.PutUint16(buf[0:], uint16(1|layout<<1))
	if len(n.ibody) > 0 {
		le.PutUint16(buf[2:], uint16((len(n.ibody)-xattrHeader)/4+1))
	}
	le.PutUint16(buf[4:], uint16(n.mode))
	le.PutUint64(buf[8:], uint64(size))
	le.PutUint32(buf[16:], iu)
	le.PutUint32(buf[20:], n.ino)
	le.PutUint32(buf[24:], n.uid)
	le.PutUint32(buf[28:], n.gid)
	sec, nsec := n.mtime.Unix(), n.mtime.Nanosecond()
	if sec < 0 { // erofs times are unsigned
		sec, nsec = 0, 0
	}
	le.PutUint64(buf[32:], uint64(sec))
	le.PutUint32(buf[40:], uint32(nsec))
	le.PutUint32(buf[44:], n.nlink)
	copy(buf[extendedSize:], n.ibody)
	return buf
}

// encodeXattrs returns the inline xattr body holding x (nil for none), entries sorted by name index and name.
func encodeXattrs(x map[string][]byte) ([]byte, error) {
	if len(x) == 0 {
		return nil, nil
	}
	type entry struct {
		idx           byte
		suffix, value string
	}
	var ents []entry
	for name, v := range x {
		idx, suffix, ok := xattrIndex(name)
		if !ok {
			return nil, fmt.Errorf("erofs: xattr %s cannot be stored", name)
		}
		ents = append(ents, entry{idx, suffix, string(v)})
	}
	slices.SortFunc(ents, func(a, b entry) int {
		return cmp.Or(cmp.Compare(a.idx, b.idx), strings.Compare(a.suffix, b.suffix))
	})
	buf := make([]byte, xattrHeader)
	for _, e := range ents {
		h := []byte{byte(len(e.suffix)), e.idx, 0, 0}
		binary.LittleEndian.PutUint16(h[2:], uint16(len(e.value)))
		buf = append(buf, h...)
		buf = append(buf, e.suffix...)
		buf = append(buf, e.value...)
		for len(buf)%4 != 0 {
			buf = append(buf, 0)
		}
	}
	if (len(buf)-xattrHeader)/4+1 > 0xffff {
		return nil, fmt.Errorf("erofs: %d bytes of xattrs on one inode", len(buf))
	}
	return buf, nil
}
