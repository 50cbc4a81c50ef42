package verify

import (
	"archive/tar"
	"bytes"
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"
)

type ent struct {
	name, link string
	typ        byte
	body       string
	mode       int64
	uid, gid   int
	xattrs     map[string]string
}

func mkTar(t *testing.T, ents ...ent) *bytes.Reader {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Linkname: e.link, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid,
			Size: int64(len(e.body)), ModTime: time.Unix(1700000000, 0), Format: tar.FormatPAX}
		if e.mode == 0 {
			h.Mode = 0o644
		}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if e.typ == tar.TypeXGlobalHeader {
			h = &tar.Header{Name: e.name, Typeflag: e.typ, Format: tar.FormatPAX}
		}
		for k, v := range e.xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(e.body))
	}
	tw.Close()
	return bytes.NewReader(buf.Bytes())
}

func paths(tr Tree) string {
	var ps []string
	for p := range tr {
		ps = append(ps, p)
	}
	return strings.Join(sortStrings(ps), " ")
}

func sortStrings(s []string) []string {
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s
}

func TestApplyWhiteoutsAndOpaque(t *testing.T) {
	tr := NewTree()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(tr.ApplyTar(mkTar(t,
		ent{name: "a/", typ: tar.TypeDir, mode: 0o755},
		ent{name: "a/x", typ: tar.TypeReg, body: "x"},
		ent{name: "a/y", typ: tar.TypeReg, body: "y"},
		ent{name: "b/c/d", typ: tar.TypeReg, body: "d"},
		ent{name: "f", typ: tar.TypeReg, body: "f"},
		ent{name: "h", typ: tar.TypeLink, link: "f"},
	)))
	if got := paths(tr); got != "/ /a /a/x /a/y /b /b/c /b/c/d /f /h" {
		t.Fatalf("layer 1: %s", got)
	}
	if tr["/f"] != tr["/h"] {
		t.Fatal("hardlink does not share the inode")
	}
	must(tr.ApplyTar(mkTar(t,
		ent{name: "a/z", typ: tar.TypeReg, body: "z"},
		ent{name: "a/.wh..wh..opq", typ: tar.TypeReg},
		ent{name: "b/.wh.c", typ: tar.TypeReg},
		ent{name: "f/", typ: tar.TypeDir, mode: 0o700},
	)))
	if got := paths(tr); got != "/ /a /a/z /b /f /h" {
		t.Fatalf("layer 2: %s", got)
	}
	if tr["/f"].Kind != Dir || tr["/h"].Kind != Regular {
		t.Fatal("file replaced by dir wrongly")
	}
	must(tr.ApplyTar(mkTar(t, ent{name: "../evil", typ: tar.TypeReg})))
	if tr["/evil"] == nil {
		t.Fatalf("../evil not clamped to /evil: %s", paths(tr))
	}
	if err := tr.ApplyTar(mkTar(t, ent{name: "h/x", typ: tar.TypeReg})); !errors.Is(err, syscall.ENOTDIR) {
		t.Fatalf("entry below a file: %v", err)
	}
}

func TestCompare(t *testing.T) {
	base := func() Tree {
		tr := NewTree()
		tr.ApplyTar(mkTar(t,
			ent{name: "bin/ping", typ: tar.TypeReg, body: "elf", mode: 0o4755, xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02"}},
			ent{name: "l", typ: tar.TypeSymlink, link: "bin/ping"},
			ent{name: "hl", typ: tar.TypeLink, link: "bin/ping"},
		))
		return tr
	}
	if d := Compare(base(), base(), Options{}); len(d) != 0 {
		t.Fatalf("equal trees differ: %v", d)
	}
	got := base()
	got["/bin/ping"].Mode = 0o755
	delete(got["/bin/ping"].Xattrs, "security.capability")
	got["/l"] = &Inode{Kind: Symlink, Link: "elsewhere", Mtime: got["/l"].Mtime}
	got["/lost+found"] = &Inode{Kind: Dir, Mode: 0o700}
	got["/extra"] = &Inode{Kind: Regular}
	diffs := Compare(base(), got, Options{IgnoreExtra: []string{"/lost+found"}})
	var s []string
	for _, d := range diffs {
		s = append(s, d.Path+" "+d.Field)
	}
	want := "/bin/ping mode,/bin/ping xattr security.capability,/extra extra,/hl mode,/hl xattr security.capability,/l link"
	if strings.Join(s, ",") != want {
		t.Fatalf("diffs:\n%s\nwant\n%s", strings.Join(s, ","), want)
	}
}

func FuzzApplyTar(f *testing.F) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "a/b", Typeflag: tar.TypeReg, Size: 1, Mode: 0o644})
	tw.Write([]byte("x"))
	tw.WriteHeader(&tar.Header{Name: "a/.wh.b", Typeflag: tar.TypeReg})
	tw.Close()
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		tr := NewTree()
		if tr.ApplyTar(bytes.NewReader(b)) != nil {
			return
		}
		for p := range tr {
			if !strings.HasPrefix(p, "/") || strings.Contains(p+"/", "/../") {
				t.Fatalf("bad path %q", p)
			}
		}
	})
}
