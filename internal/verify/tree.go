// Package verify compares the file tree of a source image (its tar layers applied in order, whiteouts honoured)
// with the file tree of a converted image, attribute by attribute, so a conversion can be proven lossless.
package verify

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
	"time"
)

// Kind is the type of a tree entry.
type Kind byte

// Entry kinds.
const (
	Regular  Kind = 'f'
	Dir      Kind = 'd'
	Symlink  Kind = 'l'
	CharDev  Kind = 'c'
	BlockDev Kind = 'b'
	FIFO     Kind = 'p'
	Socket   Kind = 's'
	whiteout      = ".wh."
	opaque        = ".wh..wh..opq"
)

// Inode is what a path points at; hardlinked paths share one Inode.
type Inode struct {
	Kind         Kind
	Mode         uint32 // permission bits incl. setuid, setgid, sticky (07777)
	UID, GID     uint32
	Size         int64
	Mtime        time.Time
	Link         string // symlink target
	Digest       string // sha256 of regular file content
	Major, Minor uint32
	Xattrs       map[string]string
	// Implicit marks a directory no tar entry named, made because an entry below it needed it: its mtime is
	// the converter's choice, so it is not compared.
	Implicit bool
}

// Tree is a file tree: clean absolute paths ("/" is the root) to inodes.
type Tree map[string]*Inode

// NewTree returns a tree holding only the root directory.
func NewTree() Tree { return Tree{"/": {Kind: Dir, Mode: 0o755}} }

// ApplyTar applies one OCI layer (an uncompressed tar stream) to the tree with OCI whiteout semantics.
func (t Tree) ApplyTar(r io.Reader) error {
	tr := tar.NewReader(r)
	opaqueDirs := map[string]bool{}
	added := map[string]bool{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read tar: %w", err)
		}
		p, err := cleanPath(h.Name)
		if err != nil {
			return err
		}
		dir, base := path.Split(p)
		dir = path.Clean(dir)
		if base == opaque {
			opaqueDirs[dir] = true
			continue
		}
		if name, ok := strings.CutPrefix(base, whiteout); ok {
			t.remove(path.Join(dir, name))
			continue
		}
		t.ensureParents(p)
		if h.Typeflag == tar.TypeLink {
			target, err := cleanPath(h.Linkname)
			if err != nil {
				return err
			}
			ino, ok := t[target]
			if !ok {
				return fmt.Errorf("entry %q: hardlink target %q does not exist", h.Name, h.Linkname)
			}
			if old, ok := t[p]; ok && old.Kind == Dir {
				t.remove(p)
			}
			t[p] = ino
			added[p] = true
			continue
		}
		ino, err := inodeFromHeader(h, tr)
		if err != nil {
			return fmt.Errorf("entry %q: %w", h.Name, err)
		}
		if old, ok := t[p]; ok {
			if old.Kind == Dir && ino.Kind == Dir {
				*old = *ino // an existing directory keeps its contents
				added[p] = true
				continue
			}
			t.remove(p)
		}
		t[p] = ino
		added[p] = true
	}
	for dir := range opaqueDirs {
		prefix := strings.TrimSuffix(dir, "/") + "/"
		for p := range t {
			if strings.HasPrefix(p, prefix) && !added[p] {
				delete(t, p)
			}
		}
	}
	return nil
}

func inodeFromHeader(h *tar.Header, r io.Reader) (*Inode, error) {
	ino := &Inode{Mode: uint32(h.Mode) & 0o7777, UID: uint32(h.Uid), GID: uint32(h.Gid), Mtime: h.ModTime}
	for k, v := range h.PAXRecords {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if ino.Xattrs == nil {
				ino.Xattrs = map[string]string{}
			}
			ino.Xattrs[name] = v
		}
	}
	switch h.Typeflag {
	case tar.TypeReg, tar.TypeGNUSparse:
		ino.Kind = Regular
		hash := sha256.New()
		n, err := io.Copy(hash, r)
		if err != nil {
			return nil, err
		}
		ino.Size, ino.Digest = n, hex.EncodeToString(hash.Sum(nil))
	case tar.TypeDir:
		ino.Kind = Dir
	case tar.TypeSymlink:
		ino.Kind, ino.Link, ino.Size = Symlink, h.Linkname, int64(len(h.Linkname))
	case tar.TypeChar:
		ino.Kind, ino.Major, ino.Minor = CharDev, uint32(h.Devmajor), uint32(h.Devminor)
	case tar.TypeBlock:
		ino.Kind, ino.Major, ino.Minor = BlockDev, uint32(h.Devmajor), uint32(h.Devminor)
	case tar.TypeFifo:
		ino.Kind = FIFO
	default:
		return nil, fmt.Errorf("unsupported tar entry type %q", h.Typeflag)
	}
	return ino, nil
}

func (t Tree) ensureParents(p string) {
	for dir := path.Dir(p); dir != "/"; dir = path.Dir(dir) {
		if ino, ok := t[dir]; ok && ino.Kind == Dir {
			return
		} else if ok {
			t.remove(dir)
		}
		t[dir] = &Inode{Kind: Dir, Mode: 0o755, Implicit: true}
	}
}

func (t Tree) remove(p string) {
	delete(t, p)
	prefix := p + "/"
	for q := range t {
		if strings.HasPrefix(q, prefix) {
			delete(t, q)
		}
	}
}

