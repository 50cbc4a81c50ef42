package verify

import (
	"context"
	"fmt"
	"io"
	"path"

	"github.com/obdproject/obd/internal/decompress"
	"github.com/obdproject/obd/internal/erofs"
	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/lsmt"
)

// FromExt4 reads the whole file tree of an ext4 filesystem.
func FromExt4(fsys *ext4.FS) (Tree, error) {
	t := Tree{}
	byIno := map[uint32]*Inode{}
	var walk func(p string) error
	walk = func(p string) error {
		st, err := fsys.Lstat(p)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if ino, ok := byIno[st.Ino]; ok && st.Mode&ext4.ModeTypeMask != ext4.ModeDir {
			t[p] = ino
			return nil
		}
		ino := &Inode{Mode: st.Mode & 0o7777, UID: st.UID, GID: st.GID, Mtime: st.Mtime}
		byIno[st.Ino] = ino
		t[p] = ino
		names, err := fsys.ListXattrs(p)
		if err != nil {
			return fmt.Errorf("%s: list xattrs: %w", p, err)
		}
		for _, n := range names {
			v, err := fsys.GetXattr(p, n)
			if err != nil {
				return fmt.Errorf("%s: xattr %s: %w", p, n, err)
			}
			if ino.Xattrs == nil {
				ino.Xattrs = map[string]string{}
			}
			ino.Xattrs[n] = string(v)
		}
		var ok bool
		if ino.Kind, ok = kindOfMode(st.Mode); !ok {
			return fmt.Errorf("%s: unknown file type %#o", p, st.Mode)
		}
		switch ino.Kind {
		case Regular:
			ino.Size = st.Size
			f, err := fsys.OpenFile(p)
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			ino.Digest, _, err = contentDigest(io.NewSectionReader(f, 0, f.Size()))
			f.Close()
			if err != nil {
				return fmt.Errorf("%s: read: %w", p, err)
			}
		case Symlink:
			ino.Size = st.Size
			if ino.Link, err = fsys.Readlink(p); err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
		case CharDev, BlockDev:
			ino.Major, ino.Minor = st.Major, st.Minor
		case Dir:
			ents, err := fsys.ReadDir(p)
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			for _, e := range ents {
				if e.Name == "." || e.Name == ".." {
					continue
				}
				if err := walk(path.Join(p, e.Name)); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return t, walk("/")
}

// stackDevice presents a read-only layer stack to the ext4 reader.
type stackDevice struct{ *lsmt.Stack }

func (d stackDevice) Size() int64 { return d.VirtualSize() }

// FromStack reads the file tree of the filesystem on an overlaybd layer stack: ext4, or erofs.
func FromStack(s *lsmt.Stack) (Tree, error) {
	if erofs.IsImage(s) {
		return FromErofs(s, s.VirtualSize())
	}
	fsys, err := ext4.Open(stackDevice{s}, false)
	if err != nil {
		return nil, fmt.Errorf("open ext4 on the image's disk: %w", err)
	}
	defer fsys.Close()
	return FromExt4(fsys)
}

// FromSource applies the layers of a source image, in order, into a tree.
func FromSource(ctx context.Context, src image.Source) (Tree, error) {
	m, _ := src.Manifest()
	t := NewTree()
	for i, l := range m.Layers {
		if err := func() error {
			rc, err := src.OpenLayer(ctx, i)
			if err != nil {
				return err
			}
			defer rc.Close()
			tr, _, err := decompress.Layer(rc)
			if err != nil {
				return err
			}
			defer tr.Close()
			if err := t.ApplyTar(tr); err != nil {
				return err
			}
			_, err = io.Copy(io.Discard, tr) // reach EOF so the blob's digest is checked
			return err
		}(); err != nil {
			return nil, fmt.Errorf("layer %d (%s): %w", i, l.Digest, err)
		}
	}
	return t, nil
}

// Images compares the files of the local image src (an OCI layout or docker archive: its layers applied in order)
// with those of its overlaybd conversion dst (an OCI layout: the merged filesystem), ignoring /lost+found. It
// returns the differences and the number of paths src holds.
func Images(ctx context.Context, src, dst image.Ref, platform image.Platform) ([]Difference, int, error) {
	s, err := image.OpenLocalSource(src, platform)
	if err != nil {
		return nil, 0, err
	}
	defer s.Close()
	want, err := FromSource(ctx, s)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", src, err)
	}
	img, err := image.OpenLocal(dst, platform)
	if err != nil {
		return nil, 0, err
	}
	defer img.Close()
	got, err := FromStack(img.Stack)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", dst, err)
	}
	return Compare(want, got, Options{IgnoreExtra: []string{"/lost+found"}}), len(want), nil
}
