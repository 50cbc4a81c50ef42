package erofs

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"time"
)

// Bounds on what reading an image may make this package do.
const (
	maxDirSize     = 64 << 20 // bytes of one directory: a million entries of 50-byte names
	maxSymlinkSize = blockSize - 1
)

// image reads the EROFS image on r.
type image struct {
	r  io.ReaderAt
	sb superblock
}

func openImage(r io.ReaderAt, size int64) (*image, error) {
	sb, err := readSuperblock(r)
	if err != nil {
		return nil, err
	}
	if int64(sb.blocks)*blockSize > size {
		return nil, corrupt("%d blocks on a disk of %d bytes", sb.blocks, size)
	}
	if sb.metaBlkaddr > sb.blocks || sb.xattrBlkaddr > sb.blocks {
		return nil, corrupt("metadata at block %d, shared xattrs at block %d, in an image of %d blocks", sb.metaBlkaddr, sb.xattrBlkaddr, sb.blocks)
	}
	return &image{r: r, sb: sb}, nil
}

func (im *image) end() int64 { return int64(im.sb.blocks) * blockSize }

// readFull reads len(p) bytes at off, which must lie inside the image.
func (im *image) readFull(p []byte, off int64, what string) error {
	if off < 0 || off+int64(len(p)) > im.end() || off+int64(len(p)) < off {
		return corrupt("%s at %d (%d bytes) lies outside the image of %d blocks", what, off, len(p), im.sb.blocks)
	}
	n, err := im.r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("erofs: read %s at %d: %w", what, off, err)
}

// iloc is where inode nid lies.
func (im *image) iloc(nid uint64) (int64, error) {
	if nid >= 1<<40 {
		return 0, corrupt("inode number %d out of range", nid)
	}
	return int64(im.sb.metaBlkaddr)*blockSize + int64(nid)<<slotBits, nil
}

// readInode reads inode nid with its xattrs, and for directories and symlinks its inline data.
func (im *image) readInode(nid uint64) (*inode, error) {
	pos, err := im.iloc(nid)
	if err != nil {
		return nil, err
	}
	var b [extendedSize]byte
	if err := im.readFull(b[:compactSize], pos, "inode"); err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	format := le.Uint16(b[0:])
	in := &inode{nid: nid, layout: int(format>>1) & 7, mode: uint32(le.Uint16(b[4:]))}
	if format&^0x1f != 0 {
		return nil, corrupt("inode %d: format %#x", nid, format)
	}
	if format&1 == 0 {
		in.isize = compactSize
		in.size = uint64(le.Uint32(b[8:]))
		in.mtime = time.Unix(int64(im.sb.epoch)+int64(le.Uint32(b[12:])), int64(im.sb.fixedNsec)%1e9)
		in.startBlk = le.Uint32(b[16:])
		in.ino = le.Uint32(b[20:])
		in.uid, in.gid = uint32(le.Uint16(b[24:])), uint32(le.Uint16(b[26:]))
	} else {
		in.isize = extendedSize
		if err := im.readFull(b[compactSize:], pos+compactSize, "inode"); err != nil {
			return nil, err
		}
		in.size = le.Uint64(b[8:])
		in.startBlk = le.Uint32(b[16:])
		in.ino = le.Uint32(b[20:])
		in.uid, in.gid = le.Uint32(b[24:]), le.Uint32(b[28:])
		sec, nsec := le.Uint64(b[32:]), le.Uint32(b[40:])
		if sec > 1<<62 || nsec >= 1e9 {
			return nil, corrupt("inode %d: mtime %d.%09d", nid, sec, nsec)
		}
		in.mtime = time.Unix(int64(sec), int64(nsec))
	}
	in.rdev = in.startBlk
	if icount := le.Uint16(b[2:]); icount > 0 {
		in.xattrSize = xattrHeader + 4*(int(icount)-1)
		if err := im.readXattrs(in, pos+int64(in.isize)); err != nil {
			return nil, err
		}
	}
	switch in.mode & ModeTypeMask {
	case ModeDir, ModeSymlink:
		switch in.layout {
		case layoutFlatPlain:
		case layoutFlatInline:
			nblocks := (in.size + blockSize - 1) / blockSize
			tail := in.size - (max(nblocks, 1)-1)*blockSize
			at := pos + int64(in.isize+in.xattrSize)
			if at%blockSize+int64(tail) > blockSize {
				return nil, corrupt("inode %d: inline data of %d bytes crosses a block boundary", nid, tail)
			}
			in.inlineData = make([]byte, tail)
			if err := im.readFull(in.inlineData, at, "inline data"); err != nil {
				return nil, err
			}
		default:
			return nil, corrupt("inode %d: data layout %d for a directory or symlink: not supported", nid, in.layout)
		}
	case ModeRegular, ModeChar, ModeBlock, ModeFIFO, ModeSocket:
	default:
		return nil, corrupt("inode %d: mode %#o", nid, in.mode)
	}
	return in, nil
}

// readXattrs reads the xattr body of in, which starts at pos.
func (im *image) readXattrs(in *inode, pos int64) error {
	body := make([]byte, in.xattrSize)
	if err := im.readFull(body, pos, "xattrs"); err != nil {
		return err
	}
	shared := int(body[4])
	off := xattrHeader + 4*shared
	if off > len(body) {
		return corrupt("inode %d: %d shared xattrs in an xattr body of %d bytes", in.nid, shared, len(body))
	}
	for i := range shared {
		id := binary.LittleEndian.Uint32(body[xattrHeader+4*i:])
		at := int64(im.sb.xattrBlkaddr)*blockSize + int64(id)*4
		var hdr [4]byte
		if err := im.readFull(hdr[:], at, "shared xattr"); err != nil {
			return err
		}
		e := make([]byte, 4+int(hdr[0])+int(binary.LittleEndian.Uint16(hdr[2:])))
		if err := im.readFull(e, at, "shared xattr"); err != nil {
			return err
		}
		x, _, err := parseXattr(e, in.nid)
		if err != nil {
			return err
		}
		in.xattrs = append(in.xattrs, x)
	}
	for off < len(body) {
		x, n, err := parseXattr(body[off:], in.nid)
		if err != nil {
			return err
		}
		in.xattrs = append(in.xattrs, x)
		off += n
	}
	return nil
}

