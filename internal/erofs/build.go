package erofs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"path"
	"slices"
	"strings"
	"syscall"
	"time"
)

// Revision changes whenever the images a Builder writes for the same changes do: converted layers kept by
// revision are not reused across it.
const Revision = 1

// Device is the disk an image is built on.
type Device interface {
	io.ReaderAt
	io.WriterAt
	// Size is the disk's size in bytes.
	Size() int64
}

// Meta is the metadata of an inode that callers set. EROFS keeps one time per inode: the mtime.
type Meta struct {
	// Mode holds the permission bits including setuid, setgid and sticky (07777); file type bits are ignored.
	Mode     uint32
	UID, GID uint32
	Mtime    time.Time
}

// Stat describes an inode.
type Stat struct {
	Mode     uint32 // Linux st_mode: Mode* type bits | permission bits
	UID, GID uint32
	Size     int64
	Mtime    time.Time
}

// IsDir reports whether the inode is a directory.
func (s Stat) IsDir() bool { return s.Mode&ModeTypeMask == ModeDir }

// DirEntry is one entry of a directory listing.
type DirEntry struct {
	Name string
	Mode uint32 // type bits only (Mode*)
}

// Extent is a part of a sparse file that holds data.
type Extent struct{ Offset, Length int64 }

// ErrNoSpace is in the errors of a Builder whose image outgrows its device.
var ErrNoSpace = errors.New("erofs: the image does not fit its disk")

// rootNid is the root inode's slot in the images this package formats: block 1, which the root inode has to
// itself, so that every layer rewrites it in place (the superblock holds the root's nid in 16 bits).
const rootNid = blockSize >> slotBits

const maxSymlinks = 40

// node is an inode of the image being built: a new one, or one of the lower image (lowered set), whose
// metadata and entries are read when needed.
type node struct {
	mode     uint32 // type | permission bits; for a lower node not loaded yet, the type only
	uid, gid uint32
	mtime    time.Time
	size     int64
	rdev     uint32
	ino      uint32
	xattrs   map[string][]byte
	blk      uint32           // first data block: regular files, and symlinks whose target does not fit inline
	target   string           // symlink target
	children map[string]*node // directories whose entries are known
	lowered  bool             // an inode of the lower image, at lowerNid
	lowerNid uint64
	lower    *inode // the lower inode as read, once loaded
	changed  bool   // a lower directory whose metadata or entries changed
	moves    bool   // a changed lower directory whose new inode does not fit its old slot

	// Set while the image is written.
	ibody   []byte
	nid     uint64
	placed  bool
	nlink   uint32
	dirBlk  uint32
	dirSize int64
}

func (n *node) isDir() bool { return n.mode&ModeTypeMask == ModeDir }

// inlineTarget reports whether a symlink's target is stored in its inode.
func (n *node) inlineTarget() bool {
	return n.mode&ModeTypeMask == ModeSymlink && extendedSize+len(n.ibody)+len(n.target) <= blockSize
}

func (n *node) inodeSize() int {
	s := extendedSize + len(n.ibody)
	if n.inlineTarget() {
		s += len(n.target)
	}
	return s
}

// Builder builds one layer's image: the lower image (if any) with what the layer's calls changed. Paths are
// absolute within the filesystem; symlinks in directory components are followed without leaving the root, a
// symlink as the last component is not. Call Close to write the image's metadata; a Builder is not safe for
// concurrent use.
//
// File data is written as it comes, in new blocks after the lower image; Close then appends the new and moved
// inodes and the directories written or changed, and rewrites in place the inodes of changed lower directories
// (their entries in new blocks) and the superblock. A file of the lower image is never changed in place: an entry
// that replaces it is a new inode, and the data of files removed or replaced stay in the lower layers' blocks.
// Hardlinks to a lower file share its inode without updating its link count.
type Builder struct {
	dev    Device
	img    *image // the lower image; nil for the first layer
	sb     superblock
	root   *node
	next   uint64 // next free block
	buf    []byte
	closed bool
}

