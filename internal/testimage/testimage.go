// Package testimage builds real container images from Debian packages for tests and benchmarks: it downloads .deb
// files with apt-get (cached on disk), unpacks them with dpkg-deb and re-packs them deterministically into OCI layers.
package testimage

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/klauspost/compress/gzip"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/iocount"
)

// ErrUnavailable means the packages could not be fetched (no apt, no network, or the packages are not in the
// configured suites): tests should skip, not fail.
var ErrUnavailable = errors.New("debian packages unavailable")

// Spec says which packages go into which layer. Build adds one more layer on top: ConfigLayer's small changes.
type Spec struct {
	Name string
	// Layers lists the Debian packages of each layer, bottom first.
	Layers [][]string
}

var (
	baseLayer   = []string{"base-files", "busybox-static", "libc6", "libgcc-s1", "libcrypt1", "zlib1g", "tzdata"}
	pythonLayer = []string{"python3-minimal", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
		"libexpat1", "media-types", "libffi8", "libbz2-1.0", "liblzma5", "libsqlite3-0", "libssl3", "libncursesw6",
		"libtinfo6", "libreadline8", "libuuid1", "libdb5.3"}
)

// Small is a three-layer image of about 51 MB of uncompressed tar: a busybox/glibc base, python3 and the config
// layer. /bin/busybox, /bin/sh and /usr/bin/python3 run in it.
var Small = Spec{Name: "small", Layers: [][]string{baseLayer, pythonLayer}}

// Large is a five-layer image of about 413 MB of uncompressed tar: Small plus perl and ICU, then LLVM and the Go
// 1.19 source tree (13k small files), then the config layer.
var Large = Spec{Name: "large", Layers: [][]string{
	baseLayer,
	pythonLayer,
	{"perl-base", "perl-modules-5.36", "libperl5.36", "perl", "libicu72", "libstdc++6", "libxml2"},
	{"libllvm15", "libz3-4", "libedit2", "golang-1.19-src"},
}}

// Packages lists the spec's packages once each, in layer order.
func (s Spec) Packages() []string {
	var out []string
	seen := map[string]bool{}
	for _, l := range s.Layers {
		for _, p := range l {
			if !seen[p] {
				seen[p] = true
				out = append(out, p)
			}
		}
	}
	return out
}

// Options configure Build.
type Options struct {
	// CacheDir keeps downloaded .deb files between runs (default DefaultCacheDir()).
	CacheDir string
	// Log, if set, receives progress messages.
	Log func(format string, args ...any)
}

// DefaultCacheDir is where .debs are cached unless Options.CacheDir says otherwise.
func DefaultCacheDir() string { return filepath.Join(os.TempDir(), "obd-testimage-debs") }

// Layer describes one layer of a built image.
type Layer struct {
	Desc     ocispec.Descriptor // the gzip blob
	DiffID   digest.Digest
	TarBytes int64    // uncompressed tar size
	Entries  int      // tar entries
	Packages []string // Debian packages in the layer (none for the config layer)
	// Whiteouts are the paths this layer deletes from the layers below (".wh.NAME" entries), Opaque the
	// directories whose lower contents it hides (".wh..wh..opq" entries).
	Whiteouts, Opaque []string
}

// Image is an image written by Build into an OCI layout.
type Image struct {
	Ref    image.Ref // oci:DIR:TAG
	Layers []Layer
	// Versions maps each package to the version that was used.
	Versions map[string]string
}

// TarBytes is the total uncompressed size of the image's layers.
func (im *Image) TarBytes() int64 {
	var n int64
	for _, l := range im.Layers {
		n += l.TarBytes
	}
	return n
}

// ConfigMtime is the modification time of every entry of the config layer and the image's creation time.
var ConfigMtime = time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)

