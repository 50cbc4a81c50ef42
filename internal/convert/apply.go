// Package convert turns OCI image layers into overlaybd ext4 layers; Apply
// unpacks one layer tar into an ext4 filesystem with OCI whiteout semantics.
package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math"
	"path"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/obdproject/obd/internal/erofs"
	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/units"
)

// ApplyOptions tune Apply.
type ApplyOptions struct {
	// IgnoreXattrErrors skips extended attributes that the filesystem
	// refuses (unknown namespace, too large) instead of failing; they are
	// counted in ApplyStats.SkippedXattrs.
	IgnoreXattrErrors bool
	// MapData, if set, leaves the data of regular files in the tar (TurboOCI): their blocks are allocated and
	// MapData is told, for each run of them, that n bytes at device offset devOff are the bytes at tarOff of the
	// uncompressed tar (all multiples of 512; the last run ends at the file's end rounded up to 512). GNU sparse
	// files are written as usual.
	MapData func(devOff, n, tarOff int64) error
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
// with the entry's mtime). The holes of GNU sparse files are neither read
// nor written, whatever their size. Errors name the tar entry they come
// from; a layer too big for the filesystem gives ErrDiskFull.
func Apply(ctx context.Context, fsys *ext4.FS, r io.Reader, opts ApplyOptions) (ApplyStats, error) {
	return applyTo(ctx, fsys, r, opts)
}

// ApplyErofs unpacks the uncompressed layer tar r into an erofs image being built, as Apply does into ext4.
// EROFS keeps one time per inode (the mtime); with opts.MapData every regular file with data is an error.
func ApplyErofs(ctx context.Context, b *erofs.Builder, r io.Reader, opts ApplyOptions) (ApplyStats, error) {
	return applyTo(ctx, erofsFS{b}, r, opts)
}

// filesystem is what a layer is unpacked into: an ext4 filesystem, or an erofs image being built (erofsFS).
type filesystem interface {
	Lstat(p string) (*ext4.Stat, error)
	Stat(p string) (*ext4.Stat, error)
	Realpath(p string) (string, error)
	ReadDir(p string) ([]ext4.DirEntry, error)
	Remove(p string) error
	Mkdir(p string, m ext4.Meta) error
	Symlink(p, target string, m ext4.Meta) error
	Mknod(p string, typ, major, minor uint32, m ext4.Meta) error
	Link(p, existing string) error
	SetMeta(p string, m ext4.Meta) error
	SetXattr(p, name string, value []byte) error
	CreateFile(p string, m ext4.Meta, r io.Reader, size int64) error
	CreateSparseFile(p string, m ext4.Meta, r io.Reader, size int64, data []ext4.Extent) error
	CreateMappedFile(p string, m ext4.Meta, size int64, mapData func(devOff, fileOff, n int64) error) error
	Usage() (ext4.Usage, error)
}

func applyTo(ctx context.Context, fsys filesystem, r io.Reader, opts ApplyOptions) (ApplyStats, error) {
	a := &applier{
		fs:      fsys,
		opts:    opts,
		touched: make(map[string]struct{}),
		dirs:    make(map[string]struct{}),
	}
	src := &tarSource{r: ctxReader{ctx, r}}
	tr := tar.NewReader(src)
	last := ""
	for {
		if err := ctx.Err(); err != nil {
			return a.stats, err
		}
		// What the entry left of its data goes now, so that Next reads
		// nothing but padding and headers.
		_, err := io.Copy(io.Discard, tr)
		var hdr *tar.Header
		if err == nil {
			src.record()
			hdr, err = tr.Next()
			src.stop()
		}
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
		a.dataOff = src.total
		var content io.Reader = tr
		sf, err := sparseOf(hdr, src)
		if err != nil {
			return a.stats, fmt.Errorf("layer entry %q: %w", hdr.Name, err)
		}
		if sf != nil {
			content = sf
		}
		if err := a.entry(hdr, content); err != nil {
			return a.stats, fmt.Errorf("layer entry %q: %w", hdr.Name, a.explain(err))
		}
		if sf != nil {
			// The entry's data were read past tr: a new reader goes on
			// after them.
			if err := sf.finish(); err != nil {
				return a.stats, fmt.Errorf("layer entry %q: %w", hdr.Name, err)
			}
			tr = tar.NewReader(src)
		}
	}
	return a.stats, nil
}

// ErrDiskFull is in the errors of Apply (and ConvertImage) when a layer does
// not fit in the filesystem: the virtual disk is too small. Those errors wrap
// ext4's error too, which is a syscall.ENOSPC: test for ErrDiskFull first to
// tell a full virtual disk from a full work dir.
var ErrDiskFull = errors.New("the virtual disk is full")

// explain rewords the error of a full filesystem, which would otherwise
// read as a full disk on the host.
func (a *applier) explain(err error) error {
	var what string
	fsName := "ext4 filesystem"
	switch {
	case errors.Is(err, erofs.ErrNoSpace):
		what, fsName = "no free block", "erofs image"
	case errors.Is(err, ext4.ErrNoFreeBlocks):
		what = "no free block"
	case errors.Is(err, ext4.ErrNoFreeInodes):
		what = "no free inode (one per file)"
	default:
		return err
	}
	size := ""
	if u, uerr := a.fs.Usage(); uerr == nil {
		size = " of " + units.Bytes(u.Blocks*u.BlockSize)
	}
	return fmt.Errorf("%w: its %s%s has %s left (%w); convert with a larger --vsize (GiB)", ErrDiskFull, fsName, size, what, err)
}

type applier struct {
	fs      filesystem
	dataOff int64 // offset in the tar of the current entry's data
	opts    ApplyOptions
	stats   ApplyStats
	// touched holds the paths this layer wrote and their ancestors: what
	// an opaque directory or a whiteout in the same layer must keep.
	touched map[string]struct{}
	// dirs caches paths known to be directories (after following
	// symlinks); it is dropped whenever a directory is removed.
	dirs map[string]struct{}
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
			return a.finish(hdr, p)
		}
		if err := a.remove(p, st.Mode&ext4.ModeTypeMask); err != nil {
			return fmt.Errorf("replacing existing entry: %w", err)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}

	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeGNUSparse, tar.TypeCont:
		if sf, ok := r.(*sparseFile); ok {
			err = a.fs.CreateSparseFile(p, m, sf, hdr.Size, sf.data)
			a.stats.DataBytes += sf.size
		} else if a.opts.MapData != nil && a.dataOff%blockSize == 0 {
			end := (hdr.Size + blockSize - 1) / blockSize * blockSize
			err = a.fs.CreateMappedFile(p, m, hdr.Size, func(devOff, fileOff, n int64) error {
				if n = min(n, end-fileOff); n <= 0 {
					return nil
				}
				return a.opts.MapData(devOff, n, a.dataOff+fileOff)
			})
			a.stats.DataBytes += hdr.Size
		} else {
			err = a.fs.CreateFile(p, m, r, hdr.Size)
			a.stats.DataBytes += hdr.Size
		}
		if err != nil {
			return err
		}
		a.stats.Files++
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
	return a.finish(hdr, p)
}

