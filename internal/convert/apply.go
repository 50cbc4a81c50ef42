// Package convert turns OCI image layers into overlaybd ext4 layers; Apply
// unpacks one layer tar into an ext4 filesystem with OCI whiteout semantics.
package convert

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math"
	"path"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/obdproject/obd/internal/ext4"
)

// ApplyOptions tune Apply.
type ApplyOptions struct {
	// IgnoreXattrErrors skips extended attributes that the filesystem
	// refuses (unknown namespace, too large) instead of failing; they are
	// counted in ApplyStats.SkippedXattrs.
	IgnoreXattrErrors bool
}

// ApplyStats counts what Apply did.
type ApplyStats struct {
	Entries    int64 // tar entries read
	Files      int64
	Dirs       int64 // directories created or updated
	Symlinks   int64
	Hardlinks  int64
	Nodes      int64 // character and block devices, FIFOs
	Whiteouts  int64 // .wh. entries processed
	OpaqueDirs int64
	// DataBytes is the regular file content read from the tar.
	DataBytes     int64
	SkippedXattrs int64
}

const (
	whiteoutPrefix = ".wh."
	whiteoutMeta   = whiteoutPrefix + whiteoutPrefix
	whiteoutOpaque = whiteoutMeta + ".opq"
	paxXattr       = "SCHILY.xattr."
)

var errEscape = errors.New("path escapes the root")

// Apply unpacks the uncompressed layer tar r into fsys with OCI layer
// semantics: entries replace what lower layers have at their path (a
// directory over a directory only updates its metadata), ".wh.NAME"
// removes NAME of lower layers and ".wh..wh..opq" hides all lower content
// of its directory. Missing parent directories are created (0755, root,
// with the entry's mtime).
// Errors name the tar entry they come from.
func Apply(ctx context.Context, fsys *ext4.FS, r io.Reader, opts ApplyOptions) (ApplyStats, error) {
	a := &applier{
		fs:      fsys,
		opts:    opts,
		touched: make(map[string]struct{}),
		dirs:    make(map[string]struct{}),
	}
	tr := tar.NewReader(ctxReader{ctx, r})
	last := ""
	for {
		if err := ctx.Err(); err != nil {
			return a.stats, err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			if last == "" {
				return a.stats, fmt.Errorf("reading layer: %w", err)
			}
			return a.stats, fmt.Errorf("reading layer after entry %q: %w", last, err)
		}
		last = hdr.Name
		a.stats.Entries++
		if err := a.entry(hdr, tr); err != nil {
			return a.stats, fmt.Errorf("layer entry %q: %w", hdr.Name, err)
		}
	}
	// Directory times as in the tar, even if anything touched them since.
	for _, d := range a.dirMeta {
		if err := fsys.SetMeta(d.path, d.meta); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return a.stats, fmt.Errorf("layer entry %q: %w", d.name, err)
		}
	}
	return a.stats, nil
}

type applier struct {
	fs    *ext4.FS
	opts  ApplyOptions
	stats ApplyStats
	// touched holds the paths this layer wrote and their ancestors: what
	// an opaque directory or a whiteout in the same layer must keep.
	touched map[string]struct{}
	// dirs caches paths known to be directories (after following
	// symlinks); it is dropped whenever a directory is removed.
	dirs    map[string]struct{}
	dirMeta []dirMeta
}

type dirMeta struct {
	name, path string
	meta       ext4.Meta
}

// cleanEntry maps a tar name to an absolute path in the filesystem,
// rejecting names that climb out of the root.
func cleanEntry(name string) (string, error) {
	c := path.Clean(strings.TrimLeft(name, "/"))
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", errEscape
	}
	if c == "." {
		return "/", nil
	}
	return "/" + c, nil
}

