package ext4

/*
#include "obd.h"
*/
import "C"

import (
	"bytes"
	"fmt"
	"io"
	"maps"
	"slices"
	"syscall"
	"unsafe"
)

// maxFileSize is the largest file size with 32-bit logical block numbers.
func (f *FS) maxFileSize() int64 { return (1<<32 - 1) * f.bs }

// addEntry links ino into directory pino under name.
func (f *FS) addEntry(pino uint32, d *dirCache, name string, ino, mode uint32) error {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	lblk := C.uint32_t(d.hint)
	if code := C.obd_dir_add(f.fs, C.ext2_ino_t(pino), cname, C.int(len(name)),
		C.ext2_ino_t(ino), ftypeOf[mode], &lblk); code != 0 {
		return f.err(code)
	}
	if !d.slow {
		d.hint = uint32(lblk)
	}
	d.ents[name] = dirent{ino: ino, lblk: uint32(lblk), mode: mode}
	return nil
}

// delEntry removes name from directory pino (not the inode it names).
func (f *FS) delEntry(pino uint32, d *dirCache, name string) error {
	e := d.ents[name]
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	if code := C.obd_dir_del(f.fs, C.ext2_ino_t(pino), cname, C.int(len(name)), C.uint32_t(e.lblk)); code != 0 {
		return f.err(code)
	}
	delete(d.ents, name)
	return nil
}

// drop releases one link to the non-directory inode ino, freeing it with
// its blocks and xattrs when it was the last one.
func (f *FS) drop(ino uint32) error {
	var n C.uint32_t
	if code := C.obd_nlink_add(f.fs, C.ext2_ino_t(ino), -1, &n); code != 0 {
		return f.err(code)
	}
	if n == 0 {
		return f.err(C.obd_release(f.fs, C.ext2_ino_t(ino)))
	}
	return nil
}

// purge releases everything below directory ino and then ino itself. The
// directory blocks are freed whole, so child entries are not unlinked one
// by one.
func (f *FS) purge(ino uint32) error {
	d, err := f.dir(ino)
	if err != nil {
		return err
	}
	// In name order, so that the same tree is always freed the same way.
	for _, name := range slices.Sorted(maps.Keys(d.ents)) {
		e := d.ents[name]
		if e.mode == ModeDir {
			err = f.purge(e.ino)
		} else {
			err = f.drop(e.ino)
		}
		if err != nil {
			return err
		}
	}
	delete(f.dirs, ino)
	return f.err(C.obd_release(f.fs, C.ext2_ino_t(ino)))
}

// remove unlinks name from directory pino and releases what it named.
func (f *FS) remove(pino uint32, d *dirCache, name string) error {
	e, ok := d.ents[name]
	if !ok {
		return errNotExist
	}
	if err := f.delEntry(pino, d, name); err != nil {
		return err
	}
	if e.mode != ModeDir {
		return f.drop(e.ino)
	}
	var n C.uint32_t
	if code := C.obd_nlink_add(f.fs, C.ext2_ino_t(pino), -1, &n); code != 0 {
		return f.err(code)
	}
	return f.purge(e.ino)
}

// Remove removes path; a directory is removed with everything below it.
// Blocks and inodes are freed when their last link goes.
func (f *FS) Remove(p string) error {
	if err := f.lock(true); err != nil {
		return err
	}
	defer f.mu.Unlock()
	pino, d, name, err := f.parent(p)
	if err == nil {
		err = f.remove(pino, d, name)
	}
	return pathErr("remove", p, err)
}

// create prepares the creation of path: it resolves the parent and fails
// with EEXIST if the name is taken.
func (f *FS) create(p string) (uint32, *dirCache, string, error) {
	pino, d, name, err := f.parent(p)
	if err != nil {
		return 0, nil, "", err
	}
	if _, ok := d.ents[name]; ok {
		return 0, nil, "", errExist
	}
	return pino, d, name, nil
}

