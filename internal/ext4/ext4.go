// Package ext4 creates and edits ext4 filesystem images in userspace with
// libext2fs, on any Device (e.g. an overlaybd LSMT stack): no root, no mount.
package ext4

/*
#cgo pkg-config: ext2fs com_err
#include "obd.h"
*/
import "C"

import (
	"errors"
	"io/fs"
	"path"
	"runtime/cgo"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// File type bits of Stat.Mode and DirEntry.Mode (Linux S_IF*).
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

const (
	rootIno     = 2
	maxSymlinks = 40
	noLblk      = C.OBD_NO_LBLK
	// maxNameLen is the longest directory entry name ext4 stores.
	maxNameLen = 255
)

var (
	errNoSpace  = syscall.ENOSPC
	errNotExist = syscall.ENOENT
	errNoData   = syscall.ENODATA
	errNotDir   = syscall.ENOTDIR
	errExist    = syscall.EEXIST
	// ErrClosed is returned by every method of a closed FS.
	ErrClosed = errors.New("ext4: filesystem is closed")
)

func errnoErr(n int) error { return syscall.Errno(n) }

var initOnce sync.Once

// Meta is the metadata of an inode that callers set.
type Meta struct {
	// Mode holds the permission bits including setuid, setgid and sticky
	// (07777); file type bits are ignored.
	Mode     uint32
	UID, GID uint32
	// Atime, Mtime and Ctime are stored with nanoseconds. A zero Time
	// means the Unix epoch. New inodes get Ctime as creation time.
	Atime, Mtime, Ctime time.Time
}

// Stat describes an inode.
type Stat struct {
	Ino   uint32
	Mode  uint32 // Linux st_mode: Mode* type bits | permission bits
	Nlink uint32
	UID   uint32
	GID   uint32
	Size  int64
	// Blocks is the allocated space in 512-byte units.
	Blocks       int64
	Major, Minor uint32 // device number of character and block devices
	Flags        uint32 // ext4 inode flags (i_flags)
	Atime        time.Time
	Mtime        time.Time
	Ctime        time.Time
	Crtime       time.Time
}

// IsDir reports whether the inode is a directory.
func (s *Stat) IsDir() bool { return s.Mode&ModeTypeMask == ModeDir }

// FileMode converts Mode to an io/fs FileMode.
func (s *Stat) FileMode() fs.FileMode {
	m := fs.FileMode(s.Mode & 0o777)
	switch s.Mode & ModeTypeMask {
	case ModeDir:
		m |= fs.ModeDir
	case ModeSymlink:
		m |= fs.ModeSymlink
	case ModeChar:
		m |= fs.ModeDevice | fs.ModeCharDevice
	case ModeBlock:
		m |= fs.ModeDevice
	case ModeFIFO:
		m |= fs.ModeNamedPipe
	case ModeSocket:
		m |= fs.ModeSocket
	}
	if s.Mode&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if s.Mode&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if s.Mode&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	return m
}

// DirEntry is one entry of a directory listing.
type DirEntry struct {
	Name string
	Ino  uint32
	Mode uint32 // type bits only (Mode*)
}

// FS is an open ext4 filesystem. Its methods are safe for concurrent use
// but run one at a time. Paths are absolute within the filesystem; symlinks
// in directory components are followed without leaving the root, a symlink
// as the last component is not (except by OpenFile).
type FS struct {
	mu       sync.Mutex
	fs       C.ext2_filsys
	st       *ioState
	h        cgo.Handle
	writable bool
	bs       int64
	zero     []byte // one zero block
	buf      []byte // staging buffer for file data
	dirs     map[uint32]*dirCache
}

// dirCache holds the entries of one directory, loaded on first use, so
// that path lookups never scan directory blocks again.
type dirCache struct {
	ents map[string]dirent
	slow bool   // handled by ext2fs_link/unlink (hash-indexed, inline...)
	hint uint32 // logical block where the last entry was added
}

type dirent struct {
	ino  uint32
	lblk uint32 // logical directory block holding the entry, or noLblk
	mode uint32 // type bits
}

// ftypeOf maps file type bits to ext4 directory entry types (EXT2_FT_*).
var ftypeOf = map[uint32]C.int{
	ModeRegular: 1, ModeDir: 2, ModeChar: 3, ModeBlock: 4,
	ModeFIFO: 5, ModeSocket: 6, ModeSymlink: 7,
}

// modeOfFtype is the inverse of ftypeOf.
var modeOfFtype = [8]uint32{0, ModeRegular, ModeDir, ModeChar, ModeBlock, ModeFIFO, ModeSocket, ModeSymlink}

// Open opens the ext4 filesystem on dev. A writable FS must be closed to
// write back its bitmaps, superblock and cached metadata blocks; it needs
// the extents feature and no bigalloc or dirty journal. The times
// libext2fs records by itself (superblock write time, deletion times) stay
// at the previous write time, so the same edits give the same bytes.
func Open(dev Device, writable bool) (*FS, error) {
	initOnce.Do(func() { C.obd_init() })
	st := &ioState{dev: dev, zero: make([]byte, 64<<10), dirty: make(map[int64][]byte)}
	h := cgo.NewHandle(st)
	var cfs C.ext2_filsys
	w := C.int(0)
	if writable {
		w = 1
	}
	if code := C.obd_fs_open(C.uintptr_t(h), w, &cfs); code != 0 {
		err := st.codeErr(code)
		h.Delete()
		return nil, &fs.PathError{Op: "open", Path: "/", Err: err}
	}
	bs := int64(cfs.blocksize)
	st.bs = bs
	return &FS{
		fs:       cfs,
		st:       st,
		h:        h,
		writable: writable,
		bs:       bs,
		zero:     make([]byte, bs),
		buf:      make([]byte, max(bs, 1<<20/bs*bs)),
		dirs:     make(map[uint32]*dirCache),
	}, nil
}

// Close writes back everything (bitmaps, group descriptors, superblock)
// and releases the filesystem. The device then holds a consistent fs.
func (f *FS) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fs == nil {
		return ErrClosed
	}
	err := f.st.codeErr(C.obd_fs_close(f.fs))
	if ferr := f.st.flush(); ferr != nil && err == nil {
		err = ferr
	}
	f.fs = nil
	f.dirs = nil
	f.h.Delete()
	if err != nil {
		return &fs.PathError{Op: "close", Path: "/", Err: err}
	}
	return nil
}

