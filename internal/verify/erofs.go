package verify

import (
	"fmt"
	"io"

	"github.com/obdproject/obd/internal/erofs"
)

// FromErofs reads the whole file tree of the erofs image on r, a disk of size bytes.
func FromErofs(r io.ReaderAt, size int64) (Tree, error) {
	er, err := erofs.NewReader(r, size)
	if err != nil {
		return nil, err
	}
	t := Tree{}
	byNid := map[uint64]*Inode{}
	err = er.Walk(func(p string, f *erofs.File) error {
		if ino, ok := byNid[f.Nid]; ok {
			t[p] = ino
			return nil
		}
		ino := &Inode{Mode: f.Mode & 0o7777, UID: f.UID, GID: f.GID, Mtime: f.Mtime, Xattrs: f.Xattrs}
		byNid[f.Nid] = ino
		t[p] = ino
		ino.Kind, _ = kindOfMode(f.Mode)
		switch ino.Kind {
		case Regular:
			ino.Size = f.Size
			data, err := f.Open()
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			var n int64
			if ino.Digest, n, err = contentDigest(data); err != nil || n != f.Size {
				return fmt.Errorf("%s: read %d of %d bytes: %v", p, n, f.Size, err)
			}
		case Symlink:
			ino.Size, ino.Link = f.Size, f.Target
		case CharDev, BlockDev:
			ino.Major, ino.Minor = f.Major, f.Minor
		case Dir:
			delete(byNid, f.Nid) // directories are not hardlinked; "." and ".." are not listed
		}
		return nil
	})
	return t, err
}
