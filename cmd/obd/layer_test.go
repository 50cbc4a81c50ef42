package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/lsmt"
)

const testVSize = 1 << 30 // `layer create … 1`

// layerWrite is one write into the writable layer.
type layerWrite struct {
	off  int64
	n    int
	seed uint64
}

// layerWrites overlap, cross the 4 MiB piece size of the append layer and touch the last sector.
var layerWrites = []layerWrite{
	{0, 64 << 10, 1},
	{1 << 20, 8 << 10, 2},
	{4096, 4096, 3}, // overwrites part of the first write
	{100 << 20, 5<<20 + 512, 4},
	{testVSize - 512, 512, 5},
	{30<<10 + 512, 1024, 6},
}

// payload returns the bytes of w: half random, half a compressible pattern.
func (w layerWrite) payload() []byte {
	b := make([]byte, w.n)
	r := rand.New(rand.NewPCG(w.seed, 42))
	for i := range b {
		if (i/4096)%2 == 0 {
			b[i] = byte(r.Uint32())
		} else {
			b[i] = byte(i / 512)
		}
	}
	return b
}

// expected returns the content of the layer at [off, off+n) after all layerWrites.
func expected(off int64, n int) []byte {
	buf := make([]byte, n)
	for _, w := range layerWrites {
		lo, hi := max(off, w.off), min(off+int64(n), w.off+int64(w.n))
		if lo < hi {
			copy(buf[lo-off:hi-off], w.payload()[lo-w.off:hi-w.off])
		}
	}
	return buf
}

// checkLayerContent reads every written range (and 8 KiB of its surroundings) through r and compares.
func checkLayerContent(t *testing.T, what string, r io.ReaderAt, vsize int64) {
	t.Helper()
	if vsize != testVSize {
		t.Errorf("%s: virtual size %d, want %d", what, vsize, int64(testVSize))
	}
	for _, w := range layerWrites {
		lo, hi := max(0, w.off-8192), min(testVSize, w.off+int64(w.n)+8192)
		got := make([]byte, hi-lo)
		if _, err := r.ReadAt(got, lo); err != nil && err != io.EOF {
			t.Fatalf("%s: read %d+%d: %v", what, lo, len(got), err)
		}
		if want := expected(lo, len(got)); !bytes.Equal(got, want) {
			i := 0
			for i < len(got) && got[i] == want[i] {
				i++
			}
			t.Errorf("%s: content at %d+%d differs from what was written, first at byte %d", what, lo, len(got), lo+int64(i))
		}
	}
}

// openLayerFile opens a layer file or blob (plain, ZFile, tar-wrapped) as the LSMT layer in it.
func openLayerFile(t *testing.T, path string) *lsmt.File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	l, err := image.OpenLayerBlob(f, st.Size(), true)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return l
}

// inspectJSON runs `obd inspect --json path`.
func inspectJSON(t *testing.T, path string) image.BlobInfo {
	t.Helper()
	out := mustObd(t, "inspect", "--json", path)
	var info image.BlobInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("inspect --json %s: %v\n%s", path, err, out)
	}
	return info
}