// link adds the new inode ino to its directory, freeing it on failure.
func (f *FS) link(pino uint32, d *dirCache, name string, ino, mode uint32) error {
	err := f.addEntry(pino, d, name, ino, mode)
	if err == nil {
		return nil
	}
	if mode == ModeDir {
		var n C.uint32_t
		C.obd_nlink_add(f.fs, C.ext2_ino_t(pino), -1, &n)
		delete(f.dirs, ino)
	}
	C.obd_release(f.fs, C.ext2_ino_t(ino))
	return err
}

// Mkdir creates directory path.
func (f *FS) Mkdir(p string, m Meta) error {
	if err := f.lock(true); err != nil {
		return err
	}
	defer f.mu.Unlock()
	return pathErr("mkdir", p, f.mkdir(p, m))
}

func (f *FS) mkdir(p string, m Meta) error {
	pino, d, name, err := f.create(p)
	if err != nil {
		return err
	}
	cm := m.c()
	var ino C.ext2_ino_t
	if code := C.obd_mkdir(f.fs, C.ext2_ino_t(pino), &cm, &ino); code != 0 {
		return f.err(code)
	}
	f.dirs[uint32(ino)] = &dirCache{ents: make(map[string]dirent), hint: 0}
	return f.link(pino, d, name, uint32(ino), ModeDir)
}

// Symlink creates path as a symbolic link to target.
func (f *FS) Symlink(p, target string, m Meta) error {
	if err := f.lock(true); err != nil {
		return err
	}
	defer f.mu.Unlock()
	return pathErr("symlink", p, f.symlink(p, target, m))
}

func (f *FS) symlink(p, target string, m Meta) error {
	if target == "" {
		return syscall.ENOENT
	}
	if int64(len(target)) >= f.bs {
		return syscall.ENAMETOOLONG
	}
	pino, d, name, err := f.create(p)
	if err != nil {
		return err
	}
	cm := m.c()
	ct := C.CString(target)
	defer C.free(unsafe.Pointer(ct))
	var ino C.ext2_ino_t
	if code := C.obd_symlink(f.fs, C.ext2_ino_t(pino), &cm, ct, C.size_t(len(target)), &ino); code != 0 {
		return f.err(code)
	}
	return f.link(pino, d, name, uint32(ino), ModeSymlink)
}

// Mknod creates a device node, FIFO or socket; typ is ModeChar, ModeBlock,
// ModeFIFO or ModeSocket.
func (f *FS) Mknod(p string, typ, major, minor uint32, m Meta) error {
	if err := f.lock(true); err != nil {
		return err
	}
	defer f.mu.Unlock()
	return pathErr("mknod", p, f.mknod(p, typ, major, minor, m))
}

func (f *FS) mknod(p string, typ, major, minor uint32, m Meta) error {
	switch typ {
	case ModeChar, ModeBlock:
		if major >= 1<<12 || minor >= 1<<20 {
			return syscall.EINVAL
		}
	case ModeFIFO, ModeSocket:
	default:
		return syscall.EINVAL
	}
	pino, d, name, err := f.create(p)
	if err != nil {
		return err
	}
	cm := m.c()
	var ino C.ext2_ino_t
	if code := C.obd_mknod(f.fs, C.ext2_ino_t(pino), C.uint32_t(typ), &cm,
		C.uint32_t(major), C.uint32_t(minor), &ino); code != 0 {
		return f.err(code)
	}
	return f.link(pino, d, name, uint32(ino), typ)
}

// Link creates path as a hard link to the existing non-directory inode at
// existing (not following a final symlink, like link(2)).
func (f *FS) Link(p, existing string) error {
	if err := f.lock(true); err != nil {
		return err
	}
	defer f.mu.Unlock()
	return pathErr("link", p, f.hardlink(p, existing))
}

func (f *FS) hardlink(p, existing string) error {
	ino, err := f.resolve(existing, false)
	if err != nil {
		return fmt.Errorf("link target %s: %w", cleanPath(existing), err)
	}
	st, err := f.stat(ino)
	if err != nil {
		return err
	}
	if st.IsDir() {
		return syscall.EPERM
	}
	pino, d, name, err := f.create(p)
	if err != nil {
		return err
	}
	var n C.uint32_t
	if code := C.obd_nlink_add(f.fs, C.ext2_ino_t(ino), 1, &n); code != 0 {
		return f.err(code)
	}
	if err := f.addEntry(pino, d, name, ino, st.Mode&ModeTypeMask); err != nil {
		C.obd_nlink_add(f.fs, C.ext2_ino_t(ino), -1, &n)
		return err
	}
	return nil
}