// parseXattr parses the xattr entry at the start of b and returns its aligned size.
func parseXattr(b []byte, nid uint64) (xattr, int, error) {
	if len(b) < 4 {
		return xattr{}, 0, corrupt("inode %d: truncated xattr entry", nid)
	}
	nameLen, index, valueLen := int(b[0]), b[1], int(binary.LittleEndian.Uint16(b[2:]))
	if 4+nameLen+valueLen > len(b) {
		return xattr{}, 0, corrupt("inode %d: xattr entry of %d bytes past its body", nid, 4+nameLen+valueLen)
	}
	if int(index) >= len(xattrPrefixes) || xattrPrefixes[index] == "" {
		return xattr{}, 0, corrupt("inode %d: xattr name index %d: not supported", nid, index)
	}
	name := xattrPrefixes[index] + string(b[4:4+nameLen])
	value := bytes.Clone(b[4+nameLen : 4+nameLen+valueLen])
	n := (4 + nameLen + valueLen + 3) &^ 3
	return xattr{name: name, value: value}, min(n, len(b)), nil
}

// readData reads the whole content of a directory or symlink inode.
func (im *image) readData(in *inode, limit int64) ([]byte, error) {
	if in.size > uint64(limit) {
		return nil, corrupt("inode %d: %d bytes, more than the %d this package reads", in.nid, in.size, limit)
	}
	plain := int64(in.size)
	if in.layout == layoutFlatInline {
		plain -= int64(len(in.inlineData))
	}
	if at := int64(in.startBlk) * blockSize; plain > 0 && at+plain > im.end() {
		return nil, corrupt("inode %d: %d bytes at block %d lie outside the image", in.nid, plain, in.startBlk)
	}
	data := make([]byte, in.size)
	copy(data[plain:], in.inlineData)
	if plain > 0 {
		if err := im.readFull(data[:plain], int64(in.startBlk)*blockSize, "data"); err != nil {
			return nil, err
		}
	}
	return data, nil
}

// dirent is a directory entry as read.
type dirent struct {
	name string
	nid  uint64
	ft   uint8
}

// readDir lists directory in, without "." and "..".
func (im *image) readDir(in *inode) ([]dirent, error) {
	data, err := im.readData(in, maxDirSize)
	if err != nil {
		return nil, err
	}
	var out []dirent
	le := binary.LittleEndian
	prev := ""
	for pos := 0; pos < len(data); pos += blockSize {
		blk := data[pos:min(pos+blockSize, len(data))]
		if len(blk) < direntSize {
			return nil, corrupt("directory %d: block %d of %d bytes", in.nid, pos/blockSize, len(blk))
		}
		first := int(le.Uint16(blk[8:]))
		if first < direntSize || first >= len(blk) || first%direntSize != 0 {
			return nil, corrupt("directory %d: block %d: first name at %d", in.nid, pos/blockSize, first)
		}
		n := first / direntSize
		for i := range n {
			e := blk[i*direntSize:]
			start := int(le.Uint16(e[8:]))
			end := len(blk)
			if i+1 < n {
				end = int(le.Uint16(blk[(i+1)*direntSize+8:]))
			}
			if start < first || end > len(blk) || end <= start {
				return nil, corrupt("directory %d: block %d: entry %d names bytes %d-%d", in.nid, pos/blockSize, i, start, end)
			}
			name := blk[start:end]
			if i+1 == n {
				if z := bytes.IndexByte(name, 0); z >= 0 {
					name = name[:z]
				}
			}
			if len(name) == 0 || len(name) > maxNameLen || bytes.IndexByte(name, '/') >= 0 || bytes.IndexByte(name, 0) >= 0 {
				return nil, corrupt("directory %d: entry name %q", in.nid, name)
			}
			s := string(name)
			if (pos > 0 || i > 0) && s <= prev {
				return nil, corrupt("directory %d: entry %q out of order", in.nid, s)
			}
			prev = s
			if s == "." || s == ".." {
				continue
			}
			ft := e[10]
			if ft == ftUnknown || ft > ftSymlink {
				return nil, corrupt("directory %d: entry %q has file type %d", in.nid, s, ft)
			}
			out = append(out, dirent{name: s, nid: le.Uint64(e[0:]), ft: ft})
		}
	}
	return out, nil
}

// modeOfType returns the file type bits of a directory entry's file type.
func modeOfType(ft uint8) uint32 {
	return [...]uint32{ftReg: ModeRegular, ftDir: ModeDir, ftChr: ModeChar, ftBlk: ModeBlock, ftFIFO: ModeFIFO,
		ftSock: ModeSocket, ftSymlink: ModeSymlink}[ft]
}

// typeOfMode returns the directory entry file type of mode.
func typeOfMode(mode uint32) uint8 {
	switch mode & ModeTypeMask {
	case ModeRegular:
		return ftReg
	case ModeDir:
		return ftDir
	case ModeChar:
		return ftChr
	case ModeBlock:
		return ftBlk
	case ModeFIFO:
		return ftFIFO
	case ModeSocket:
		return ftSock
	case ModeSymlink:
		return ftSymlink
	}
	return ftUnknown
}