// finish sets the xattrs of a written entry and records it as touched.
func (a *applier) finish(hdr *tar.Header, p string) error {
	// In a fixed order: where xattrs land depends on it.
	for _, k := range slices.Sorted(maps.Keys(hdr.PAXRecords)) {
		name, ok := strings.CutPrefix(k, paxXattr)
		if !ok {
			continue
		}
		v := hdr.PAXRecords[k]
		if err := a.fs.SetXattr(p, name, []byte(v)); err != nil {
			if !a.opts.IgnoreXattrErrors {
				if errors.Is(err, ext4.ErrXattrNoSpace) {
					return fmt.Errorf("xattr %s (%d bytes) is too big for ext4, which keeps the xattrs of an inode in the inode and one block (%w)", name, len(v), err)
				}
				return fmt.Errorf("xattr %s: %w", name, err)
			}
			a.stats.SkippedXattrs++
		}
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
// like containerd does (0755, owned by root), with the entry's mtime. Like
// containerd, it resolves symlinks within the root: a symlink to a missing
// directory gets that directory created.
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
		target, err := a.fs.Realpath(dir)
		if err != nil {
			return fmt.Errorf("parent %s: %w", dir, err)
		}
		if target != dir {
			if err := a.mkParents(target, mtime); err != nil {
				return fmt.Errorf("parent %s leads through a symlink to %s, which is missing and cannot be created: %w", dir, target, err)
			}
			break
		}
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

// tarSource is the layer stream under the tar reader. It records what the
// reader reads while it looks for the next entry: the sparse maps of GNU
// sparse entries are in there.
type tarSource struct {
	r         io.Reader
	total     int64 // bytes read
	recording bool
	rec       []byte
	n         int64 // bytes read while recording, rec may hold fewer
}

// maxRecord bounds what a tarSource records: enough for PAX records, GNU
// long names and sparse maps, each at most 1 MiB (archive/tar's limit).
const maxRecord = 8 << 20

func (s *tarSource) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	s.total += int64(n)
	if s.recording {
		if s.n += int64(n); s.n <= maxRecord {
			s.rec = append(s.rec, p[:n]...)
		}
	}
	return n, err
}

func (s *tarSource) record() { s.recording, s.rec, s.n = true, s.rec[:0], 0 }
func (s *tarSource) stop()   { s.recording = false }

const blockSize = 512

// sparseFile is the data of a GNU sparse entry, which Apply reads from the
// layer stream itself: archive/tar would make a zero of every byte of the
// holes, which may add up to terabytes.
type sparseFile struct {
	r    io.Reader
	data []ext4.Extent
	size int64 // data bytes, stored one after the other
	left int64 // data bytes not read yet
	pad  int64 // padding after the data
}

func (sf *sparseFile) Read(p []byte) (int, error) {
	if sf.left == 0 {
		return 0, io.EOF
	}
	n, err := sf.r.Read(p[:min(int64(len(p)), sf.left)])
	sf.left -= int64(n)
	if err == io.EOF && sf.left > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// finish skips the data the entry did not read and the padding after them.
func (sf *sparseFile) finish() error {
	if _, err := io.CopyN(io.Discard, sf, sf.left); err != nil {
		return fmt.Errorf("sparse file data: %w", err)
	}
	// Like archive/tar, an archive that ends in the padding just ends.
	var pad [blockSize]byte
	for n := int64(0); n < sf.pad; {
		k, err := sf.r.Read(pad[:sf.pad-n])
		n += int64(k)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// GNU sparse PAX records.
const (
	paxSparseMajor     = "GNU.sparse.major"
	paxSparseMinor     = "GNU.sparse.minor"
	paxSparseMap       = "GNU.sparse.map"
	paxSparseNumBlocks = "GNU.sparse.numblocks"
)

var errSparseMap = errors.New("sparse map does not match what the tar reader read")

// sparseOf returns the data of hdr if archive/tar's reader took it for a GNU
// sparse file (old GNU format or PAX 0.0, 0.1 or 1.0; as it does), reading
// the sparse map again from the headers src recorded. They were checked by
// the tar reader: what is checked here is that both read the same.
func sparseOf(hdr *tar.Header, src *tarSource) (*sparseFile, error) {
	major, minor := hdr.PAXRecords[paxSparseMajor], hdr.PAXRecords[paxSparseMinor]
	var format string
	switch {
	case hdr.Typeflag == tar.TypeXGlobalHeader:
		return nil, nil
	case hdr.Typeflag == tar.TypeGNUSparse:
		format = "old GNU"
	case major == "0" && (minor == "0" || minor == "1"):
		format = "0.1"
	case major == "1" && minor == "0":
		format = "1.0"
	case major != "" || minor != "":
		return nil, nil // an unknown version: archive/tar reads it as a plain file
	case hdr.PAXRecords[paxSparseMap] != "":
		format = "0.1"
	default:
		return nil, nil
	}
	if src.n > maxRecord {
		return nil, fmt.Errorf("GNU sparse file (%s) with headers of more than %d bytes", format, maxRecord)
	}
	h, after, err := mainHeader(src.rec)
	if err != nil {
		return nil, err
	}
	// The size of the data area in the archive.
	stored, ok := parseNumeric(h[124:136])
	if v, isSet := hdr.PAXRecords["size"]; isSet {
		n, err := strconv.ParseInt(v, 10, 64)
		stored, ok = n, err == nil
	}
	if !ok || stored < 0 {
		return nil, errSparseMap
	}
	sf := &sparseFile{r: src, pad: -stored & (blockSize - 1)}
	switch format {
	case "old GNU":
		sf.data, err = oldGNUSparseMap(h, after, hdr.Size)
	case "0.1":
		if len(after) != 0 {
			return nil, errSparseMap
		}
		sf.data, err = paxSparseMap01(hdr.PAXRecords)
	case "1.0":
		sf.data, err = paxSparseMap10(after)
		stored -= int64(len(after)) // the map is the start of the data area
	}
	if err != nil {
		return nil, err
	}
	end := int64(0)
	for _, e := range sf.data {
		if e.Offset < end || e.Length < 0 || e.Length > hdr.Size-e.Offset {
			return nil, errSparseMap
		}
		end = e.Offset + e.Length
		sf.size += e.Length
	}
	if sf.size != stored {
		return nil, fmt.Errorf("GNU sparse file (%s): its map holds %d bytes of data, the archive %d", format, sf.size, stored)
	}
	sf.left = sf.size
	return sf, nil
}

// mainHeader finds the header block of the entry the tar reader returned in
// rec, what the reader read for it: the padding of the entry before, header
// blocks, each special one (PAX records, GNU long name or link) followed by
// its data, then the entry's own header block and what came after it (GNU
// sparse extension blocks or a PAX 1.0 sparse map), which it returns too.
func mainHeader(rec []byte) (h, after []byte, err error) {
	off := len(rec) % blockSize // the reader stops at a block boundary
	for off+blockSize <= len(rec) {
		h := rec[off : off+blockSize]
		switch h[156] {
		case tar.TypeXHeader, tar.TypeGNULongName, tar.TypeGNULongLink:
			size, ok := parseNumeric(h[124:136])
			if !ok || size < 0 || size > int64(len(rec)) {
				return nil, nil, errSparseMap
			}
			off += blockSize + int(size+blockSize-1)/blockSize*blockSize
		default:
			return h, rec[off+blockSize:], nil
		}
	}
	return nil, nil, errSparseMap
}

// parseNumeric parses a numeric header field as archive/tar does: octal, or
// base-256 when the first byte has its high bit set. Only values of 0 and
// more are taken.
func parseNumeric(b []byte) (int64, bool) {
	if b[0]&0x80 != 0 {
		if b[0]&0x40 != 0 {
			return 0, false // negative
		}
		var x uint64
		for i, c := range b {
			if i == 0 {
				c &= 0x7f
			}
			if x>>56 != 0 {
				return 0, false
			}
			x = x<<8 | uint64(c)
		}
		return int64(x), x>>63 == 0
	}
	b = bytes.Trim(b, " \x00")
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	if len(b) == 0 {
		return 0, true
	}
	x, err := strconv.ParseUint(string(b), 8, 63)
	return int64(x), err == nil
}

// oldGNUSparseMap reads the sparse map of an old GNU sparse entry: up to 4
// entries in its header block h, more in the extension blocks after it.
func oldGNUSparseMap(h, ext []byte, size int64) ([]ext4.Extent, error) {
	if realSize, ok := parseNumeric(h[483:495]); !ok || realSize != size {
		return nil, errSparseMap
	}
	var data []ext4.Extent
	entries, extended := h[386:482], h[482]
	for {
		for ; len(entries) >= 24; entries = entries[24:] {
			if entries[0] == 0 {
				break // as GNU and BSD tar: the map of this block ends here
			}
			off, ok1 := parseNumeric(entries[:12])
			n, ok2 := parseNumeric(entries[12:24])
			if !ok1 || !ok2 {
				return nil, errSparseMap
			}
			data = append(data, ext4.Extent{Offset: off, Length: n})
		}
		if extended == 0 {
			break
		}
		if len(ext) < blockSize {
			return nil, errSparseMap
		}
		entries, extended, ext = ext[:504], ext[504], ext[blockSize:]
	}
	if len(ext) != 0 {
		return nil, errSparseMap
	}
	return data, nil
}

// paxSparseMap01 reads the sparse map of a PAX 0.0 or 0.1 sparse entry from
// its records (archive/tar gives the offset and numbytes records of 0.0 as
// a 0.1 map).
func paxSparseMap01(recs map[string]string) ([]ext4.Extent, error) {
	n, err := strconv.ParseInt(recs[paxSparseNumBlocks], 10, 0)
	fields := strings.Split(recs[paxSparseMap], ",")
	if len(fields) == 1 && fields[0] == "" {
		fields = nil
	}
	if err != nil || n < 0 || n > int64(len(fields)) || int64(len(fields)) != 2*n {
		return nil, errSparseMap
	}
	return sparsePairs(fields)
}

// paxSparseMap10 reads the sparse map of a PAX 1.0 sparse entry, at the
// start of its data: decimal numbers, one a line (the count of entries, then
// an offset and a length for each), in as many blocks as it takes.
func paxSparseMap10(blocks []byte) ([]ext4.Extent, error) {
	if len(blocks)%blockSize != 0 {
		return nil, errSparseMap
	}
	lines := strings.Split(string(blocks), "\n")
	n, err := strconv.ParseInt(lines[0], 10, 0)
	if err != nil || n < 0 || n > int64(len(lines)) || int64(len(lines)) < 2*n+2 {
		return nil, errSparseMap
	}
	// The tar reader read no block more than the map needs.
	if used := len(strings.Join(lines[:2*n+1], "\n")) + 1; used <= len(blocks)-blockSize {
		return nil, errSparseMap
	}
	return sparsePairs(lines[1 : 2*n+1])
}

func sparsePairs(fields []string) ([]ext4.Extent, error) {
	data := make([]ext4.Extent, 0, len(fields)/2)
	for i := 0; i+1 < len(fields); i += 2 {
		off, err1 := strconv.ParseInt(fields[i], 10, 64)
		n, err2 := strconv.ParseInt(fields[i+1], 10, 64)
		if err1 != nil || err2 != nil {
			return nil, errSparseMap
		}
		data = append(data, ext4.Extent{Offset: off, Length: n})
	}
	return data, nil
}
