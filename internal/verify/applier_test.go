package verify

import (
	"archive/tar"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/pkg/archive"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/testenv"
)

func dirEnt(name string) ent           { return ent{name: name, typ: tar.TypeDir, mode: 0o755} }
func fileEnt(name, body string) ent    { return ent{name: name, typ: tar.TypeReg, body: body} }
func symEnt(name, target string) ent   { return ent{name: name, typ: tar.TypeSymlink, link: target} }
func hardEnt(name, target string) ent  { return ent{name: name, typ: tar.TypeLink, link: target} }
func whiteoutEnt(dir, name string) ent { return fileEnt(dir+".wh."+name, "") }

// applierCase is a stack of layers whose meaning depends on how an applier resolves the parents of entries.
type applierCase struct {
	name   string
	layers [][]ent
	// converter says how the converter's result departs from containerd's on this case, which therefore
	// stays out of TestVerifyConverted; empty when they agree.
	converter string
}

var applierCases = []applierCase{
	{name: "writes through symlinked parents", layers: [][]ent{{
		dirEnt("real/"), fileEnt("real/old", "old"), dirEnt("deep/"),
		symEnt("rel", "real"), symEnt("abs", "/real/"), symEnt("deep/up", "../real"), symEnt("esc", "../../../real"),
		symEnt("chain", "rel/sub"), symEnt("lib", "/usr/lib"), dirEnt("usr/"), dirEnt("usr/lib/"),
	}, {
		fileEnt("rel/new", "new"), fileEnt("abs/a", "a"), fileEnt("deep/up/b", "b"), fileEnt("esc/c", "c"),
		fileEnt("rel/sub/d", "d"), dirEnt("abs/dir/"), fileEnt("chain/e", "e"), fileEnt("lib/libc.so", "elf"),
		fileEnt("x/../lib/libm.so", "elf"), symEnt("rel/old", "new"), ent{name: "abs/dev/", typ: tar.TypeDir, mode: 0o700, uid: 7},
		ent{name: "rel/fifo", typ: tar.TypeFifo, mode: 0o600},
	}}},
	{name: "whiteouts through symlinked parents", layers: [][]ent{{
		dirEnt("real/"), fileEnt("real/x", "x"), fileEnt("real/y", "y"), fileEnt("real/z", "z"), dirEnt("real/sub/"),
		fileEnt("real/sub/s", "s"), symEnt("rel", "real"), symEnt("abs", "/real"),
	}, {
		whiteoutEnt("rel/", "x"), whiteoutEnt("abs/", "y"), whiteoutEnt("abs/", "sub"), whiteoutEnt("", "nothing"),
	}}},
	{name: "opaque directory through a symlinked parent", layers: [][]ent{{
		dirEnt("real/"), fileEnt("real/x", "x"), dirEnt("real/sub/"), fileEnt("real/sub/s", "s"), symEnt("rel", "real"),
		dirEnt("other/"), fileEnt("other/o", "o"),
	}, {
		fileEnt("rel/n", "n"), dirEnt("rel/sub/"), whiteoutEnt("rel/", ".wh..opq"), fileEnt("rel/after", "after"),
	}}},
	{name: "opaque root", layers: [][]ent{{
		dirEnt("a/"), fileEnt("a/x", "x"), fileEnt("b", "b"), symEnt("c", "a"), dirEnt("d/"), fileEnt("d/e", "e"),
	}, {
		fileEnt("keep", "keep"), dirEnt("d/"), whiteoutEnt("", ".wh..opq"), fileEnt("after", "after"),
	}}},
	{name: "hardlinks through symlinks", layers: [][]ent{{
		dirEnt("real/"), dirEnt("real/sub/"), fileEnt("real/sub/f", "f"), symEnt("lnk", "real/sub"), symEnt("abs", "/real/sub"),
		dirEnt("a/"), dirEnt("a/b/"),
	}, {
		hardEnt("h1", "lnk/f"), hardEnt("lnk/h2", "real/sub/f"), hardEnt("h3", "a/b/../../real/sub/f"),
		hardEnt("h4", "./real//sub/./f"), hardEnt("abs/h5", "/abs/f"), hardEnt("h6", "lnk"),
	}}},
	{name: "directory over directory keeps xattrs", layers: [][]ent{{
		{name: "d/", typ: tar.TypeDir, mode: 0o755, xattrs: map[string]string{"user.a": "1", "user.b": "old"}},
	}, {
		{name: "d/", typ: tar.TypeDir, mode: 0o750, xattrs: map[string]string{"user.b": "2"}},
	}}},
	{name: "entries over the root's own entry", layers: [][]ent{{
		{name: "./", typ: tar.TypeDir, mode: 0o700}, fileEnt("./f", "f"),
	}}},
	{name: "opaque directory through a symlink, its entries written by the real path", layers: [][]ent{{
		dirEnt("real/"), fileEnt("real/x", "x"), symEnt("rel", "real"),
	}, {
		fileEnt("real/n", "n"), whiteoutEnt("rel/", ".wh..opq"),
	}}, converter: "removes /real/n: it keeps what the layer wrote by the name it was written under"},
	{name: "hardlink target with .. after a symlink", layers: [][]ent{{
		dirEnt("real/"), dirEnt("real/sub/"), fileEnt("real/sub/f", "f"), symEnt("lnk", "real/sub"), dirEnt("sub/"),
		fileEnt("sub/f", "decoy"),
	}, {
		hardEnt("h", "lnk/../sub/f"),
	}}, converter: "links /h to /sub/f: it cleans the target lexically, containerd takes .. after resolving lnk"},
	{name: "symlink target with .. after a symlink", layers: [][]ent{{
		dirEnt("real/"), dirEnt("real/sub/"), dirEnt("real/other/"), dirEnt("other/"), symEnt("lnk", "real/sub"),
		symEnt("via", "lnk/../other"),
	}, {
		fileEnt("via/f", "f"),
	}}, converter: "writes /other/f: it cleans lnk/../other lexically, containerd takes .. after resolving lnk"},
	{name: "dangling symlinked parent", layers: [][]ent{{
		symEnt("dl", "nowhere/deep"),
	}, {
		fileEnt("dl/f", "f"),
	}}, converter: "fails (mkdir /dl: file exists) where containerd makes /nowhere/deep"},
	{name: "whiteout below a missing directory", layers: [][]ent{{
		fileEnt("f", "f"),
	}, {
		whiteoutEnt("nx/", "f"),
	}}, converter: "does not make /nx, which containerd makes as the whiteout's parent"},
	{name: "whiteout after a file of the same layer", layers: [][]ent{{
		dirEnt("a/"),
	}, {
		fileEnt("a/f", "f"), whiteoutEnt("a/", "f"),
	}}, converter: "keeps /a/f: it lets whiteouts hide only lower layers, as the OCI spec says"},
	{name: "pax global header", layers: [][]ent{{
		fileEnt("pax_global_header", "p"), fileEnt("f", "f"),
	}, {
		{name: "pax_global_header", typ: tar.TypeXGlobalHeader},
	}}, converter: "keeps /pax_global_header, which containerd removes"},
	{name: "entry names above the root", layers: [][]ent{{
		fileEnt("../evil", "e"), fileEnt("a/../../b", "b"),
	}}, converter: "refuses the layer; containerd clamps the names to the root"},
}