// Build writes the image of spec into an OCI layout at dir (tagged spec.Name). The same .deb files always give
// the same digests. It fails with an error wrapping ErrUnavailable when the packages cannot be fetched.
func Build(ctx context.Context, spec Spec, dir string, opts Options) (*Image, error) {
	if opts.CacheDir == "" {
		opts.CacheDir = DefaultCacheDir()
	}
	debs, err := Fetch(ctx, spec.Packages(), opts.CacheDir, opts.Log)
	if err != nil {
		return nil, err
	}
	lay, err := image.CreateLayout(dir)
	if err != nil {
		return nil, err
	}
	im := &Image{Ref: image.Ref{Transport: image.TransportOCI, Path: dir, Tag: spec.Name}, Versions: map[string]string{}}
	for _, d := range debs {
		im.Versions[d.Package] = d.Version
	}
	byName := map[string]Deb{}
	for _, d := range debs {
		byName[d.Package] = d
	}
	for i, pkgs := range spec.Layers {
		l, err := writeLayer(lay, func(lw *layerWriter) error {
			for _, p := range pkgs {
				if err := lw.addDeb(ctx, byName[p].Path); err != nil {
					return fmt.Errorf("package %s (%s): %w", p, byName[p].Path, err)
				}
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("image %s: layer %d: %w", spec.Name, i, err)
		}
		l.Packages = pkgs
		im.Layers = append(im.Layers, l)
		if opts.Log != nil {
			opts.Log("testimage %s: layer %d: %d entries, %d MB tar, %d MB gzip", spec.Name, i, l.Entries, l.TarBytes>>20, l.Desc.Size>>20)
		}
	}
	l, err := writeLayer(lay, configLayer)
	if err != nil {
		return nil, fmt.Errorf("image %s: config layer: %w", spec.Name, err)
	}
	im.Layers = append(im.Layers, l)
	if err := writeManifest(lay, im); err != nil {
		return nil, fmt.Errorf("image %s: %w", spec.Name, err)
	}
	return im, nil
}

func writeManifest(lay *image.Layout, im *Image) error {
	created := ConfigMtime
	cfg := ocispec.Image{
		Created:  &created,
		Platform: ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH},
		Config: ocispec.ImageConfig{
			Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			Cmd: []string{"/bin/sh"},
		},
		RootFS: ocispec.RootFS{Type: "layers"},
	}
	var m ocispec.Manifest
	m.SchemaVersion = 2
	m.MediaType = ocispec.MediaTypeImageManifest
	for _, l := range im.Layers {
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.DiffID)
		by := "obd testimage: config changes"
		if len(l.Packages) > 0 {
			by = "obd testimage: dpkg-deb --fsys-tarfile " + strings.Join(l.Packages, " ")
		}
		cfg.History = append(cfg.History, ocispec.History{Created: &created, CreatedBy: by})
		m.Layers = append(m.Layers, l.Desc)
	}
	cb, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	if m.Config, err = lay.PutBlobBytes(ocispec.MediaTypeImageConfig, cb); err != nil {
		return err
	}
	mb, err := json.Marshal(m)
	if err != nil {
		return err
	}
	md, err := lay.PutBlobBytes(ocispec.MediaTypeImageManifest, mb)
	if err != nil {
		return err
	}
	return lay.Tag(im.Ref.Tag, md)
}

// layerWriter writes one layer's tar, keeping each path once (directories shared by packages, first one wins).
type layerWriter struct {
	tw    *tar.Writer
	seen  map[string]bool
	layer *Layer
}

// writeLayer writes a gzip'd layer into the layout's blobs, with the entries fill writes.
func writeLayer(lay *image.Layout, fill func(*layerWriter) error) (Layer, error) {
	tmp, err := os.CreateTemp(filepath.Join(lay.Dir, "blobs", "sha256"), ".layer-*")
	if err != nil {
		return Layer{}, err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	blobHash, diffHash := sha256.New(), sha256.New()
	blob := &iocount.Writer{W: io.MultiWriter(tmp, blobHash)}
	bw := bufio.NewWriterSize(blob, 1<<20)
	zw, err := gzip.NewWriterLevel(bw, gzip.DefaultCompression)
	if err != nil {
		return Layer{}, err
	}
	raw := &iocount.Writer{W: io.MultiWriter(zw, diffHash)}
	var l Layer
	lw := &layerWriter{tw: tar.NewWriter(raw), seen: map[string]bool{}, layer: &l}
	if err := fill(lw); err != nil {
		return Layer{}, err
	}
	if err := lw.tw.Close(); err != nil {
		return Layer{}, err
	}
	if err := zw.Close(); err != nil {
		return Layer{}, err
	}
	if err := bw.Flush(); err != nil {
		return Layer{}, err
	}
	if err := tmp.Close(); err != nil {
		return Layer{}, err
	}
	l.TarBytes = raw.N
	l.DiffID = digest.NewDigest(digest.SHA256, diffHash)
	l.Desc = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.NewDigest(digest.SHA256, blobHash), Size: blob.N}
	if err := lay.PutBlobFile(tmp.Name(), l.Desc.Digest, l.Desc.Size); err != nil {
		return Layer{}, err
	}
	return l, nil
}

