package convert

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/testenv"
)

var capability = string([]byte{1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})

// VFS-format default ACL: user::rwx group::r-x other::r-x user:1000:rwx mask::rwx.
var aclDefault = string([]byte{2, 0, 0, 0,
	1, 0, 7, 0, 0xff, 0xff, 0xff, 0xff,
	2, 0, 7, 0, 0xe8, 3, 0, 0,
	4, 0, 5, 0, 0xff, 0xff, 0xff, 0xff,
	0x10, 0, 7, 0, 0xff, 0xff, 0xff, 0xff,
	0x20, 0, 5, 0, 0xff, 0xff, 0xff, 0xff})

var (
	longName   = "deep/" + strings.Repeat("n", 120) + "/" + strings.Repeat("f", 150)
	longTarget = strings.Repeat("../", 10) + strings.Repeat("t", 200)
	tNano      = time.Date(2023, 5, 6, 7, 8, 9, 987654321, time.UTC)
)

func layer1(t testing.TB) []byte {
	sh := fileE("bin/sh", 0o755, "#!shell\n")
	sh.hdr.PAXRecords = map[string]string{"SCHILY.xattr.security.capability": capability, "SCHILY.xattr.user.note": "x"}
	ping := fileE("bin/ping", 0o4755, "ping")
	ping.hdr.Uid, ping.hdr.Gid = 0, 0
	shadow := fileE("etc/shadow", 0o640, "root:*:")
	shadow.hdr.Gid = 42
	acl := dirE("acl/", 0o2775)
	acl.hdr.PAXRecords = map[string]string{"SCHILY.xattr.system.posix_acl_default": aclDefault}
	nano := fileE("nano", 0o600, "n")
	nano.hdr.ModTime, nano.hdr.AccessTime, nano.hdr.ChangeTime = tNano, tNano.Add(time.Second), tNano.Add(2*time.Second)
	late := dirE("late/", 0o711)
	late.hdr.ModTime = tBase.Add(-time.Hour)
	owned := fileE("owned", 0o644, "o")
	owned.hdr.Uid, owned.hdr.Gid = 1<<20, 65534
	dev := func(typ byte, name string, major, minor int64) ent {
		return ent{hdr: tar.Header{Typeflag: typ, Name: name, Mode: 0o660, Devmajor: major, Devminor: minor, ModTime: tBase}}
	}
	gnuName := fileE("gnu/"+strings.Repeat("g", 150), 0o644, "gnu")
	gnuName.hdr.Format = tar.FormatGNU
	gnuLink := linkE(tar.TypeSymlink, "gnu/link", longTarget)
	gnuLink.hdr.Format = tar.FormatGNU
	return buildTar(t,
		gnuName, gnuLink,
		dirE("etc/", 0o755),
		fileE("etc/passwd", 0o644, "root:x:0:0\n"),
		shadow,
		dirE("bin/", 0o755), sh, ping,
		linkE(tar.TypeLink, "bin/sh2", "bin/sh"),
		fileE("usr/lib/libx.so", 0o755, "ELF"), // parents missing from the tar
		dirE("tmp/", 0o1777),
		linkE(tar.TypeSymlink, "lib", "usr/lib"),
		fileE("lib/libvia.so", 0o644, "via"), // through the symlink
		dev(tar.TypeChar, "dev/null", 1, 3),
		dev(tar.TypeBlock, "dev/sda", 8, 0),
		dev(tar.TypeFifo, "dev/fifo", 0, 0),
		dirE("opq/", 0o755), fileE("opq/a", 0o644, "a"), fileE("opq/sub/b", 0o644, "b"), fileE("opq/keep", 0o644, "k"),
		dirE("wh/", 0o755), fileE("wh/x", 0o644, "x"), fileE("wh/dir/y", 0o644, "y"), fileE("wh/stay", 0o644, "s"),
		dirE("d2f/", 0o755), fileE("d2f/child", 0o644, "c"),
		fileE("f2d", 0o644, "file"),
		fileE(longName, 0o644, "long"),
		linkE(tar.TypeSymlink, "longlink", longTarget),
		acl, nano, owned,
		late, fileE("late/x", 0o644, "x"), dirE("late/sub/", 0o755),
		fileE("./dot/slash", 0o644, "d"),
	)
}

