package verify

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// FromDir reads the whole file tree under root, a directory of this machine (a mounted image), as the kernel
// presents it.
func FromDir(root string) (Tree, error) {
	t := Tree{}
	byIno := map[uint64]*Inode{}
	err := filepath.WalkDir(root, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(p, root), "/")
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		typ := st.Mode & unix.S_IFMT
		if ino, ok := byIno[st.Ino]; ok && typ != unix.S_IFDIR {
			t[rel] = ino
			return nil
		}
		ino := &Inode{Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid, Mtime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec)}
		byIno[st.Ino] = ino
		t[rel] = ino
		xattrs, err := dirXattrs(p)
		if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		ino.Xattrs = xattrs
		var ok bool
		if ino.Kind, ok = kindOfMode(st.Mode); !ok {
			return fmt.Errorf("%s: unknown file type %#o", rel, st.Mode)
		}
		switch ino.Kind {
		case Regular:
			ino.Size = st.Size
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			ino.Digest, _, err = contentDigest(f)
			f.Close()
			if err != nil {
				return fmt.Errorf("%s: read: %w", rel, err)
			}
		case Symlink:
			ino.Size = st.Size
			if ino.Link, err = os.Readlink(p); err != nil {
				return err
			}
		case CharDev, BlockDev:
			ino.Major, ino.Minor = unix.Major(st.Rdev), unix.Minor(st.Rdev)
		}
		return nil
	})
	return t, err
}

// dirXattrs reads the xattrs of path p (nil for none).
func dirXattrs(p string) (map[string]string, error) {
	size, err := unix.Llistxattr(p, nil)
	if errors.Is(err, unix.ENOTSUP) || size == 0 {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list xattrs: %w", err)
	}
	buf := make([]byte, size)
	if size, err = unix.Llistxattr(p, buf); err != nil {
		return nil, fmt.Errorf("list xattrs: %w", err)
	}
	out := map[string]string{}
	for name := range strings.SplitSeq(string(buf[:size]), "\x00") {
		if name == "" {
			continue
		}
		n, err := unix.Lgetxattr(p, name, nil)
		if err != nil {
			return nil, fmt.Errorf("xattr %s: %w", name, err)
		}
		v := make([]byte, n)
		if n, err = unix.Lgetxattr(p, name, v); err != nil {
			return nil, fmt.Errorf("xattr %s: %w", name, err)
		}
		out[name] = string(v[:n])
	}
	return out, nil
}