// writableLayer makes a writable layer with `obd layer create` and fills it with layerWrites through lsmt.
func writableLayer(t *testing.T, dir string) (data, index string) {
	t.Helper()
	data, index = filepath.Join(dir, "data"), filepath.Join(dir, "index")
	mustObd(t, "layer", "create", data, index, "1")
	df, err := os.OpenFile(data, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer df.Close()
	xf, err := os.OpenFile(index, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer xf.Close()
	rw, err := lsmt.OpenRW(df, xf)
	if err != nil {
		t.Fatalf("lsmt.OpenRW of a layer made by 'obd layer create': %v", err)
	}
	if rw.VirtualSize() != testVSize {
		t.Errorf("created layer has virtual size %d, want %d", rw.VirtualSize(), int64(testVSize))
	}
	for _, w := range layerWrites {
		if _, err := rw.WriteAt(w.payload(), w.off); err != nil {
			t.Fatalf("write %d+%d: %v", w.off, w.n, err)
		}
	}
	if err := rw.Close(); err != nil {
		t.Fatal(err)
	}
	return data, index
}

// leftovers returns the names in dir that are temporary files of out.
func leftovers(t *testing.T, dir, out string) []string {
	t.Helper()
	var tmp []string
	for _, n := range dirNames(t, dir) {
		if strings.HasPrefix(n, "."+filepath.Base(out)+".") {
			tmp = append(tmp, n)
		}
	}
	return tmp
}

func TestLayerCommit(t *testing.T) {
	dir := t.TempDir()
	data, index := writableLayer(t, dir)

	plain := filepath.Join(dir, "plain.commit")
	mustObd(t, "layer", "commit", data, index, plain)
	plainBytes := readFile(t, plain)

	tests := []struct {
		name      string
		flags     []string
		tar       bool
		algorithm string // "" for no ZFile
		blockSize int
		uuid, tag string
	}{
		{name: "plain"},
		{name: "zfile", flags: []string{"-z"}, algorithm: "lz4", blockSize: 4096},
		{name: "zfile tar", flags: []string{"-z", "-t"}, tar: true, algorithm: "lz4", blockSize: 4096},
		{name: "tar only", flags: []string{"-t"}, tar: true},
		{name: "zstd 64k", flags: []string{"-z", "-t", "--algorithm", "zstd", "--block-size", "65536"}, tar: true, algorithm: "zstd", blockSize: 65536},
		{name: "lz4 16k one thread", flags: []string{"-z", "--block-size", "16384", "--threads", "1"}, algorithm: "lz4", blockSize: 16384},
		{name: "uuid and message", flags: []string{"--uuid", "01bb4fce-3eb1-b56b-05ad-f99504dafd31", "-m", "made by a test"},
			uuid: "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31", tag: "made by a test"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "layer")
			args := append([]string{"layer", "commit"}, tc.flags...)
			mustObd(t, append(args, data, index, out)...)

			// Deterministic: the same input gives the same bytes, whatever the number of compression workers.
			again := filepath.Join(t.TempDir(), "again")
			mustObd(t, append(append(args, "--threads", "7"), data, index, again)...)
			got := readFile(t, out)
			if !bytes.Equal(got, readFile(t, again)) {
				t.Errorf("two commits of the same layer differ")
			}

			info := inspectJSON(t, out)
			if (info.Tar != nil) != tc.tar {
				t.Errorf("tar wrapper %+v, want one: %v", info.Tar, tc.tar)
			}
			if tc.algorithm == "" {
				if info.ZFile != nil {
					t.Errorf("zfile %+v, want none", info.ZFile)
				}
			} else if z := info.ZFile; z == nil || z.Algorithm != tc.algorithm || z.BlockSize != tc.blockSize || !z.Verify || !z.CRCOK {
				t.Errorf("zfile %+v, want %s with %d-byte blocks and good CRCs", z, tc.algorithm, tc.blockSize)
			}
			l := info.LSMT
			if l == nil {
				t.Fatalf("inspect finds no LSMT layer: %+v", info)
			}
			wantUUID := tc.uuid
			if wantUUID == "" {
				wantUUID = "00000000-0000-0000-0000-000000000000" // upstream's default for a commit
			}
			if l.Kind != lsmt.KindCommitted || l.VirtualSize != testVSize || l.UUID != wantUUID || l.UserTag != tc.tag {
				t.Errorf("lsmt %+v, want a committed layer of %d bytes, uuid %s, tag %q", l, int64(testVSize), wantUUID, tc.tag)
			}
			layer := openLayerFile(t, out)
			checkLayerContent(t, tc.name, layer, layer.VirtualSize())

			if tc.algorithm != "" {
				// unzfile gives back the plain commit.
				back := filepath.Join(t.TempDir(), "back")
				mustObd(t, "layer", "unzfile", out, back)
				if !bytes.Equal(readFile(t, back), plainBytes) {
					t.Errorf("layer unzfile of the commit differs from the plain commit")
				}
			}
			if tc.algorithm != "" && !tc.tar {
				// commit -z is the plain commit compressed.
				z := filepath.Join(t.TempDir(), "z")
				zargs := []string{"layer", "zfile", "--algorithm", tc.algorithm, "--block-size", fmt.Sprint(tc.blockSize), plain, z}
				mustObd(t, zargs...)
				if !bytes.Equal(readFile(t, z), got) {
					t.Errorf("commit %v differs from the plain commit compressed by 'layer zfile'", tc.flags)
				}
			}
		})
	}
}