func layer2(t testing.TB) []byte {
	etc := dirE("etc/", 0o700)
	etc.hdr.ModTime = tBase.Add(time.Hour)
	return buildTar(t,
		fileE("wh/.wh.x", 0, ""),
		fileE("wh/.wh.dir", 0, ""),
		fileE(".wh.nonexistent", 0, ""),
		fileE("bin/.wh..wh.plnk", 0, ""),
		fileE("opq/new", 0o644, "new"), // before the marker: kept
		dirE("opq/keep", 0o755),        // replaces a lower file and is kept
		fileE("opq/.wh..wh..opq", 0, ""),
		fileE("opq/sub2/c", 0o644, "c"),
		linkE(tar.TypeLink, "bin/sh3", "bin/sh"), // hardlink to a lower-layer file
		fileE("d2f", 0o600, "now a file"),
		dirE("f2d/", 0o750), fileE("f2d/inner", 0o644, "i"),
		fileE("etc/passwd", 0o644, "root:x:0:0:new\n"),
		etc,
		fileE("etc/.wh.shadow", 0, ""),
		fileE("wh/stay/.wh.nothing", 0, ""), // whiteout below a file: nothing to do
	)
}

func TestApplyLayers(t *testing.T) {
	dev, img := newImage(t, 1<<30)
	st, err := applyLayer(t, dev, layer1(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("layer 1: %+v", st)
	if st.Files != 20 || st.Hardlinks != 1 || st.Symlinks != 3 || st.Nodes != 3 {
		t.Errorf("layer 1 stats: %+v", st)
	}
	testenv.Fsck(t, img)
	contains(t, "debugfs stat /bin/sh", testenv.Debugfs(t, img, "stat /bin/sh"), "Links: 2")
	contains(t, "debugfs stat /late", testenv.Debugfs(t, img, "stat /late"), fmt.Sprintf("mtime: 0x%08x", tBase.Add(-time.Hour).Unix()), "Mode:  0711")

	st, err = applyLayer(t, dev, layer2(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("layer 2: %+v", st)
	if st.Whiteouts != 5 || st.OpaqueDirs != 1 {
		t.Errorf("layer 2 stats: %+v", st)
	}
	testenv.Fsck(t, img)

	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := ext4.Open(&fileDev{File: f, size: dev.size}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()

	gone := []string{"/wh/x", "/wh/dir", "/etc/shadow", "/opq/a", "/opq/sub", "/d2f/child", "/bin/.wh..wh.plnk", "/opq/.wh..wh..opq"}
	for _, p := range gone {
		if _, err := r.Lstat(p); !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) {
			t.Errorf("%s should be gone: %v", p, err)
		}
	}
	files := map[string]string{
		"/etc/passwd": "root:x:0:0:new\n", "/bin/sh": "#!shell\n", "/bin/sh3": "#!shell\n",
		"/usr/lib/libx.so": "ELF", "/usr/lib/libvia.so": "via", "/opq/new": "new", "/opq/sub2/c": "c",
		"/d2f": "now a file", "/f2d/inner": "i", "/" + longName: "long", "/wh/stay": "s", "/late/x": "x",
		"/dot/slash": "d", "/gnu/" + strings.Repeat("g", 150): "gnu",
	}
	for p, want := range files {
		fl, err := r.OpenFile(p)
		if err != nil {
			t.Errorf("open %s: %v", p, err)
			continue
		}
		got, _ := io.ReadAll(io.NewSectionReader(fl, 0, fl.Size()))
		fl.Close()
		if string(got) != want {
			t.Errorf("%s = %q, want %q", p, got, want)
		}
	}
	type want struct {
		mode, uid, gid, nlink uint32
		mtime                 time.Time
	}
	for p, w := range map[string]want{
		"/etc":         {ext4.ModeDir | 0o700, 0, 0, 2, tBase.Add(time.Hour)},
		"/bin/sh":      {ext4.ModeRegular | 0o755, 0, 0, 3, tBase},
		"/bin/ping":    {ext4.ModeRegular | 0o4755, 0, 0, 1, tBase},
		"/tmp":         {ext4.ModeDir | 0o1777, 0, 0, 2, tBase},
		"/usr":         {ext4.ModeDir | 0o755, 0, 0, 3, tBase},
		"/lib":         {ext4.ModeSymlink | 0o777, 0, 0, 1, tBase},
		"/opq":         {ext4.ModeDir | 0o755, 0, 0, 4, tBase},
		"/opq/keep":    {ext4.ModeDir | 0o755, 0, 0, 2, tBase},
		"/d2f":         {ext4.ModeRegular | 0o600, 0, 0, 1, tBase},
		"/f2d":         {ext4.ModeDir | 0o750, 0, 0, 2, tBase},
		"/acl":         {ext4.ModeDir | 0o2775, 0, 0, 2, tBase},
		"/nano":        {ext4.ModeRegular | 0o600, 0, 0, 1, tNano},
		"/owned":       {ext4.ModeRegular | 0o644, 1 << 20, 65534, 1, tBase},
		"/late":        {ext4.ModeDir | 0o711, 0, 0, 3, tBase.Add(-time.Hour)},
		"/dev/null":    {ext4.ModeChar | 0o660, 0, 0, 1, tBase},
		"/dev/sda":     {ext4.ModeBlock | 0o660, 0, 0, 1, tBase},
		"/dev/fifo":    {ext4.ModeFIFO | 0o660, 0, 0, 1, tBase},
		"/wh":          {ext4.ModeDir | 0o755, 0, 0, 2, tBase},
		"/longlink":    {ext4.ModeSymlink | 0o777, 0, 0, 1, tBase},
		"/" + longName: {ext4.ModeRegular | 0o644, 0, 0, 1, tBase},
	} {
		st, err := r.Lstat(p)
		if err != nil {
			t.Errorf("lstat %s: %v", p, err)
			continue
		}
		if st.Mode != w.mode || st.UID != w.uid || st.GID != w.gid || st.Nlink != w.nlink || !st.Mtime.Equal(w.mtime) {
			t.Errorf("%s: mode %o uid %d gid %d nlink %d mtime %v; want %o %d %d %d %v",
				p, st.Mode, st.UID, st.GID, st.Nlink, st.Mtime, w.mode, w.uid, w.gid, w.nlink, w.mtime)
		}
	}
	if st, _ := r.Lstat("/nano"); !st.Atime.Equal(tNano.Add(time.Second)) || !st.Ctime.Equal(tNano.Add(2*time.Second)) {
		t.Errorf("nano times %v %v", st.Atime, st.Ctime)
	}
	if st, _ := r.Lstat("/dev/null"); st.Major != 1 || st.Minor != 3 {
		t.Errorf("/dev/null %d:%d", st.Major, st.Minor)
	}
	if s, _ := r.Lstat("/bin/sh"); s != nil {
		if s3, _ := r.Lstat("/bin/sh3"); s3 == nil || s3.Ino != s.Ino {
			t.Error("/bin/sh3 is not a hardlink of /bin/sh")
		}
	}
	for p, w := range map[string]string{"/lib": "usr/lib", "/longlink": longTarget, "/gnu/link": longTarget} {
		if got, err := r.Readlink(p); got != w || err != nil {
			t.Errorf("readlink %s = %q %v", p, got, err)
		}
	}
	if v, err := r.GetXattr("/bin/sh", "security.capability"); string(v) != capability || err != nil {
		t.Errorf("capability %x %v", v, err)
	}
	if v, err := r.GetXattr("/acl", "system.posix_acl_default"); string(v) != aclDefault || err != nil {
		t.Errorf("acl %x %v", v, err)
	}
	ents, err := r.ReadDir("/opq")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name)
	}
	if s := strings.Join(names, " "); s != "keep new sub2" {
		t.Errorf("opaque dir holds %q", s)
	}

	// The same, seen by debugfs.
	contains(t, "stat /bin/sh", testenv.Debugfs(t, img, "stat /bin/sh"), "Links: 3", "Mode:  0755", fmt.Sprintf("mtime: 0x%08x:00000000", tBase.Unix()))
	contains(t, "ea_list /bin/sh", testenv.Debugfs(t, img, "ea_list /bin/sh"),
		"security.capability (20) = 01 00 00 02 00 20 00 00", `user.note (1) = "x"`)
	contains(t, "ea_list /acl", testenv.Debugfs(t, img, "ea_list /acl"), "system.posix_acl_default (28) = 01 00 00 00 01 00 07 00 02 00 07 00 e8 03 00 00")
	contains(t, "stat /bin/ping", testenv.Debugfs(t, img, "stat /bin/ping"), "Mode:  04755")
	contains(t, "stat /tmp", testenv.Debugfs(t, img, "stat /tmp"), "Mode:  01777")
	contains(t, "stat /dev/sda", testenv.Debugfs(t, img, "stat /dev/sda"), "Type: block special", "Device major/minor number: 08:00")
	contains(t, "stat /dev/null", testenv.Debugfs(t, img, "stat /dev/null"), "Type: character special", "Device major/minor number: 01:03")
	contains(t, "stat /dev/fifo", testenv.Debugfs(t, img, "stat /dev/fifo"), "Type: FIFO")
	contains(t, "stat /lib", testenv.Debugfs(t, img, "stat /lib"), `Fast link dest: "usr/lib"`)
	contains(t, "stat /owned", testenv.Debugfs(t, img, "stat /owned"), "User: 1048576   Group: 65534")
	contains(t, "stat /nano", testenv.Debugfs(t, img, "stat /nano"), fmt.Sprintf("mtime: 0x%08x:%08x", tNano.Unix(), tNano.Nanosecond()<<2))
	contains(t, "stat /etc", testenv.Debugfs(t, img, "stat /etc"), "Mode:  0700", fmt.Sprintf("mtime: 0x%08x", tBase.Add(time.Hour).Unix()))
	out := filepath.Join(t.TempDir(), "passwd")
	testenv.Debugfs(t, img, "dump /etc/passwd "+out)
	if b, err := os.ReadFile(out); string(b) != "root:x:0:0:new\n" || err != nil {
		t.Errorf("debugfs dump /etc/passwd = %q %v", b, err)
	}
}

func TestApplyBigSparseFile(t *testing.T) {
	dev, img := newImage(t, 1<<30)
	const size = 5<<30 + 12345 // > 4 GiB, odd tail
	chunks := []sparseChunk{
		{0, bytes.Repeat([]byte("head"), 1024)},
		{4<<30 + 8192, bytes.Repeat([]byte{0xab}, 10000)},
		{size - 100, bytes.Repeat([]byte{'z'}, 100)},
	}
	layer := append(sparseEntry("big.img", size, chunks), endTar...)
	start := time.Now()
	st, err := applyLayer(t, dev, layer)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("5 GiB sparse entry applied in %v: %+v", time.Since(start), st)
	testenv.Fsck(t, img)
	f, _ := os.Open(img)
	defer f.Close()
	r, err := ext4.Open(&fileDev{File: f, size: dev.size}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	s, err := r.Lstat("/big.img")
	if err != nil {
		t.Fatal(err)
	}
	// 1 block + 3 blocks (10000 bytes at an aligned offset) + 2 at the end.
	if s.Size != size || s.Blocks != (1+3+2)*8 {
		t.Errorf("size %d, %d sectors allocated", s.Size, s.Blocks)
	}
	fl, err := r.OpenFile("/big.img")
	if err != nil {
		t.Fatal(err)
	}
	defer fl.Close()
	for _, c := range chunks {
		got := make([]byte, len(c.data)+2)
		off := c.off - 1
		n, err := fl.ReadAt(got, off)
		if c.off+int64(len(c.data)) == size {
			got = got[:len(got)-1]
			if err != io.EOF || n != len(got) {
				t.Errorf("read at end: %d %v", n, err)
			}
		}
		want := append(append([]byte{0}, c.data...), 0)[:len(got)]
		if off < 0 {
			off, got, want = 0, got[1:], want[1:]
			fl.ReadAt(got, 0)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("data at %d differs", c.off)
		}
	}
	contains(t, "stat /big.img", testenv.Debugfs(t, img, "stat /big.img"), fmt.Sprintf("Size: %d", int64(size)), "Blockcount: 48")
}

func TestApplyRejectsEscapes(t *testing.T) {
	dev, img := newImage(t, 256<<20)
	for _, c := range []struct {
		layer []byte
		want  string
	}{
		{buildTar(t, fileE("../etc/passwd", 0o644, "x")), `layer entry "../etc/passwd": path escapes the root`},
		{buildTar(t, fileE("a/../../b", 0o644, "x")), `layer entry "a/../../b": path escapes the root`},
		{buildTar(t, fileE("ok", 0o644, "x"), linkE(tar.TypeLink, "bad", "../../etc/shadow")),
			`layer entry "bad": hardlink target "../../etc/shadow": path escapes the root`},
		{buildTar(t, fileE("x/.wh...", 0, "")), `layer entry "x/.wh..."`},
		{buildTar(t, fileE("f", 0o644, "x"), fileE("f/g", 0o644, "y")), `layer entry "f/g": parent /f: not a directory`},
		{buildTar(t, linkE(tar.TypeLink, "l", "missing")), `layer entry "l": link /l: link target /missing: no such file or directory`},
	} {
		_, err := applyLayer(t, dev, c.layer)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("got %v, want %q", err, c.want)
		}
	}
	testenv.Fsck(t, img)
	if out := testenv.Debugfs(t, img, "ls -l /"); strings.Contains(out, "passwd") {
		t.Errorf("escaped entry written:\n%s", out)
	}
}

func TestApplyDeterministic(t *testing.T) {
	var images [2][]byte
	for i := range images {
		dev, img := newImage(t, 128<<20)
		for _, l := range [][]byte{layer1(t), layer2(t)} {
			if _, err := applyLayer(t, dev, l); err != nil {
				t.Fatal(err)
			}
		}
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		images[i] = b
	}
	if !bytes.Equal(images[0], images[1]) {
		for off := 0; off < len(images[0]); off += 4096 {
			if !bytes.Equal(images[0][off:off+4096], images[1][off:off+4096]) {
				t.Errorf("same layers gave different images, first at block %d", off/4096)
				break
			}
		}
	}
}

func TestApplyLargeDirectory(t *testing.T) {
	const n = 100000
	ents := []ent{dirE("big/", 0o755)}
	for i := range n {
		ents = append(ents, fileE(fmt.Sprintf("big/file-%06d", i), 0o644, ""))
	}
	layer := buildTar(t, ents...)
	dev, img := newImage(t, 4<<30)
	start := time.Now()
	if _, err := applyLayer(t, dev, layer); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d entries in one directory: %v", n, time.Since(start))
	// Whiteouts of every other entry, then a new file, in a second layer.
	var wh []ent
	for i := 0; i < n; i += 2 {
		wh = append(wh, fileE(fmt.Sprintf("big/.wh.file-%06d", i), 0, ""))
	}
	wh = append(wh, fileE("big/added", 0o644, "a"))
	start = time.Now()
	if _, err := applyLayer(t, dev, buildTar(t, wh...)); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d whiteouts: %v", n/2, time.Since(start))
	testenv.Fsck(t, img)
	f, _ := os.Open(img)
	defer f.Close()
	r, err := ext4.Open(&fileDev{File: f, size: dev.size}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	list, err := r.ReadDir("/big")
	if err != nil || len(list) != n/2+1 {
		t.Fatalf("%d entries, %v", len(list), err)
	}
}

func TestApplyNoSpace(t *testing.T) {
	dev, img := newImage(t, 32<<20)
	big := bytes.Repeat([]byte("full"), 10<<20) // 40 MiB of non-zero data
	_, err := applyLayer(t, dev, buildTar(t, fileE("small", 0o644, "s"), fileE("big", 0o644, string(big))))
	if !errors.Is(err, ErrDiskFull) || !errors.Is(err, ext4.ErrNoFreeBlocks) || !strings.Contains(err.Error(), `layer entry "big"`) ||
		!strings.Contains(err.Error(), "its ext4 filesystem of 32.0 MiB has no free block left") || !strings.Contains(err.Error(), "--vsize") {
		t.Fatalf("got %v, want ErrDiskFull naming the entry and --vsize", err)
	}
	t.Log(err)
	testenv.Fsck(t, img) // the half-written file was released
	out := testenv.Debugfs(t, img, "ls /")
	if !strings.Contains(out, "small") || strings.Contains(out, "big") {
		t.Errorf("root after failed apply:\n%s", out)
	}
}