// add writes one entry. Paths are relative, directories end in "/"; a path written before is skipped.
func (lw *layerWriter) add(h *tar.Header, body io.Reader) error {
	key := strings.TrimSuffix(h.Name, "/")
	if lw.seen[key] {
		return nil
	}
	lw.seen[key] = true
	base := path.Base(key)
	switch {
	case base == ".wh..wh..opq":
		lw.layer.Opaque = append(lw.layer.Opaque, path.Dir(key))
	case strings.HasPrefix(base, ".wh."):
		lw.layer.Whiteouts = append(lw.layer.Whiteouts, path.Join(path.Dir(key), strings.TrimPrefix(base, ".wh.")))
	}
	if err := lw.tw.WriteHeader(h); err != nil {
		return fmt.Errorf("%s: %w", h.Name, err)
	}
	lw.layer.Entries++
	if body != nil && h.Size > 0 {
		if _, err := io.CopyN(lw.tw, body, h.Size); err != nil {
			return fmt.Errorf("%s: %w", h.Name, err)
		}
	}
	return nil
}

// debPath turns a dpkg-deb member name ("./usr/bin/x") into a layer path ("usr/bin/x"); "" for the root.
func debPath(name string) string {
	p := path.Clean("/" + name)
	if p == "/" {
		return ""
	}
	return p[1:]
}

// addDeb appends the filesystem tree of a .deb (dpkg-deb --fsys-tarfile keeps owners, modes and mtimes).
func (lw *layerWriter) addDeb(ctx context.Context, deb string) error {
	cmd := exec.CommandContext(ctx, "dpkg-deb", "--fsys-tarfile", deb)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("%w: dpkg-deb: %w", ErrUnavailable, err)
	}
	err = lw.copyDebTar(bufio.NewReaderSize(out, 1<<20))
	io.Copy(io.Discard, out)
	if werr := cmd.Wait(); err == nil && werr != nil {
		err = fmt.Errorf("dpkg-deb --fsys-tarfile: %v: %s (delete the cached file if it is corrupt)", werr, bytes.TrimSpace(stderr.Bytes()))
	}
	return err
}

func (lw *layerWriter) copyDebTar(r io.Reader) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		name := debPath(h.Name)
		if name == "" {
			continue
		}
		out := &tar.Header{
			Typeflag: h.Typeflag, Name: name, Mode: h.Mode & 0o7777, Uid: h.Uid, Gid: h.Gid,
			Uname: h.Uname, Gname: h.Gname, ModTime: h.ModTime, Devmajor: h.Devmajor, Devminor: h.Devminor,
		}
		switch h.Typeflag {
		case tar.TypeDir:
			out.Name += "/"
		case tar.TypeReg:
			out.Size = h.Size
		case tar.TypeSymlink:
			out.Linkname = h.Linkname
		case tar.TypeLink:
			out.Linkname = debPath(h.Linkname)
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		default:
			return fmt.Errorf("%s: unexpected tar entry type %q", h.Name, h.Typeflag)
		}
		if err := lw.add(out, tr); err != nil {
			return err
		}
	}
}