func TestLayerZfileRoundTrip(t *testing.T) {
	dir := t.TempDir()
	data, index := writableLayer(t, dir)
	plain := filepath.Join(dir, "plain.commit")
	mustObd(t, "layer", "commit", data, index, plain)
	// A layer file that is not an LSMT layer compresses just as well: zfile is about bytes.
	odd := filepath.Join(dir, "odd")
	if err := os.WriteFile(odd, append(bytes.Repeat([]byte("obd"), 5000), 1, 2, 3), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		in    string
		flags []string
	}{
		{"lz4", plain, nil},
		{"lz4 tar", plain, []string{"-t"}},
		{"zstd 8k", plain, []string{"--algorithm", "zstd", "--block-size", "8192"}},
		{"odd size", odd, []string{"--block-size", "32768"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tmp := t.TempDir()
			z, back := filepath.Join(tmp, "z"), filepath.Join(tmp, "back")
			mustObd(t, append(append([]string{"layer", "zfile"}, tc.flags...), tc.in, z)...)
			in := readFile(t, tc.in)
			if zb := readFile(t, z); len(zb) >= len(in) {
				t.Errorf("zfile of %d bytes is %d bytes: not compressed", len(in), len(zb))
			}
			mustObd(t, "layer", "unzfile", z, back)
			if !bytes.Equal(readFile(t, back), in) {
				t.Errorf("unzfile(zfile(x)) != x")
			}
			if names := dirNames(t, tmp); len(names) != 2 {
				t.Errorf("files left in the output directory: %v, want only z and back", names)
			}
		})
	}
}

func TestLayerSeal(t *testing.T) {
	dir := t.TempDir()
	data, index := writableLayer(t, dir)
	out := filepath.Join(dir, "unused")
	mustObd(t, "layer", "commit", "--seal", data, index, out)
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("commit --seal wrote %s (stat: %v); it must only seal DATA in place", out, err)
	}
	info := inspectJSON(t, data)
	if info.LSMT == nil || info.LSMT.Kind != lsmt.KindSealed || info.LSMT.VirtualSize != testVSize {
		t.Fatalf("inspect of the sealed data file: %+v (lsmt %+v), want a sealed layer", info, info.LSMT)
	}
	layer := openLayerFile(t, data)
	checkLayerContent(t, "sealed", layer, layer.VirtualSize())
}