// Create starts the first layer's image on dev, a zeroed disk; uuid names the filesystem.
func Create(dev Device, uuid [16]byte) (*Builder, error) {
	b := &Builder{dev: dev, next: 2}
	b.sb.rootNid = rootNid
	b.sb.uuid = uuid
	b.root = &node{mode: ModeDir | 0o755, mtime: time.Unix(0, 0), children: map[string]*node{}}
	if err := b.reserve(0); err != nil {
		return nil, err
	}
	return b, nil
}

// Open starts a layer on the image dev holds.
func Open(dev Device) (*Builder, error) {
	img, err := openImage(dev, dev.Size())
	if err != nil {
		return nil, err
	}
	b := &Builder{dev: dev, img: img, sb: img.sb, next: uint64(img.sb.blocks)}
	b.root = &node{mode: ModeDir, lowered: true, lowerNid: uint64(img.sb.rootNid)}
	if err := b.load(b.root); err != nil {
		return nil, fmt.Errorf("erofs: root directory: %w", err)
	}
	if !b.root.isDir() {
		return nil, corrupt("the root inode is not a directory")
	}
	return b, nil
}

// Blocks returns the blocks the image holds so far and the device's blocks.
func (b *Builder) Blocks() (used, total int64) { return int64(b.next), b.dev.Size() / blockSize }

// reserve checks that n more blocks fit after b.next.
func (b *Builder) reserve(n uint64) error {
	if end := b.next + n; end > uint64(b.dev.Size()/blockSize) || end > 1<<32 {
		return fmt.Errorf("%w: %d blocks of %d", ErrNoSpace, end, b.dev.Size()/blockSize)
	}
	return nil
}

// load reads the metadata of a lower node.
func (b *Builder) load(n *node) error {
	if !n.lowered || n.lower != nil {
		return nil
	}
	in, err := b.img.readInode(n.lowerNid)
	if err != nil {
		return err
	}
	if n.mode != 0 && n.mode&ModeTypeMask != in.mode&ModeTypeMask {
		return corrupt("inode %d has mode %#o, its directory entry says %#o", n.lowerNid, in.mode, n.mode)
	}
	n.lower = in
	n.mode, n.uid, n.gid, n.mtime, n.size, n.rdev, n.ino = in.mode, in.uid, in.gid, in.mtime, int64(in.size), in.rdev, in.ino
	for _, x := range in.xattrs {
		if n.xattrs == nil {
			n.xattrs = map[string][]byte{}
		}
		n.xattrs[x.name] = x.value
	}
	if n.mode&ModeTypeMask == ModeSymlink {
		t, err := b.img.readData(in, maxSymlinkSize)
		if err != nil {
			return err
		}
		n.target = string(t)
	}
	return nil
}

// entries makes the entries of directory n known.
func (b *Builder) entries(n *node) (map[string]*node, error) {
	if n.children != nil {
		return n.children, nil
	}
	if !n.lowered {
		n.children = map[string]*node{}
		return n.children, nil
	}
	if err := b.load(n); err != nil {
		return nil, err
	}
	ents, err := b.img.readDir(n.lower)
	if err != nil {
		return nil, err
	}
	n.children = make(map[string]*node, len(ents))
	for _, e := range ents {
		n.children[e.name] = &node{mode: modeOfType(e.ft), lowered: true, lowerNid: e.nid}
	}
	return n.children, nil
}

func pathErr(op, p string, err error) error {
	if err == nil {
		return nil
	}
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return err
	}
	return &fs.PathError{Op: op, Path: p, Err: err}
}

func splitPath(p string) []string {
	var out []string
	for c := range strings.SplitSeq(p, "/") {
		if c != "" && c != "." {
			out = append(out, c)
		}
	}
	return out
}

