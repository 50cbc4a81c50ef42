package ext4

/*
#include "obd.h"
*/
import "C"

import (
	"errors"
	"io"
	"sort"
	"strings"
	"syscall"
	"unsafe"
)

// Lstat describes path without following a final symlink.
func (f *FS) Lstat(p string) (*Stat, error) {
	if err := f.lock(false); err != nil {
		return nil, err
	}
	defer f.mu.Unlock()
	ino, err := f.resolve(p, false)
	if err != nil {
		return nil, pathErr("lstat", p, err)
	}
	st, err := f.stat(ino)
	return st, pathErr("lstat", p, err)
}

// Stat describes path, following symlinks.
func (f *FS) Stat(p string) (*Stat, error) {
	if err := f.lock(false); err != nil {
		return nil, err
	}
	defer f.mu.Unlock()
	ino, err := f.resolve(p, true)
	if err != nil {
		return nil, pathErr("stat", p, err)
	}
	st, err := f.stat(ino)
	return st, pathErr("stat", p, err)
}

// Realpath returns path with the symlinks in it resolved within the root,
// the last component included, as far as the components exist: the first
// missing one and those after it are kept as they are.
func (f *FS) Realpath(p string) (string, error) {
	if err := f.lock(false); err != nil {
		return "", err
	}
	defer f.mu.Unlock()
	links := 0
	_, resolved, err := f.walk(cleanPath(p), true, &links)
	if errors.Is(err, errNotExist) {
		err = nil
	}
	return resolved, pathErr("realpath", p, err)
}