func TestLayerErrors(t *testing.T) {
	dir := t.TempDir()
	data, index := writableLayer(t, dir)
	plain := filepath.Join(dir, "plain.commit")
	mustObd(t, "layer", "commit", data, index, plain)
	zf := filepath.Join(dir, "layer.zfile")
	mustObd(t, "layer", "zfile", plain, zf)
	// A ZFile with a flipped byte in a block record: unzfile fails midway, after it began writing.
	bad := readFile(t, zf)
	bad[len(bad)/2] ^= 0xff
	corrupt := filepath.Join(dir, "corrupt.zfile")
	if err := os.WriteFile(corrupt, bad, 0o644); err != nil {
		t.Fatal(err)
	}
	existingDir := filepath.Join(t.TempDir(), "isdir")
	if err := os.Mkdir(existingDir, 0o755); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		args    []string // OUT is appended unless out is set
		out     string   // output path given explicitly in args; "" = a fresh path appended to args
		wantErr string
	}{
		{"commit bad algorithm", []string{"layer", "commit", "-z", "--algorithm", "foo", data, index}, "", `--algorithm: zfile: compression "foo": want lz4 or zstd`},
		{"commit bad block size", []string{"layer", "commit", "-z", "--block-size", "1000", data, index}, "", "--block-size: zfile: block size 1000 not supported"},
		{"zfile bad algorithm", []string{"layer", "zfile", "--algorithm", "gzip", plain}, "", `compression "gzip"`},
		{"zfile bad block size", []string{"layer", "zfile", "--block-size", "1000", plain}, "", "block size 1000 not supported"},
		{"commit missing data", []string{"layer", "commit", filepath.Join(dir, "nope"), index}, "", "nope"},
		{"commit index as data", []string{"layer", "commit", index, index}, "", index},
		{"unzfile not a zfile", []string{"layer", "unzfile", plain}, "", "zfile"},
		{"unzfile corrupt block", []string{"layer", "unzfile", corrupt}, "", "corrupt.zfile: zfile: block"},
		{"zfile of a directory", []string{"layer", "zfile", dir}, "", dir + " is a directory"},
		{"commit onto a directory", []string{"layer", "commit", "-z", "-t", data, index, existingDir}, existingDir, existingDir + " is a directory"},
		{"wrong argument count", []string{"layer", "commit", data}, "", "arg"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			outDir := t.TempDir()
			out, args := tc.out, tc.args
			if out == "" {
				out = filepath.Join(outDir, "out")
				args = append(append([]string(nil), args...), out)
			} else {
				outDir = filepath.Dir(out)
			}
			stdout, _, err := obd(t, args...)
			if err == nil {
				t.Fatalf("obd %s succeeded:\n%s", strings.Join(args, " "), stdout)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("obd %s: error %q, want it to say %q", strings.Join(args, " "), err, tc.wantErr)
			}
			if tmp := leftovers(t, outDir, out); len(tmp) > 0 {
				t.Errorf("temporary files left beside OUT: %v", tmp)
			}
			if tc.out == "" {
				if _, err := os.Stat(out); !os.IsNotExist(err) {
					t.Errorf("a failed command left OUT %s (stat: %v)", out, err)
				}
			}
		})
	}
	// The inputs are untouched by the failures.
	layer := openLayerFile(t, plain)
	checkLayerContent(t, "plain commit after failures", layer, layer.VirtualSize())
}

func TestLayerCreateErrors(t *testing.T) {
	tests := []struct {
		name    string
		vsize   string
		wantErr string
	}{
		{"zero", "0", "virtual size"},
		{"fraction", "1.5", "virtual size"},
		{"unit", "2GB", "virtual size"},
		{"too large", "16385", "virtual size"},
		{"not a number", "big", "virtual size"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			_, _, err := obd(t, "layer", "create", filepath.Join(dir, "data"), filepath.Join(dir, "index"), tc.vsize)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), tc.vsize) {
				t.Errorf("layer create with vsize %q: error %v, want one about the %s", tc.vsize, err, tc.wantErr)
			}
			if names := dirNames(t, dir); len(names) != 0 {
				t.Errorf("a failed layer create left %v", names)
			}
		})
	}

	t.Run("existing files", func(t *testing.T) {
		dir := t.TempDir()
		data, index := filepath.Join(dir, "data"), filepath.Join(dir, "index")
		mustObd(t, "layer", "create", data, index, "2")
		before := readFile(t, data)
		if _, _, err := obd(t, "layer", "create", data, index, "1"); err == nil || !strings.Contains(err.Error(), "exists") {
			t.Errorf("layer create over existing files: error %v, want one saying they exist", err)
		}
		if !bytes.Equal(readFile(t, data), before) {
			t.Errorf("a failed layer create changed the existing data file")
		}
		// Only the index exists: create must not leave the data file it made.
		data2 := filepath.Join(dir, "data2")
		if _, _, err := obd(t, "layer", "create", data2, index, "1"); err == nil {
			t.Errorf("layer create over an existing index succeeded")
		}
		if _, err := os.Stat(data2); !os.IsNotExist(err) {
			t.Errorf("a failed layer create left %s (stat: %v)", data2, err)
		}
	})
}