// Usage counts the blocks and inodes of a filesystem.
type Usage struct {
	BlockSize          int64
	Blocks, FreeBlocks int64
	Inodes, FreeInodes int64
}

// Usage returns the block and inode counts of the filesystem.
func (f *FS) Usage() (Usage, error) {
	if err := f.lock(false); err != nil {
		return Usage{}, err
	}
	defer f.mu.Unlock()
	sb := f.fs.super
	return Usage{
		BlockSize:  f.bs,
		Blocks:     int64(C.ext2fs_blocks_count(sb)),
		FreeBlocks: int64(C.ext2fs_free_blocks_count(sb)),
		Inodes:     int64(sb.s_inodes_count),
		FreeInodes: int64(sb.s_free_inodes_count),
	}, nil
}

// lock locks f and checks that it is open (and writable if asked).
func (f *FS) lock(write bool) error {
	f.mu.Lock()
	if f.fs == nil {
		f.mu.Unlock()
		return ErrClosed
	}
	if write && !f.writable {
		f.mu.Unlock()
		return syscall.EROFS
	}
	return nil
}

func (f *FS) err(code C.errcode_t) error { return f.st.codeErr(code) }

func cleanPath(p string) string { return path.Clean("/" + p) }

// dir returns the cached entries of directory ino, loading them if needed.
func (f *FS) dir(ino uint32) (*dirCache, error) {
	if d := f.dirs[ino]; d != nil {
		return d, nil
	}
	var buf *C.char
	var n C.size_t
	var slow C.int
	if code := C.obd_dir_list(f.fs, C.ext2_ino_t(ino), &buf, &n, &slow); code != 0 {
		return nil, f.err(code)
	}
	defer C.free(unsafe.Pointer(buf))
	raw := unsafe.Slice((*byte)(unsafe.Pointer(buf)), int(n))
	d := &dirCache{ents: make(map[string]dirent), slow: slow != 0, hint: noLblk}
	for len(raw) >= 10 {
		e := dirent{
			ino:  uint32(raw[0]) | uint32(raw[1])<<8 | uint32(raw[2])<<16 | uint32(raw[3])<<24,
			lblk: uint32(raw[4]) | uint32(raw[5])<<8 | uint32(raw[6])<<16 | uint32(raw[7])<<24,
		}
		if ft := raw[8] & 7; ft != 0 {
			e.mode = modeOfFtype[ft]
		}
		nl := int(raw[9])
		name := string(raw[10 : 10+nl])
		raw = raw[10+nl:]
		if e.mode == 0 {
			st, err := f.stat(e.ino)
			if err != nil {
				return nil, err
			}
			e.mode = st.Mode & ModeTypeMask
		}
		d.ents[name] = e
	}
	f.dirs[ino] = d
	return d, nil
}