// ReadDir lists directory path (without "." and ".."), sorted by name.
func (f *FS) ReadDir(p string) ([]DirEntry, error) {
	if err := f.lock(false); err != nil {
		return nil, err
	}
	defer f.mu.Unlock()
	ino, err := f.resolve(p, true)
	if err != nil {
		return nil, pathErr("readdir", p, err)
	}
	d, err := f.dir(ino)
	if err != nil {
		return nil, pathErr("readdir", p, err)
	}
	out := make([]DirEntry, 0, len(d.ents))
	for name, e := range d.ents {
		out = append(out, DirEntry{Name: name, Ino: e.ino, Mode: e.mode})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Readlink returns the target of symlink path.
func (f *FS) Readlink(p string) (string, error) {
	if err := f.lock(false); err != nil {
		return "", err
	}
	defer f.mu.Unlock()
	ino, err := f.resolve(p, false)
	if err != nil {
		return "", pathErr("readlink", p, err)
	}
	s, err := f.readlink(ino)
	return s, pathErr("readlink", p, err)
}

func (f *FS) readlink(ino uint32) (string, error) {
	bufsize := C.size_t(f.bs)
	buf := C.malloc(bufsize)
	defer C.free(buf)
	var n C.size_t
	if code := C.obd_readlink(f.fs, C.ext2_ino_t(ino), (*C.char)(buf), bufsize, &n); code != 0 {
		if code == C.EXT2_ET_INVALID_ARGUMENT {
			return "", syscall.EINVAL
		}
		return "", f.err(code)
	}
	return C.GoStringN((*C.char)(buf), C.int(n)), nil
}

// File is a regular file opened for reading.
type File struct {
	fs   *FS
	file C.ext2_file_t
	buf  unsafe.Pointer
	size int64
}

const fileBufSize = 256 << 10

// OpenFile opens regular file path for reading, following symlinks.
func (f *FS) OpenFile(p string) (*File, error) {
	if err := f.lock(false); err != nil {
		return nil, err
	}
	defer f.mu.Unlock()
	ino, err := f.resolve(p, true)
	if err != nil {
		return nil, pathErr("open", p, err)
	}
	st, err := f.stat(ino)
	if err != nil {
		return nil, pathErr("open", p, err)
	}
	switch st.Mode & ModeTypeMask {
	case ModeRegular:
	case ModeDir:
		return nil, pathErr("open", p, syscall.EISDIR)
	default:
		return nil, pathErr("open", p, syscall.EINVAL)
	}
	var file C.ext2_file_t
	if code := C.ext2fs_file_open(f.fs, C.ext2_ino_t(ino), 0, &file); code != 0 {
		return nil, pathErr("open", p, f.err(code))
	}
	return &File{fs: f, file: file, buf: C.malloc(fileBufSize), size: st.Size}, nil
}

// Size returns the file size.
func (fl *File) Size() int64 { return fl.size }

// ReadAt implements io.ReaderAt.
func (fl *File) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, syscall.EINVAL
	}
	f := fl.fs
	if err := f.lock(false); err != nil {
		return 0, err
	}
	defer f.mu.Unlock()
	if fl.file == nil {
		return 0, ErrClosed
	}
	n := 0
	for n < len(p) && off < fl.size {
		want := min(len(p)-n, fileBufSize, int(fl.size-off))
		if code := C.ext2fs_file_llseek(fl.file, C.__u64(off), C.EXT2_SEEK_SET, nil); code != 0 {
			return n, f.err(code)
		}
		var got C.uint
		if code := C.ext2fs_file_read(fl.file, fl.buf, C.uint(want), &got); code != 0 {
			return n, f.err(code)
		}
		if got == 0 {
			return n, io.ErrUnexpectedEOF
		}
		copy(p[n:], unsafe.Slice((*byte)(fl.buf), int(got)))
		n += int(got)
		off += int64(got)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Close releases the file.
func (fl *File) Close() error {
	f := fl.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	if fl.file == nil {
		return ErrClosed
	}
	var err error
	if f.fs != nil {
		err = f.err(C.ext2fs_file_close(fl.file))
	}
	C.free(fl.buf)
	fl.file, fl.buf = nil, nil
	return err
}

// SetXattr sets extended attribute name of path (not following a final
// symlink). POSIX ACLs (system.posix_acl_access/_default) are given in the
// Linux VFS xattr format and stored in the ext4 format.
func (f *FS) SetXattr(p, name string, value []byte) error {
	if err := f.lock(true); err != nil {
		return err
	}
	defer f.mu.Unlock()
	ino, err := f.resolve(p, false)
	if err == nil {
		err = f.setXattr(ino, name, value)
	}
	return pathErr("setxattr", p, err)
}

func (f *FS) setXattr(ino uint32, name string, value []byte) error {
	if !validXattrName(name) {
		return syscall.EINVAL
	}
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	var cval unsafe.Pointer
	if len(value) > 0 {
		cval = C.CBytes(value)
		defer C.free(cval)
	}
	return f.err(C.obd_xattr_set(f.fs, C.ext2_ino_t(ino), cname, cval, C.size_t(len(value))))
}

// validXattrName accepts the namespaces ext4 stores.
func validXattrName(name string) bool {
	if len(name) > 255 || strings.IndexByte(name, 0) >= 0 {
		return false
	}
	for _, prefix := range []string{"user.", "trusted.", "security."} {
		if strings.HasPrefix(name, prefix) && len(name) > len(prefix) {
			return true
		}
	}
	return name == "system.posix_acl_access" || name == "system.posix_acl_default"
}

// GetXattr returns extended attribute name of path (ENODATA if unset).
func (f *FS) GetXattr(p, name string) ([]byte, error) {
	if err := f.lock(false); err != nil {
		return nil, err
	}
	defer f.mu.Unlock()
	ino, err := f.resolve(p, false)
	if err != nil {
		return nil, pathErr("getxattr", p, err)
	}
	v, err := f.getXattr(ino, name)
	return v, pathErr("getxattr", p, err)
}

func (f *FS) getXattr(ino uint32, name string) ([]byte, error) {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	var val unsafe.Pointer
	var n C.size_t
	if code := C.obd_xattr_get(f.fs, C.ext2_ino_t(ino), cname, &val, &n); code != 0 {
		return nil, f.err(code)
	}
	defer C.free(val)
	v := C.GoBytes(val, C.int(n))
	if name == "system.posix_acl_access" || name == "system.posix_acl_default" {
		normalizeACL(v)
	}
	return v, nil
}

// normalizeACL sets the id of entries that have none to ACL_UNDEFINED_ID
// (-1) as the kernel reports them; libext2fs converts them back as 0.
func normalizeACL(v []byte) {
	const aclUser, aclGroup = 2, 8
	for e := v[min(4, len(v)):]; len(e) >= 8; e = e[8:] {
		if tag := uint16(e[0]) | uint16(e[1])<<8; tag != aclUser && tag != aclGroup {
			copy(e[4:8], []byte{0xff, 0xff, 0xff, 0xff})
		}
	}
}

// ListXattrs returns the extended attribute names of path, sorted.
func (f *FS) ListXattrs(p string) ([]string, error) {
	if err := f.lock(false); err != nil {
		return nil, err
	}
	defer f.mu.Unlock()
	ino, err := f.resolve(p, false)
	if err != nil {
		return nil, pathErr("listxattr", p, err)
	}
	var buf *C.char
	var n C.size_t
	if code := C.obd_xattr_list(f.fs, C.ext2_ino_t(ino), &buf, &n); code != 0 {
		return nil, pathErr("listxattr", p, f.err(code))
	}
	defer C.free(unsafe.Pointer(buf))
	var names []string
	for _, s := range strings.Split(C.GoStringN(buf, C.int(n)), "\x00") {
		// system.data holds inline file data, not a user-visible xattr.
		if s != "" && s != "system.data" {
			names = append(names, s)
		}
	}
	sort.Strings(names)
	return names, nil
}

// RemoveXattr removes extended attribute name of path (ENODATA if unset).
func (f *FS) RemoveXattr(p, name string) error {
	if err := f.lock(true); err != nil {
		return err
	}
	defer f.mu.Unlock()
	ino, err := f.resolve(p, false)
	if err == nil {
		if _, err = f.getXattr(ino, name); err == nil {
			cname := C.CString(name)
			defer C.free(unsafe.Pointer(cname))
			err = f.err(C.obd_xattr_remove(f.fs, C.ext2_ino_t(ino), cname))
		}
	}
	return pathErr("removexattr", p, err)
}