func (a *applier) entry(hdr *tar.Header, r io.Reader) error {
	p, err := cleanEntry(hdr.Name)
	if err != nil {
		return err
	}
	if p == "/" || hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil // like containerd: the root itself is never replaced
	}
	dir, base := path.Split(p)
	if strings.HasPrefix(base, whiteoutPrefix) {
		return a.whiteout(dir, base, hdr.ModTime)
	}
	m, err := metaOf(hdr)
	if err != nil {
		return err
	}
	if err := a.mkParents(path.Clean(dir), hdr.ModTime); err != nil {
		return err
	}

	var link string
	if hdr.Typeflag == tar.TypeLink {
		if link, err = cleanEntry(hdr.Linkname); err != nil {
			return fmt.Errorf("hardlink target %q: %w", hdr.Linkname, err)
		}
		if link == p {
			return fmt.Errorf("hardlink to itself")
		}
	}

	if st, err := a.fs.Lstat(p); err == nil {
		if st.IsDir() && hdr.Typeflag == tar.TypeDir {
			if err := a.fs.SetMeta(p, m); err != nil {
				return err
			}
			a.stats.Dirs++
			return a.finish(hdr, p, m)
		}
		if err := a.remove(p, st.Mode&ext4.ModeTypeMask); err != nil {
			return fmt.Errorf("replacing existing entry: %w", err)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}

	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeGNUSparse, tar.TypeCont:
		if err := a.fs.CreateFile(p, m, r, hdr.Size); err != nil {
			return err
		}
		a.stats.Files++
		a.stats.DataBytes += hdr.Size
	case tar.TypeDir:
		if err := a.fs.Mkdir(p, m); err != nil {
			return err
		}
		a.dirs[p] = struct{}{}
		a.stats.Dirs++
	case tar.TypeSymlink:
		m.Mode = 0o777
		if err := a.fs.Symlink(p, hdr.Linkname, m); err != nil {
			return err
		}
		a.stats.Symlinks++
	case tar.TypeLink:
		if err := a.fs.Link(p, link); err != nil {
			return err
		}
		// Like GNU tar, the shared inode keeps the metadata of the entry
		// that created it (writers repeat it in link headers anyway).
		a.stats.Hardlinks++
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		typ := map[byte]uint32{tar.TypeChar: ext4.ModeChar, tar.TypeBlock: ext4.ModeBlock, tar.TypeFifo: ext4.ModeFIFO}[hdr.Typeflag]
		if hdr.Devmajor < 0 || hdr.Devmajor >= 1<<12 || hdr.Devminor < 0 || hdr.Devminor >= 1<<20 {
			return fmt.Errorf("device number %d:%d out of range", hdr.Devmajor, hdr.Devminor)
		}
		if err := a.fs.Mknod(p, typ, uint32(hdr.Devmajor), uint32(hdr.Devminor), m); err != nil {
			return err
		}
		a.stats.Nodes++
	default:
		return fmt.Errorf("unsupported tar entry type %q", hdr.Typeflag)
	}
	return a.finish(hdr, p, m)
}

// finish sets the xattrs of a written entry and records it as touched.
func (a *applier) finish(hdr *tar.Header, p string, m ext4.Meta) error {
	// In a fixed order: where xattrs land depends on it.
	for _, k := range slices.Sorted(maps.Keys(hdr.PAXRecords)) {
		name, ok := strings.CutPrefix(k, paxXattr)
		if !ok {
			continue
		}
		if err := a.fs.SetXattr(p, name, []byte(hdr.PAXRecords[k])); err != nil {
			if !a.opts.IgnoreXattrErrors {
				return fmt.Errorf("xattr %s: %w", name, err)
			}
			a.stats.SkippedXattrs++
		}
	}
	if hdr.Typeflag == tar.TypeDir {
		a.dirMeta = append(a.dirMeta, dirMeta{name: hdr.Name, path: p, meta: m})
	}
	for q := p; q != "/"; q = path.Dir(q) {
		if _, ok := a.touched[q]; ok {
			break
		}
		a.touched[q] = struct{}{}
	}
	return nil
}