// walk resolves p. It returns the node, the path it resolved to, and for a missing component ENOENT with the
// path resolved so far followed by the components not found.
func (b *Builder) walk(p string, follow bool) (*node, string, error) {
	comps := splitPath(p)
	stack, names := []*node{b.root}, []string{}
	links := 0
	for i := 0; i < len(comps); i++ {
		c := comps[i]
		if c == ".." {
			if len(stack) > 1 {
				stack, names = stack[:len(stack)-1], names[:len(names)-1]
			}
			continue
		}
		dir := stack[len(stack)-1]
		if !dir.isDir() {
			return nil, "", syscall.ENOTDIR
		}
		ents, err := b.entries(dir)
		if err != nil {
			return nil, "", err
		}
		child := ents[c]
		if child == nil {
			return nil, "/" + path.Join(append(names, comps[i:]...)...), syscall.ENOENT
		}
		if child.mode&ModeTypeMask == ModeSymlink && (i+1 < len(comps) || follow) {
			if links++; links > maxSymlinks {
				return nil, "", syscall.ELOOP
			}
			if err := b.load(child); err != nil {
				return nil, "", err
			}
			if strings.HasPrefix(child.target, "/") {
				stack, names = stack[:1], names[:0]
			}
			comps = append(splitPath(child.target), comps[i+1:]...)
			i = -1
			continue
		}
		stack, names = append(stack, child), append(names, c)
	}
	return stack[len(stack)-1], "/" + path.Join(names...), nil
}

// node resolves p and loads its metadata.
func (b *Builder) node(op, p string, follow bool) (*node, error) {
	if b.closed {
		return nil, pathErr(op, p, errClosed)
	}
	n, _, err := b.walk(p, follow)
	if err == nil {
		err = b.load(n)
	}
	return n, pathErr(op, p, err)
}

var errClosed = errors.New("erofs: builder is closed")

func (n *node) stat() Stat {
	return Stat{Mode: n.mode, UID: n.uid, GID: n.gid, Size: n.size, Mtime: n.mtime}
}

// Lstat describes p without following a final symlink.
func (b *Builder) Lstat(p string) (Stat, error) {
	n, err := b.node("lstat", p, false)
	if err != nil {
		return Stat{}, err
	}
	return n.stat(), nil
}

// Stat describes p, following symlinks.
func (b *Builder) Stat(p string) (Stat, error) {
	n, err := b.node("stat", p, true)
	if err != nil {
		return Stat{}, err
	}
	return n.stat(), nil
}

// Realpath returns p with the symlinks in it resolved within the root, as far as its components exist: the
// first missing one and those after it are kept as they are.
func (b *Builder) Realpath(p string) (string, error) {
	if b.closed {
		return "", pathErr("realpath", p, errClosed)
	}
	_, real, err := b.walk(p, true)
	if errors.Is(err, syscall.ENOENT) {
		err = nil
	}
	return real, pathErr("realpath", p, err)
}

// ReadDir lists directory p (without "." and ".."), sorted by name.
func (b *Builder) ReadDir(p string) ([]DirEntry, error) {
	n, err := b.node("readdir", p, true)
	if err != nil {
		return nil, err
	}
	if !n.isDir() {
		return nil, pathErr("readdir", p, syscall.ENOTDIR)
	}
	ents, err := b.entries(n)
	if err != nil {
		return nil, pathErr("readdir", p, err)
	}
	out := make([]DirEntry, 0, len(ents))
	for _, name := range slices.Sorted(maps.Keys(ents)) {
		out = append(out, DirEntry{Name: name, Mode: ents[name].mode & ModeTypeMask})
	}
	return out, nil
}

// parent resolves the directory of p and returns it with p's last component.
func (b *Builder) parent(op, p string) (*node, string, error) {
	if b.closed {
		return nil, "", pathErr(op, p, errClosed)
	}
	dir, name := path.Split(path.Clean("/" + p))
	if name == "" || name == "." || name == ".." {
		return nil, "", pathErr(op, p, syscall.EINVAL)
	}
	if len(name) > maxNameLen {
		return nil, "", pathErr(op, p, syscall.ENAMETOOLONG)
	}
	if strings.IndexByte(name, 0) >= 0 {
		return nil, "", pathErr(op, p, syscall.EINVAL)
	}
	d, _, err := b.walk(dir, true)
	if err == nil && !d.isDir() {
		err = syscall.ENOTDIR
	}
	if err == nil {
		_, err = b.entries(d)
	}
	if err != nil {
		return nil, "", pathErr(op, p, err)
	}
	return d, name, nil
}

