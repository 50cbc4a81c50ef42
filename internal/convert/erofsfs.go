package convert

import (
	"errors"
	"io"

	"github.com/obdproject/obd/internal/erofs"
	"github.com/obdproject/obd/internal/ext4"
)

// erofsFS is an erofs image being built, as the filesystem a layer is unpacked into. Modes and file types
// are Linux's in both packages.
type erofsFS struct{ b *erofs.Builder }

func erofsMeta(m ext4.Meta) erofs.Meta {
	return erofs.Meta{Mode: m.Mode, UID: m.UID, GID: m.GID, Mtime: m.Mtime}
}

func ext4Stat(st erofs.Stat, err error) (*ext4.Stat, error) {
	if err != nil {
		return nil, err
	}
	return &ext4.Stat{Mode: st.Mode, UID: st.UID, GID: st.GID, Size: st.Size, Mtime: st.Mtime}, nil
}

func (f erofsFS) Lstat(p string) (*ext4.Stat, error)   { return ext4Stat(f.b.Lstat(p)) }
func (f erofsFS) Stat(p string) (*ext4.Stat, error)    { return ext4Stat(f.b.Stat(p)) }
func (f erofsFS) Realpath(p string) (string, error)    { return f.b.Realpath(p) }
func (f erofsFS) Remove(p string) error                { return f.b.Remove(p) }
func (f erofsFS) Link(p, existing string) error        { return f.b.Link(p, existing) }
func (f erofsFS) Mkdir(p string, m ext4.Meta) error    { return f.b.Mkdir(p, erofsMeta(m)) }
func (f erofsFS) SetMeta(p string, m ext4.Meta) error  { return f.b.SetMeta(p, erofsMeta(m)) }
func (f erofsFS) SetXattr(p, n string, v []byte) error { return f.b.SetXattr(p, n, v) }

func (f erofsFS) Symlink(p, target string, m ext4.Meta) error {
	return f.b.Symlink(p, target, erofsMeta(m))
}

func (f erofsFS) Mknod(p string, typ, major, minor uint32, m ext4.Meta) error {
	return f.b.Mknod(p, typ, major, minor, erofsMeta(m))
}

func (f erofsFS) ReadDir(p string) ([]ext4.DirEntry, error) {
	ents, err := f.b.ReadDir(p)
	if err != nil {
		return nil, err
	}
	out := make([]ext4.DirEntry, len(ents))
	for i, e := range ents {
		out[i] = ext4.DirEntry{Name: e.Name, Mode: e.Mode}
	}
	return out, nil
}

func (f erofsFS) CreateFile(p string, m ext4.Meta, r io.Reader, size int64) error {
	return f.b.CreateFile(p, erofsMeta(m), r, size)
}

func (f erofsFS) CreateSparseFile(p string, m ext4.Meta, r io.Reader, size int64, data []ext4.Extent) error {
	ext := make([]erofs.Extent, len(data))
	for i, e := range data {
		ext[i] = erofs.Extent{Offset: e.Offset, Length: e.Length}
	}
	return f.b.CreateSparseFile(p, erofsMeta(m), r, size, ext)
}

func (f erofsFS) CreateMappedFile(string, ext4.Meta, int64, func(devOff, fileOff, n int64) error) error {
	return errors.New("erofs images map no file data into the layer tar")
}

func (f erofsFS) Usage() (ext4.Usage, error) {
	used, total := f.b.Blocks()
	return ext4.Usage{BlockSize: 4096, Blocks: total, FreeBlocks: total - used}, nil
}