// remove removes p, whose file type is typ.
func (a *applier) remove(p string, typ uint32) error {
	if typ == ext4.ModeDir || typ == ext4.ModeSymlink {
		clear(a.dirs) // they may have been, or led to, cached parents
	}
	return a.fs.Remove(p)
}

// mkParents makes sure directory dir exists, creating missing components
// like containerd does (0755, owned by root), with the entry's mtime.
func (a *applier) mkParents(dir string, mtime time.Time) error {
	if _, ok := a.dirs[dir]; ok || dir == "/" {
		return nil
	}
	st, err := a.fs.Stat(dir)
	switch {
	case err == nil && st.IsDir():
	case err == nil:
		return fmt.Errorf("parent %s: %w", dir, syscall.ENOTDIR)
	case errors.Is(err, fs.ErrNotExist):
		if err := a.mkParents(path.Dir(dir), mtime); err != nil {
			return err
		}
		m := ext4.Meta{Mode: 0o755, Atime: mtime, Mtime: mtime, Ctime: mtime}
		if err := a.fs.Mkdir(dir, m); err != nil {
			return fmt.Errorf("creating parent: %w", err)
		}
		a.touched[dir] = struct{}{}
	default:
		return fmt.Errorf("parent %s: %w", dir, err)
	}
	a.dirs[dir] = struct{}{}
	return nil
}

// whiteout handles a ".wh." entry named base in directory dir.
func (a *applier) whiteout(dir, base string, mtime time.Time) error {
	dir = path.Clean(dir)
	switch {
	case base == whiteoutOpaque:
		a.stats.OpaqueDirs++
		if err := a.mkParents(dir, mtime); err != nil {
			return err
		}
		return a.opaque(dir)
	case strings.HasPrefix(base, whiteoutMeta):
		return nil // other AUFS metadata: not part of the image
	}
	name := base[len(whiteoutPrefix):]
	if name == "" || name == "." || name == ".." {
		return fmt.Errorf("invalid whiteout name %q", base)
	}
	a.stats.Whiteouts++
	p := path.Join(dir, name)
	if _, ok := a.touched[p]; ok {
		return nil // whiteouts only hide lower layers
	}
	st, err := a.fs.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
		return nil
	}
	if err != nil {
		return err
	}
	return a.remove(p, st.Mode&ext4.ModeTypeMask)
}

// opaque removes everything below dir that this layer did not write.
func (a *applier) opaque(dir string) error {
	ents, err := a.fs.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		p := path.Join(dir, e.Name)
		if _, ok := a.touched[p]; !ok {
			if err := a.remove(p, e.Mode); err != nil {
				return err
			}
		} else if e.Mode == ext4.ModeDir {
			if err := a.opaque(p); err != nil {
				return err
			}
		}
	}
	return nil
}

// metaOf converts the ownership, mode and times of a tar header.
func metaOf(hdr *tar.Header) (ext4.Meta, error) {
	if hdr.Uid < 0 || int64(hdr.Uid) > math.MaxUint32 || hdr.Gid < 0 || int64(hdr.Gid) > math.MaxUint32 {
		return ext4.Meta{}, fmt.Errorf("owner %d:%d out of range", hdr.Uid, hdr.Gid)
	}
	m := ext4.Meta{
		Mode:  uint32(hdr.Mode) & 0o7777,
		UID:   uint32(hdr.Uid),
		GID:   uint32(hdr.Gid),
		Mtime: hdr.ModTime,
		Atime: hdr.AccessTime,
		Ctime: hdr.ChangeTime,
	}
	if m.Atime.IsZero() {
		m.Atime = m.Mtime
	}
	if m.Ctime.IsZero() {
		m.Ctime = m.Mtime
	}
	return m, nil
}

// ctxReader stops reading once ctx is done, so that a huge (or hugely
// sparse) entry cannot outlive a cancellation.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
