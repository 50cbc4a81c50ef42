// Package verify compares the file tree of a source image (its tar layers applied in order, whiteouts honoured)
// with the file tree of a converted image, attribute by attribute, so a conversion can be proven lossless.
package verify

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"sort"
	"strings"
	"syscall"
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

// kindOfMode returns the Kind of a Linux mode's file type bits (S_IFMT); false for none of them.
func kindOfMode(mode uint32) (Kind, bool) {
	switch mode & syscall.S_IFMT {
	case syscall.S_IFREG:
		return Regular, true
	case syscall.S_IFDIR:
		return Dir, true
	case syscall.S_IFLNK:
		return Symlink, true
	case syscall.S_IFCHR:
		return CharDev, true
	case syscall.S_IFBLK:
		return BlockDev, true
	case syscall.S_IFIFO:
		return FIFO, true
	case syscall.S_IFSOCK:
		return Socket, true
	}
	return 0, false
}

// contentDigest returns the hex sha256 of r's bytes and how many there were.
func contentDigest(r io.Reader) (string, int64, error) {
	h := sha256.New()
	n, err := io.Copy(h, r)
	return hex.EncodeToString(h.Sum(nil)), n, err
}

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

// ApplyTar applies one OCI layer (an uncompressed tar stream) to the tree the way containerd's applier
// (archive.Apply of containerd/v2/pkg/archive) unpacks it into a directory, so that the tree is what containerd
// would unpack:
//   - the parent of an entry resolves as continuity's fs.RootPath resolves it: symlinks are followed, ".." and
//     absolute targets stop at the root; missing parents become directories (0755, root);
//   - an entry replaces what is at its path, except that a directory over a directory only updates its
//     metadata (xattrs are added); the root itself is never replaced;
//   - ".wh.NAME" removes NAME at once, ".wh..wh..opq" at once removes everything in its directory that this
//     layer has not unpacked yet;
//   - a hardlink shares the inode of its target, whose directory resolves like an entry's parent;
//   - a pax global header removes what is at its name.
//
// Unlike containerd, which applies a hardlink entry's owner, mode, mtime and xattrs to the inode it shares, the
// inode keeps those of the entry that made it, as GNU tar and the converter do.
func (t Tree) ApplyTar(r io.Reader) error {
	tr := tar.NewReader(r)
	unpacked := map[string]bool{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read tar: %w", err)
		}
		if err := t.apply(h, tr, unpacked); err != nil {
			return fmt.Errorf("entry %q: %w", h.Name, err)
		}
	}
}

// apply applies one tar entry; unpacked holds the paths the layer has unpacked so far.
func (t Tree) apply(h *tar.Header, r io.Reader, unpacked map[string]bool) error {
	dir, base := path.Split(path.Clean(h.Name))
	dir, err := t.rootPath(dir)
	if err != nil {
		return err
	}
	p := path.Join(dir, path.Join("/", base))
	if p == "/" {
		return nil
	}
	if err := t.mkparent(dir); err != nil {
		return err
	}
	if base == opaque {
		t.opaque(dir, unpacked)
		return nil
	}
	if name, ok := strings.CutPrefix(base, whiteout); ok {
		if name == "" || name == "." || name == ".." {
			return fmt.Errorf("invalid whiteout name %q", base)
		}
		t.remove(path.Join(dir, name))
		return nil
	}
	old, exists := t[p]
	if exists && (old.Kind != Dir || h.Typeflag != tar.TypeDir) {
		t.remove(p)
	}
	switch {
	case h.Typeflag == tar.TypeXGlobalHeader: // containerd clears its path but writes nothing there
	case h.Typeflag == tar.TypeLink:
		ino, err := t.linkTarget(h.Linkname)
		if err != nil {
			return err
		}
		t[p] = ino
	case h.Typeflag == tar.TypeDir && exists && old.Kind == Dir:
		setMeta(old, h)
		old.Implicit = false
	default:
		ino, err := inodeFromHeader(h, r)
		if err != nil {
			return err
		}
		setMeta(ino, h)
		t[p] = ino
	}
	unpacked[p] = true
	return nil
}

// linkTarget returns the inode a hardlink entry names, resolved as containerd resolves it.
func (t Tree) linkTarget(name string) (*Inode, error) {
	dir, base := path.Split(name)
	dir, err := t.rootPath(dir)
	if err != nil {
		return nil, fmt.Errorf("hardlink target %q: %w", name, err)
	}
	ino, ok := t[path.Join(dir, base)]
	switch {
	case !ok:
		return nil, fmt.Errorf("hardlink target %q: %w", name, fs.ErrNotExist)
	case ino.Kind == Dir:
		return nil, fmt.Errorf("hardlink target %q is a directory", name)
	}
	return ino, nil
}