// walk resolves an absolute clean path to an inode number. It also returns
// the path it ended on: p with the symlinks it followed resolved, up to the
// first missing component when it fails with errNotExist.
func (f *FS) walk(p string, followLast bool, links *int) (uint32, string, error) {
	if p == "/" {
		return rootIno, p, nil
	}
	comps := strings.Split(p[1:], "/")
	cur := uint32(rootIno)
	for i, c := range comps {
		d, err := f.dir(cur)
		if err != nil {
			return 0, p, err
		}
		e, ok := d.ents[c]
		if !ok {
			return 0, p, errNotExist
		}
		last := i == len(comps)-1
		if e.mode == ModeSymlink && (!last || followLast) {
			if *links++; *links > maxSymlinks {
				return 0, p, syscall.ELOOP
			}
			target, err := f.readlink(e.ino)
			if err != nil {
				return 0, p, err
			}
			if !strings.HasPrefix(target, "/") {
				target = "/" + strings.Join(comps[:i], "/") + "/" + target
			}
			return f.walk(cleanPath(target+"/"+strings.Join(comps[i+1:], "/")), followLast, links)
		}
		if !last && e.mode != ModeDir {
			return 0, p, errNotDir
		}
		cur = e.ino
	}
	return cur, p, nil
}

func (f *FS) resolve(p string, followLast bool) (uint32, error) {
	links := 0
	ino, _, err := f.walk(cleanPath(p), followLast, &links)
	return ino, err
}

// parent resolves the directory that holds p and returns it with the
// last path component.
func (f *FS) parent(p string) (uint32, *dirCache, string, error) {
	p = cleanPath(p)
	if p == "/" {
		return 0, nil, "", syscall.EINVAL
	}
	dirPath, name := path.Split(p)
	if len(name) > maxNameLen {
		return 0, nil, "", syscall.ENAMETOOLONG
	}
	pino, err := f.resolve(dirPath, true)
	if err != nil {
		return 0, nil, "", err
	}
	d, err := f.dir(pino)
	if err != nil {
		return 0, nil, "", err
	}
	return pino, d, name, nil
}

func (f *FS) stat(ino uint32) (*Stat, error) {
	var cs C.obd_stat
	if code := C.obd_stat_ino(f.fs, C.ext2_ino_t(ino), &cs); code != 0 {
		return nil, f.err(code)
	}
	m := &cs.meta
	return &Stat{
		Ino:    ino,
		Mode:   uint32(m.mode),
		Nlink:  uint32(cs.nlink),
		UID:    uint32(m.uid),
		GID:    uint32(m.gid),
		Size:   int64(cs.size),
		Blocks: int64(cs.blocks),
		Major:  uint32(cs.rdev_major),
		Minor:  uint32(cs.rdev_minor),
		Flags:  uint32(cs.flags),
		Atime:  time.Unix(int64(m.atime), int64(m.atime_ns)),
		Mtime:  time.Unix(int64(m.mtime), int64(m.mtime_ns)),
		Ctime:  time.Unix(int64(m.ctime), int64(m.ctime_ns)),
		Crtime: time.Unix(int64(m.crtime), int64(m.crtime_ns)),
	}, nil
}

// ext4 time range with the two extra epoch bits.
const (
	minTime = -1 << 31
	maxTime = 1<<34 - 1<<31 - 1
)

func splitTime(t time.Time) (C.int64_t, C.uint32_t) {
	if t.IsZero() {
		return 0, 0
	}
	s := t.Unix()
	switch {
	case s < minTime:
		return minTime, 0
	case s > maxTime:
		return maxTime, 0
	}
	return C.int64_t(s), C.uint32_t(t.Nanosecond())
}

func (m *Meta) c() C.obd_meta {
	var cm C.obd_meta
	cm.mode = C.uint32_t(m.Mode & 0o7777)
	cm.uid = C.uint32_t(m.UID)
	cm.gid = C.uint32_t(m.GID)
	cm.atime, cm.atime_ns = splitTime(m.Atime)
	cm.mtime, cm.mtime_ns = splitTime(m.Mtime)
	cm.ctime, cm.ctime_ns = splitTime(m.Ctime)
	cm.crtime, cm.crtime_ns = cm.ctime, cm.ctime_ns
	return cm
}

func pathErr(op, p string, err error) error {
	if err == nil {
		return nil
	}
	return &fs.PathError{Op: op, Path: cleanPath(p), Err: err}
}
