package verify

import (
	"crypto/sha256"
	"encoding/hex"
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
		switch f.Mode & erofs.ModeTypeMask {
		case erofs.ModeRegular:
			ino.Kind, ino.Size = Regular, f.Size
			data, err := f.Open()
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			h := sha256.New()
			if n, err := io.Copy(h, data); err != nil || n != f.Size {
				return fmt.Errorf("%s: read %d of %d bytes: %v", p, n, f.Size, err)
			}
			ino.Digest = hex.EncodeToString(h.Sum(nil))
		case erofs.ModeSymlink:
			ino.Kind, ino.Size, ino.Link = Symlink, f.Size, f.Target
		case erofs.ModeChar:
			ino.Kind, ino.Major, ino.Minor = CharDev, f.Major, f.Minor
		case erofs.ModeBlock:
			ino.Kind, ino.Major, ino.Minor = BlockDev, f.Major, f.Minor
		case erofs.ModeFIFO:
			ino.Kind = FIFO
		case erofs.ModeSocket:
			ino.Kind = Socket
		case erofs.ModeDir:
			ino.Kind = Dir
			delete(byNid, f.Nid) // directories are not hardlinked; "." and ".." are not listed
		}
		return nil
	})
	return t, err
}
