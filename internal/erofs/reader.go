package erofs

import (
	"encoding/binary"
	"fmt"
	"io"
	"path"
	"slices"
	"strings"
)

// maxDepth bounds the nesting of directories Walk follows: a path of PATH_MAX (4096) bytes names at most 2048.
const maxDepth = 2048

// Reader reads the file tree of an EROFS image: what obd's Builder writes (uncompressed flat files), for checking
// a conversion.
type Reader struct{ im *image }

// NewReader opens the EROFS image on r, a disk of size bytes.
func NewReader(r io.ReaderAt, size int64) (*Reader, error) {
	im, err := openImage(r, size)
	if err != nil {
		return nil, err
	}
	return &Reader{im: im}, nil
}

// IsImage reports whether the disk r starts with an EROFS superblock.
func IsImage(r io.ReaderAt) bool {
	var b [4]byte
	_, err := r.ReadAt(b[:], superOffset)
	return err == nil && binary.LittleEndian.Uint32(b[:]) == superMagic
}

// File is an inode of an image.
type File struct {
	Stat
	Nid          uint64 // the inode's number: paths with the same Nid are hardlinks
	Target       string // symlink target
	Major, Minor uint32 // device number of character and block devices
	Xattrs       map[string]string
	in           *inode
	r            *Reader
}

// Open returns the content of a regular file.
func (f *File) Open() (io.Reader, error) {
	if f.Mode&ModeTypeMask != ModeRegular {
		return nil, fmt.Errorf("erofs: inode %d is not a regular file", f.Nid)
	}
	switch f.in.layout {
	case layoutFlatPlain:
		at := int64(f.in.startBlk) * blockSize
		if f.Size > 0 && at+f.Size > f.r.im.end() {
			return nil, corrupt("inode %d: %d bytes at block %d lie outside the image", f.Nid, f.Size, f.in.startBlk)
		}
		return io.NewSectionReader(f.r.im.r, at, f.Size), nil
	case layoutFlatInline:
		// Full blocks, then the tail after the inode.
		in := f.in
		nblocks := (in.size + blockSize - 1) / blockSize
		tail := int64(in.size - (max(nblocks, 1)-1)*blockSize)
		pos, err := f.r.im.iloc(in.nid)
		if err != nil {
			return nil, err
		}
		at := pos + int64(in.isize+in.xattrSize)
		if at%blockSize+tail > blockSize {
			return nil, corrupt("inode %d: inline data of %d bytes crosses a block boundary", in.nid, tail)
		}
		return io.MultiReader(io.NewSectionReader(f.r.im.r, int64(in.startBlk)*blockSize, f.Size-tail),
			io.NewSectionReader(f.r.im.r, at, tail)), nil
	}
	return nil, fmt.Errorf("erofs: inode %d: data layout %d (compressed or chunked) is not read by obd", f.Nid, f.in.layout)
}

// Walk calls fn for every path of the image, "/" first, each directory before its entries, entries in name order.
// A directory reached twice, or nested deeper than a path can name (maxDepth), is an error.
func (r *Reader) Walk(fn func(p string, f *File) error) error {
	seen := map[uint64]bool{}
	var walk func(p string, nid uint64, depth int) error
	walk = func(p string, nid uint64, depth int) error {
		if depth > maxDepth {
			return corrupt("%s: directories nested more than %d deep", p, maxDepth)
		}
		in, err := r.im.readInode(nid)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		f := &File{Stat: Stat{Mode: in.mode, UID: in.uid, GID: in.gid, Size: int64(in.size), Mtime: in.mtime}, Nid: nid, in: in, r: r}
		for _, x := range in.xattrs {
			if f.Xattrs == nil {
				f.Xattrs = map[string]string{}
			}
			f.Xattrs[x.name] = string(x.value)
		}
		switch in.mode & ModeTypeMask {
		case ModeSymlink:
			t, err := r.im.readData(in, maxSymlinkSize)
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			f.Target = string(t)
		case ModeChar, ModeBlock:
			f.Major, f.Minor = (in.rdev>>8)&0xfff, in.rdev&0xff|(in.rdev>>12)&^0xff
		}
		if err := fn(p, f); err != nil {
			return err
		}
		if in.mode&ModeTypeMask != ModeDir {
			return nil
		}
		if seen[nid] {
			return corrupt("directory %d is reached twice", nid)
		}
		seen[nid] = true
		ents, err := r.im.readDir(in)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		slices.SortFunc(ents, func(a, b dirent) int { return strings.Compare(a.name, b.name) })
		for _, e := range ents {
			if err := walk(path.Join(p, e.name), e.nid, depth+1); err != nil {
				return err
			}
		}
		return nil
	}
	return walk("/", uint64(r.im.sb.rootNid), 0)
}