// modelOf applies the case's layers to a new tree.
func modelOf(t *testing.T, c applierCase) Tree {
	t.Helper()
	tree := NewTree()
	for i, l := range c.layers {
		if err := tree.ApplyTar(mkTar(t, l...)); err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
	}
	return tree
}

// TestTreeMatchesContainerd applies each case with containerd's applier into a directory and checks that the
// tree built from the same layers describes that directory exactly.
func TestTreeMatchesContainerd(t *testing.T) {
	testenv.Root(t)
	for _, c := range applierCases {
		t.Run(c.name, func(t *testing.T) {
			root := filepath.Join(t.TempDir(), "rootfs")
			if err := os.Mkdir(root, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(root, 0o755); err != nil {
				t.Fatal(err)
			}
			for i, l := range c.layers {
				if _, err := archive.Apply(context.Background(), root, mkTar(t, l...)); err != nil {
					t.Fatalf("containerd, layer %d: %v", i, err)
				}
			}
			want := modelOf(t, c)
			got, err := FromDir(root)
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			for _, d := range Compare(want, got, Options{}) {
				// containerd dates a directory whose entries a later layer changes by the clock.
				if d.Field == "mtime" && want[d.Path].Kind == Dir {
					continue
				}
				t.Error(d)
				n++
			}
			if n > 0 {
				t.Fatalf("%d differences between the tree and containerd's unpacking", n)
			}
		})
	}
}

// fileDev is an ext4.Device backed by a sparse file of devSize bytes.
type fileDev struct{ *os.File }

const devSize = 64 << 20

func (fileDev) Size() int64 { return devSize }

// TestVerifyConverted converts each case on which the converter and containerd agree, and checks that verify
// finds no difference between the converted filesystem and the tree of the layers.
func TestVerifyConverted(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	for _, c := range applierCases {
		if c.converter != "" {
			continue
		}
		t.Run(c.name, func(t *testing.T) {
			f, err := os.Create(filepath.Join(t.TempDir(), "fs.img"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			dev := fileDev{f}
			if err := f.Truncate(devSize); err != nil {
				t.Fatal(err)
			}
			if err := ext4.Mkfs(context.Background(), dev, ext4.MkfsOptions{Timestamp: 1700000000}); err != nil {
				t.Fatal(err)
			}
			for i, l := range c.layers {
				fsys, err := ext4.Open(dev, true)
				if err != nil {
					t.Fatal(err)
				}
				_, err = convert.Apply(context.Background(), fsys, mkTar(t, l...), convert.ApplyOptions{})
				if cerr := fsys.Close(); err == nil {
					err = cerr
				}
				if err != nil {
					t.Fatalf("convert layer %d: %v", i, err)
				}
			}
			fsys, err := ext4.Open(dev, false)
			if err != nil {
				t.Fatal(err)
			}
			defer fsys.Close()
			got, err := FromExt4(fsys)
			if err != nil {
				t.Fatal(err)
			}
			diffs := Compare(modelOf(t, c), got, Options{IgnoreExtra: []string{"/lost+found"}})
			for _, d := range diffs {
				t.Error(d)
			}
			if len(diffs) > 0 {
				t.Fatalf("verify reports %d differences", len(diffs))
			}
		})
	}
}