// Paths the config layer touches, for tests that check them on a mounted image.
const (
	WhiteoutPath = "etc/update-motd.d/10-uname"       // a base-files file the config layer deletes
	OpaqueDir    = "usr/share/doc/base-files"         // made opaque; holds only README.obd afterwards
	SetuidPath   = "usr/local/bin/suid-tool"          // mode 04755
	CapPath      = "usr/local/bin/ping-cap"           // security.capability = CapValue
	HardlinkPath = "bin/sh"                           // a hardlink to bin/busybox (a file of the layer below)
	InLayerLink  = "etc/obd/app.conf.bak"             // a hardlink to etc/obd/app.conf, same layer
	ReplacedPath = "etc/debian_version"               // rewritten with ReplacedBody
	ReplacedBody = "12-obd\n"                         // the new content of ReplacedPath
	OwnedPath    = "home/app/.profile"                // owned by 1000:1000
	SymlinkPath  = "usr/local/bin/py"                 // -> /usr/bin/python3
	opaqueMarker = OpaqueDir + "/.wh..wh..opq"        // the opaque marker entry
	whiteoutName = "etc/update-motd.d/.wh.10-uname"   // the whiteout entry
	capXattr     = "SCHILY.xattr.security.capability" // PAX record of the capability
)

// CapValue is a VFS v2 capability (effective, permitted cap_net_raw), as `setcap cap_net_raw+ep` writes it.
const CapValue = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

// configLayer is a small layer of the kind a Dockerfile's last steps make: a whiteout of a lower file, an opaque
// directory, hardlinks (to a lower file and within the layer), a setuid file, a file capability, a replaced
// file, files owned by a user, a sticky and a setgid directory, a symlink.
func configLayer(lw *layerWriter) error {
	t := ConfigMtime
	dir := func(name string, mode int64, uid, gid int) *tar.Header {
		return &tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode, Uid: uid, Gid: gid, ModTime: t}
	}
	file := func(name string, mode int64, uid, gid int, body string) (*tar.Header, io.Reader) {
		return &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Uid: uid, Gid: gid, ModTime: t, Size: int64(len(body))}, strings.NewReader(body)
	}
	link := func(typ byte, name, target string) *tar.Header {
		return &tar.Header{Typeflag: typ, Name: name, Linkname: target, Mode: 0o777, ModTime: t}
	}
	type ent struct {
		h    *tar.Header
		body io.Reader
	}
	e := func(h *tar.Header, r io.Reader) ent { return ent{h, r} }
	capH, capR := file(CapPath, 0o755, 0, 0, "#!/bin/sh\necho ping\n")
	capH.PAXRecords = map[string]string{capXattr: CapValue}
	capH.Format = tar.FormatPAX
	ents := []ent{
		e(dir("etc", 0o755, 0, 0), nil),
		e(file("etc/passwd", 0o644, 0, 0, "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")),
		e(file("etc/group", 0o644, 0, 0, "root:x:0:\nmail:x:8:\napp:x:1000:\n")),
		e(file(ReplacedPath, 0o644, 0, 0, ReplacedBody)),
		e(dir("etc/update-motd.d", 0o755, 0, 0), nil),
		e(file(whiteoutName, 0o644, 0, 0, "")),
		e(dir("etc/obd", 0o750, 0, 0), nil),
		e(file("etc/obd/app.conf", 0o640, 0, 0, "listen = 0.0.0.0:8080\n")),
		e(link(tar.TypeLink, InLayerLink, "etc/obd/app.conf"), nil),
		e(link(tar.TypeLink, HardlinkPath, "bin/busybox"), nil),
		e(dir(OpaqueDir, 0o755, 0, 0), nil),
		e(file(opaqueMarker, 0o644, 0, 0, "")),
		e(file(OpaqueDir+"/README.obd", 0o644, 0, 0, "base-files docs were replaced by an opaque directory\n")),
		e(dir("usr/local/bin", 0o755, 0, 0), nil),
		e(file(SetuidPath, 0o4755, 0, 0, "#!/bin/sh\nid\n")),
		e(capH, capR),
		e(link(tar.TypeSymlink, SymlinkPath, "/usr/bin/python3"), nil),
		e(dir("home", 0o755, 0, 0), nil),
		e(dir("home/app", 0o750, 1000, 1000), nil),
		e(file(OwnedPath, 0o644, 1000, 1000, "export PS1='app$ '\n")),
		e(dir("tmp", 0o1777, 0, 0), nil),
		e(dir("var/mail", 0o2775, 0, 8), nil),
	}
	for _, x := range ents {
		if err := lw.add(x.h, x.body); err != nil {
			return err
		}
	}
	return nil
}