// inodeFromHeader makes the inode of an entry that is neither a hardlink nor a merged directory, reading a
// regular file's content from r; setMeta adds the metadata.
func inodeFromHeader(h *tar.Header, r io.Reader) (*Inode, error) {
	ino := &Inode{}
	switch h.Typeflag {
	case tar.TypeReg, tar.TypeGNUSparse:
		ino.Kind = Regular
		var err error
		if ino.Digest, ino.Size, err = contentDigest(r); err != nil {
			return nil, err
		}
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

// setMeta gives ino the owner, mode, mtime and xattrs of header h; xattrs it has already are kept unless h
// sets them.
func setMeta(ino *Inode, h *tar.Header) {
	ino.Mode, ino.UID, ino.GID, ino.Mtime = uint32(h.Mode)&0o7777, uint32(h.Uid), uint32(h.Gid), h.ModTime
	for k, v := range h.PAXRecords {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if ino.Xattrs == nil {
				ino.Xattrs = map[string]string{}
			}
			ino.Xattrs[name] = v
		}
	}
}

// rootPath resolves p below the root as continuity's fs.RootPath does for containerd's applier: symlinks are
// followed in every component, the last one too, with ".." and absolute targets stopping at the root;
// components that do not exist are taken as they are. The result is clean and absolute.
func (t Tree) rootPath(p string) (string, error) {
	links := 0
	for {
		before := links
		np, err := t.walkLinks(p, &links)
		if err != nil {
			return "", err
		}
		if links == before {
			return path.Join("/", np), nil
		}
		p = np
	}
}

// walkLinks resolves the symlinks of p's components once each, as continuity's walkLinks does; the targets it
// returns may hold further symlinks.
func (t Tree) walkLinks(p string, links *int) (string, error) {
	dir, file := path.Split(p)
	switch {
	case dir == "":
		np, _, err := t.walkLink(file, links)
		return np, err
	case file == "":
		if dir == "/" {
			return dir, nil
		}
		return t.walkLinks(dir[:len(dir)-1], links)
	}
	dir, err := t.walkLinks(dir, links)
	if err != nil {
		return "", err
	}
	np, isLink, err := t.walkLink(path.Join(dir, file), links)
	if err != nil || !isLink || path.IsAbs(np) {
		return np, err
	}
	return path.Join(dir, np), nil
}

// walkLink returns the target of p if it is a symlink, else p made absolute.
func (t Tree) walkLink(p string, links *int) (target string, isLink bool, err error) {
	if *links > maxRootPathLinks {
		return "", false, errTooManyLinks
	}
	p = path.Join("/", p)
	if p == "/" {
		return p, false, nil
	}
	ino, err := t.lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return p, false, nil
	}
	if err != nil {
		return "", false, err
	}
	if ino.Kind != Symlink {
		return p, false, nil
	}
	*links++
	return ino.Link, true, nil
}

const (
	maxRootPathLinks = 255 // continuity's fs.RootPath gives up after this many symlinks
	maxLstatLinks    = 40  // Linux's limit for one path lookup
)

var errTooManyLinks = errors.New("too many links")

// lstat looks the clean absolute path p up as lstat(2) does in a chroot at the root: symlinks among the
// directories of p are followed (".." and absolute targets stopping at the root), a last symlink is not.
func (t Tree) lstat(p string) (*Inode, error) {
	cur, rest, links := "/", strings.Split(p[1:], "/"), 0
	for len(rest) > 0 {
		c := rest[0]
		rest = rest[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur = path.Dir(cur)
			continue
		}
		next := path.Join(cur, c)
		ino, ok := t[next]
		switch {
		case !ok:
			return nil, fs.ErrNotExist
		case len(rest) == 0:
			return ino, nil
		case ino.Kind == Dir:
			cur = next
		case ino.Kind == Symlink:
			if links++; links > maxLstatLinks {
				return nil, syscall.ELOOP
			}
			if path.IsAbs(ino.Link) {
				cur = "/"
			}
			rest = append(strings.Split(ino.Link, "/"), rest...)
		default:
			return nil, syscall.ENOTDIR
		}
	}
	return t["/"], nil
}

// mkparent makes sure the resolved directory dir exists, creating it and its missing parents as containerd
// does.
func (t Tree) mkparent(dir string) error {
	if dir == "/" {
		return nil
	}
	if ino, ok := t[dir]; ok {
		if ino.Kind != Dir {
			return fmt.Errorf("parent %s: %w", dir, syscall.ENOTDIR)
		}
		return nil
	}
	if err := t.mkparent(path.Dir(dir)); err != nil {
		return err
	}
	t[dir] = &Inode{Kind: Dir, Mode: 0o755, Implicit: true}
	return nil
}

// opaque removes everything below dir that is not unpacked, or lies below something not unpacked.
func (t Tree) opaque(dir string, unpacked map[string]bool) {
	prefix := strings.TrimSuffix(dir, "/") + "/"
	for p := range t {
		for q := p; q != dir && strings.HasPrefix(q, prefix); q = path.Dir(q) {
			if !unpacked[q] {
				delete(t, p)
				break
			}
		}
	}
}

// remove removes p and everything below it.
func (t Tree) remove(p string) {
	delete(t, p)
	prefix := p + "/"
	for q := range t {
		if strings.HasPrefix(q, prefix) {
			delete(t, q)
		}
	}
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