// SetMeta sets mode (permission bits), owner and times of path, not
// following a final symlink.
func (f *FS) SetMeta(p string, m Meta) error {
	if err := f.lock(true); err != nil {
		return err
	}
	defer f.mu.Unlock()
	ino, err := f.resolve(p, false)
	if err == nil {
		cm := m.c()
		err = f.err(C.obd_set_meta(f.fs, C.ext2_ino_t(ino), &cm))
	}
	return pathErr("setmeta", p, err)
}

// CreateFile creates regular file path with size bytes read from r. Blocks
// that are entirely zero are left as holes.
func (f *FS) CreateFile(p string, m Meta, r io.Reader, size int64) error {
	return f.CreateSparseFile(p, m, r, size, []Extent{{0, size}})
}

// Extent is a run of file data: Length bytes from file offset Offset.
type Extent struct{ Offset, Length int64 }

// CreateSparseFile creates regular file path of the given size whose data
// are the extents, read from r one after the other; the rest of the file is
// holes, which cost nothing. The extents must be in order, not overlap and
// lie within size. Blocks of data that are entirely zero are left as holes.
func (f *FS) CreateSparseFile(p string, m Meta, r io.Reader, size int64, data []Extent) error {
	if err := f.lock(true); err != nil {
		return err
	}
	defer f.mu.Unlock()
	return pathErr("create", p, f.createFile(p, m, r, size, data))
}

func (f *FS) createFile(p string, m Meta, r io.Reader, size int64, data []Extent) error {
	end := int64(0)
	for _, e := range data {
		if e.Offset < end || e.Length < 0 || e.Length > size-e.Offset {
			return fmt.Errorf("data extent of %d bytes at %d: out of order or beyond the file size %d: %w", e.Length, e.Offset, size, syscall.EINVAL)
		}
		end = e.Offset + e.Length
	}
	nf, err := f.newFile(p, m, size)
	if err != nil {
		return err
	}
	if err := f.writeData(nf.wf, r, data); err != nil {
		C.obd_wfile_abort(nf.wf)
		f.st.takeErr()
		return err
	}
	return nf.finish(size)
}

// newFile is a regular file being created: its inode is written by finish, which links it at its path.
type newFile struct {
	f    *FS
	wf   *C.obd_wfile
	ino  C.ext2_ino_t
	pino uint32
	d    *dirCache
	name string
}

// newFile starts creating regular file p of the given size.
func (f *FS) newFile(p string, m Meta, size int64) (*newFile, error) {
	if size < 0 || size > f.maxFileSize() {
		return nil, fmt.Errorf("size %d: ext4 with %d-byte blocks holds files of at most %d bytes: %w", size, f.bs, f.maxFileSize(), syscall.EFBIG)
	}
	pino, d, name, err := f.create(p)
	if err != nil {
		return nil, err
	}
	nf := &newFile{f: f, pino: pino, d: d, name: name}
	cm := m.c()
	if code := C.obd_wfile_new(f.fs, C.ext2_ino_t(pino), &cm, &nf.wf, &nf.ino); code != 0 {
		return nil, f.err(code)
	}
	return nf, nil
}

func (nf *newFile) finish(size int64) error {
	if code := C.obd_wfile_finish(nf.wf, C.uint64_t(size)); code != 0 {
		return nf.f.err(code)
	}
	return nf.f.link(nf.pino, nf.d, nf.name, uint32(nf.ino), ModeRegular)
}

// CreateMappedFile creates regular file path of the given size whose blocks are allocated but not written: for each
// run of them, mapData is told that n bytes at device offset devOff hold the file's bytes from fileOff on, and
// supplies them itself (a TurboOCI layer maps them to the original tar). The last run ends at the block after the
// file's end.
func (f *FS) CreateMappedFile(p string, m Meta, size int64, mapData func(devOff, fileOff, n int64) error) error {
	if err := f.lock(true); err != nil {
		return err
	}
	defer f.mu.Unlock()
	return pathErr("create", p, f.createMapped(p, m, size, mapData))
}