// touch marks a lower directory as changed.
func touch(d *node) {
	if d.lowered {
		d.changed = true
	}
}

// add makes n the entry name of a new path p.
func (b *Builder) add(op, p string, n *node) error {
	d, name, err := b.parent(op, p)
	if err != nil {
		return err
	}
	if d.children[name] != nil {
		return pathErr(op, p, syscall.EEXIST)
	}
	d.children[name] = n
	touch(d)
	return nil
}

func newNode(typ uint32, m Meta) *node {
	return &node{mode: typ | m.Mode&0o7777, uid: m.UID, gid: m.GID, mtime: m.Mtime}
}

// Remove removes p, a directory with everything below it.
func (b *Builder) Remove(p string) error {
	d, name, err := b.parent("remove", p)
	if err != nil {
		return err
	}
	if d.children[name] == nil {
		return pathErr("remove", p, syscall.ENOENT)
	}
	delete(d.children, name)
	touch(d)
	return nil
}

// Mkdir creates directory p.
func (b *Builder) Mkdir(p string, m Meta) error {
	n := newNode(ModeDir, m)
	n.children = map[string]*node{}
	return b.add("mkdir", p, n)
}

// Symlink creates symlink p to target.
func (b *Builder) Symlink(p, target string, m Meta) error {
	if target == "" || len(target) > maxSymlinkSize {
		return pathErr("symlink", p, syscall.ENAMETOOLONG)
	}
	if strings.IndexByte(target, 0) >= 0 {
		return pathErr("symlink", p, syscall.EINVAL)
	}
	n := newNode(ModeSymlink, m)
	n.target, n.size = target, int64(len(target))
	if extendedSize+len(target) > blockSize/2 {
		// A long target goes in a block of its own, so that xattrs set later still fit beside the inode.
		blk, err := b.writeData(strings.NewReader(target), int64(len(target)), []Extent{{0, int64(len(target))}})
		if err != nil {
			return pathErr("symlink", p, err)
		}
		n.blk = blk
	}
	return b.add("symlink", p, n)
}

// Mknod creates a device, FIFO or socket p; typ is ModeChar, ModeBlock, ModeFIFO or ModeSocket.
func (b *Builder) Mknod(p string, typ, major, minor uint32, m Meta) error {
	switch typ {
	case ModeChar, ModeBlock:
	case ModeFIFO, ModeSocket:
		major, minor = 0, 0
	default:
		return pathErr("mknod", p, syscall.EINVAL)
	}
	if major >= 1<<12 || minor >= 1<<20 {
		return pathErr("mknod", p, syscall.EINVAL)
	}
	n := newNode(typ, m)
	n.rdev = minor&0xff | major<<8 | (minor&^0xff)<<12 // the kernel's new_encode_dev
	return b.add("mknod", p, n)
}

// Link makes p another name of existing, which is not a directory.
func (b *Builder) Link(p, existing string) error {
	n, err := b.node("link", existing, false)
	if err != nil {
		return err
	}
	if n.isDir() {
		return pathErr("link", existing, syscall.EPERM)
	}
	return b.add("link", p, n)
}

// modifiable returns the node at p whose metadata may change: a new inode or a lower directory.
func (b *Builder) modifiable(op, p string) (*node, error) {
	n, err := b.node(op, p, false)
	if err != nil {
		return nil, err
	}
	if n.lowered && !n.isDir() {
		return nil, pathErr(op, p, fmt.Errorf("a file of a lower layer is never changed in place: %w", syscall.EROFS))
	}
	touch(n)
	return n, nil
}