func cleanPath(name string) (string, error) {
	p := path.Clean("/" + name)
	for _, part := range strings.Split(name, "/") {
		if part == ".." {
			return "", fmt.Errorf("entry %q: path escapes the root", name)
		}
	}
	return p, nil
}

// Difference is one way two trees differ.
type Difference struct {
	Path  string
	Field string // "missing", "extra", "type", "mode", "uid", "gid", "size", "content", "mtime", "link", "device", "xattr <name>", "hardlinks"
	Want  string // in the source
	Got   string // in the converted image
}

func (d Difference) String() string {
	return fmt.Sprintf("%s: %s: source %s, converted %s", d.Path, d.Field, d.Want, d.Got)
}

// Options tune Compare.
type Options struct {
	// IgnoreExtra lists paths that may exist, with everything below them, only in the converted tree
	// (mkfs creates /lost+found).
	IgnoreExtra []string
}

// Compare reports every difference between the source tree want and the converted tree got, sorted by path.
func Compare(want, got Tree, opts Options) []Difference {
	var diffs []Difference
	add := func(p, field string, w, g any) {
		diffs = append(diffs, Difference{Path: p, Field: field, Want: fmt.Sprint(w), Got: fmt.Sprint(g)})
	}
	wantGroups, gotGroups := linkGroups(want), linkGroups(got)
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			add(p, "missing", w.Kind, "nothing")
			continue
		}
		if w.Kind != g.Kind {
			add(p, "type", w.Kind, g.Kind)
			continue
		}
		if w.Mode != g.Mode && w.Kind != Symlink { // Linux ignores (and cannot set) symlink permissions
			add(p, "mode", fmt.Sprintf("%04o", w.Mode), fmt.Sprintf("%04o", g.Mode))
		}
		if p != "/" || w.UID != 0 || w.GID != 0 {
			if w.UID != g.UID {
				add(p, "uid", w.UID, g.UID)
			}
			if w.GID != g.GID {
				add(p, "gid", w.GID, g.GID)
			}
		}
		switch w.Kind {
		case Regular:
			if w.Size != g.Size {
				add(p, "size", w.Size, g.Size)
			} else if w.Digest != g.Digest {
				add(p, "content", "sha256:"+w.Digest, "sha256:"+g.Digest)
			}
		case Symlink:
			if w.Link != g.Link {
				add(p, "link", w.Link, g.Link)
			}
		case CharDev, BlockDev:
			if w.Major != g.Major || w.Minor != g.Minor {
				add(p, "device", fmt.Sprintf("%d:%d", w.Major, w.Minor), fmt.Sprintf("%d:%d", g.Major, g.Minor))
			}
		}
		if p != "/" && !w.Implicit && !w.Mtime.Equal(g.Mtime) {
			add(p, "mtime", w.Mtime.UTC().Format(time.RFC3339Nano), g.Mtime.UTC().Format(time.RFC3339Nano))
		}
		for k, v := range w.Xattrs {
			if gv, ok := g.Xattrs[k]; !ok {
				add(p, "xattr "+k, fmt.Sprintf("%q", v), "absent")
			} else if gv != v {
				add(p, "xattr "+k, fmt.Sprintf("%q", v), fmt.Sprintf("%q", gv))
			}
		}
		for k, v := range g.Xattrs {
			if _, ok := w.Xattrs[k]; !ok {
				add(p, "xattr "+k, "absent", fmt.Sprintf("%q", v))
			}
		}
		if wg, gg := wantGroups[w], gotGroups[g]; w.Kind != Dir && strings.Join(wg, ",") != strings.Join(gg, ",") {
			add(p, "hardlinks", "["+strings.Join(wg, " ")+"]", "["+strings.Join(gg, " ")+"]")
		}
	}
	ignore := map[string]bool{}
	for _, p := range opts.IgnoreExtra {
		ignore[p] = true
	}
	for p, g := range got {
		if _, ok := want[p]; ok {
			continue
		}
		if ignorable(p, ignore) {
			continue
		}
		add(p, "extra", "nothing", g.Kind)
	}
	sort.Slice(diffs, func(i, j int) bool {
		if diffs[i].Path != diffs[j].Path {
			return diffs[i].Path < diffs[j].Path
		}
		return diffs[i].Field < diffs[j].Field
	})
	return diffs
}

// ignorable reports whether p is, or lies below, an ignored path.
func ignorable(p string, ignore map[string]bool) bool {
	for q := p; q != "/"; q = path.Dir(q) {
		if ignore[q] {
			return true
		}
	}
	return false
}

// linkGroups maps each non-directory inode with several paths to its sorted paths.
func linkGroups(t Tree) map[*Inode][]string {
	groups := map[*Inode][]string{}
	for p, ino := range t {
		groups[ino] = append(groups[ino], p)
	}
	for ino, ps := range groups {
		sort.Strings(ps)
		groups[ino] = ps
	}
	return groups
}

func (k Kind) String() string {
	switch k {
	case Regular:
		return "file"
	case Dir:
		return "directory"
	case Symlink:
		return "symlink"
	case CharDev:
		return "char device"
	case BlockDev:
		return "block device"
	case FIFO:
		return "fifo"
	case Socket:
		return "socket"
	}
	return fmt.Sprintf("kind(%d)", byte(k))
}