func (f *FS) createMapped(p string, m Meta, size int64, mapData func(devOff, fileOff, n int64) error) error {
	nf, err := f.newFile(p, m, size)
	if err != nil {
		return err
	}
	wf := nf.wf
	const maxSegs = 16
	var segs [3 * maxSegs]C.uint64_t
	for lblk, left := int64(0), (size+f.bs-1)/f.bs; left > 0; {
		var n C.int
		if code := C.obd_wfile_alloc(wf, C.uint64_t(lblk), C.uint64_t(left), &segs[0], maxSegs, &n); code != 0 {
			C.obd_wfile_abort(wf)
			f.st.takeErr()
			return f.err(code)
		}
		for i := 0; i < int(n); i++ {
			pblk, blocks := int64(segs[3*i+1]), int64(segs[3*i+2])
			// A cached metadata block freed earlier must not be written back over the data.
			f.st.forget(pblk*f.bs, blocks*f.bs)
			if err := mapData(pblk*f.bs, lblk*f.bs, blocks*f.bs); err != nil {
				C.obd_wfile_abort(wf)
				f.st.takeErr()
				return err
			}
			lblk += blocks
			left -= blocks
		}
	}
	return nf.finish(size)
}

// writeData copies the data extents from r into the file being written,
// allocating blocks only for the non-zero ones. f.buf gathers the blocks
// that data touch, and is all zeros between calls.
func (f *FS) writeData(wf *C.obd_wfile, r io.Reader, data []Extent) error {
	bs, buf := f.bs, f.buf
	window := int64(len(buf))
	// buf[:used] holds the file's bytes from offset start, a block boundary.
	var start, used int64
	flush := func() error {
		n := (used + bs - 1) / bs * bs
		err := f.writeBlocks(wf, start/bs, buf[:n])
		clear(buf[:n])
		used = 0
		return err
	}
	for _, e := range data {
		for off, end := e.Offset, e.Offset+e.Length; off < end; {
			// A whole block between the data gathered and off is a hole:
			// write what is gathered first.
			if used > 0 && (off >= start+window || off >= start+(used+bs-1)/bs*bs+bs) {
				if err := flush(); err != nil {
					return err
				}
			}
			if used == 0 {
				start = off / bs * bs
			}
			k := min(end-off, start+window-off)
			if _, err := io.ReadFull(r, buf[off-start:off-start+k]); err != nil {
				clear(buf)
				if err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return fmt.Errorf("reading file data at offset %d: %w", off, err)
			}
			off += k
			used = off - start
		}
	}
	if used > 0 {
		return flush()
	}
	return nil
}

// writeBlocks writes the non-zero blocks of data, whole blocks from logical
// block lblk on.
func (f *FS) writeBlocks(wf *C.obd_wfile, lblk int64, data []byte) error {
	bs := f.bs
	nb := int64(len(data)) / bs
	for i := int64(0); i < nb; {
		if bytes.Equal(data[i*bs:(i+1)*bs], f.zero) {
			i++
			continue
		}
		j := i + 1
		for j < nb && !bytes.Equal(data[j*bs:(j+1)*bs], f.zero) {
			j++
		}
		if err := f.writeRun(wf, lblk+i, data[i*bs:j*bs]); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// writeRun allocates blocks for logical block lblk onwards and writes data
// (a whole number of blocks) there.
func (f *FS) writeRun(wf *C.obd_wfile, lblk int64, data []byte) error {
	const maxSegs = 16
	var segs [3 * maxSegs]C.uint64_t
	for len(data) > 0 {
		var n C.int
		count := int64(len(data)) / f.bs
		if code := C.obd_wfile_alloc(wf, C.uint64_t(lblk), C.uint64_t(count), &segs[0], maxSegs, &n); code != 0 {
			return f.err(code)
		}
		for i := 0; i < int(n); i++ {
			pblk, blocks := int64(segs[3*i+1]), int64(segs[3*i+2])
			k := blocks * f.bs
			if err := f.st.writeAt(data[:k], pblk*f.bs); err != nil {
				return err
			}
			data = data[k:]
			lblk += blocks
		}
	}
	return nil
}