// SetMeta sets the mode, owner and mtime of p.
func (b *Builder) SetMeta(p string, m Meta) error {
	n, err := b.modifiable("setmeta", p)
	if err != nil {
		return err
	}
	n.mode = n.mode&ModeTypeMask | m.Mode&0o7777
	n.uid, n.gid, n.mtime = m.UID, m.GID, m.Mtime
	return nil
}

// SetXattr sets xattr name of p. Names are those erofs can store: user., trusted., security. and the POSIX
// ACLs (system.posix_acl_access, system.posix_acl_default).
func (b *Builder) SetXattr(p, name string, value []byte) error {
	idx, suffix, ok := xattrIndex(name)
	if !ok || idx == 5 {
		return pathErr("setxattr", p, fmt.Errorf("xattr %s: erofs stores only user., trusted., security. and POSIX ACL xattrs: %w", name, syscall.ENOTSUP))
	}
	if (suffix == "") != (idx == 2 || idx == 3) || len(suffix) > maxNameLen || len(value) > 0xffff {
		return pathErr("setxattr", p, fmt.Errorf("xattr %s of %d bytes: %w", name, len(value), syscall.ERANGE))
	}
	n, err := b.modifiable("setxattr", p)
	if err != nil {
		return err
	}
	if n.xattrs == nil {
		n.xattrs = map[string][]byte{}
	}
	n.xattrs[name] = bytes.Clone(value)
	return nil
}

// CreateFile creates regular file p with size bytes read from r.
func (b *Builder) CreateFile(p string, m Meta, r io.Reader, size int64) error {
	return b.CreateSparseFile(p, m, r, size, []Extent{{0, size}})
}

// CreateSparseFile creates regular file p of size bytes whose data are the extents listed, in order, read one
// after another from r; the rest reads as zeros and takes no space in the layer.
func (b *Builder) CreateSparseFile(p string, m Meta, r io.Reader, size int64, data []Extent) error {
	if _, _, err := b.parent("create", p); err != nil {
		return err
	}
	if size < 0 {
		return pathErr("create", p, syscall.EINVAL)
	}
	end := int64(0)
	for _, e := range data {
		if e.Offset < end || e.Length < 0 || e.Offset+e.Length > size || e.Offset+e.Length < e.Offset {
			return pathErr("create", p, fmt.Errorf("data extent %d+%d out of order or past the file's %d bytes: %w", e.Offset, e.Length, size, syscall.EINVAL))
		}
		end = e.Offset + e.Length
	}
	n := newNode(ModeRegular, m)
	n.size = size
	if size > 0 {
		blk, err := b.writeData(r, size, data)
		if err != nil {
			return pathErr("create", p, err)
		}
		n.blk = blk
	}
	return b.add("create", p, n)
}

// writeData writes a file of size bytes at the next free blocks: the extents listed, read in order from r; the
// rest is left unwritten (zeros).
func (b *Builder) writeData(r io.Reader, size int64, data []Extent) (uint32, error) {
	nblk := uint64(size+blockSize-1) / blockSize
	if err := b.reserve(nblk); err != nil {
		return 0, err
	}
	const chunk = 1 << 20
	if b.buf == nil {
		b.buf = make([]byte, chunk+blockSize)
	}
	base := int64(b.next) * blockSize
	for _, e := range data {
		for done := int64(0); done < e.Length; {
			n := int(min(chunk, e.Length-done))
			if _, err := io.ReadFull(r, b.buf[:n]); err != nil {
				if err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return 0, err
			}
			w := n
			if off := e.Offset + done + int64(n); off == size && off%blockSize != 0 {
				// The file's last block: zeros after its end.
				w = n + int(blockSize-off%blockSize)
				clear(b.buf[n:w])
			}
			if _, err := b.dev.WriteAt(b.buf[:w], base+e.Offset+done); err != nil {
				return 0, err
			}
			done += int64(n)
		}
	}
	blk := b.next
	b.next += nblk
	return uint32(blk), nil
}
