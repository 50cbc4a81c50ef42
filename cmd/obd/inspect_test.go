package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/tarwrap"
	"github.com/obdproject/obd/zfile"
)

// upstreamBlobInfo is what inspect must find in upstreamBlob (checked independently with upstream's tools).
var upstreamBlobInfo = image.BlobInfo{
	Size: 642560,
	Tar:  &image.TarInfo{Member: "overlaybd.commit", Offset: 1536, Size: 639491, PAX: true},
	ZFile: &image.ZFileInfo{
		Algorithm: "lz4", BlockSize: 4096, Blocks: 17463, OriginalSize: 71528448,
		Verify: true, HeaderOverwrite: true, CRCOK: true,
	},
	LSMT: &image.LSMTInfo{
		Kind: "committed", UUID: "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31", ParentUUID: "00000000-0000-0000-0000-000000000000",
		VirtualSize: 64 << 30, IndexEntries: 768, ValidEntries: 515, DataBytes: 71507968,
	},
}

func TestInspectUpstreamBlobText(t *testing.T) {
	out := mustObd(t, "inspect", upstreamBlob)
	for _, want := range []string{
		"(642560 bytes)",
		`tar wrapper: member "overlaybd.commit" at offset 1536, 639491 bytes, pax header`,
		"zfile:       lz4, 4096-byte blocks, 17463 blocks, original size 71528448 bytes (header overwrite), all block CRCs ok",
		"lsmt:        committed layer, virtual size 64.0 GiB",
		"uuid:      01BB4FCE-3EB1-B56B-05AD-F99504DAFD31",
		"parent:    00000000-0000-0000-0000-000000000000",
		"index:     515 valid of 768 entries",
		"data:      71507968 bytes",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("inspect output lacks %q:\n%s", want, out)
		}
	}
}

func TestInspectUpstreamBlobJSON(t *testing.T) {
	out := mustObd(t, "inspect", "--json", upstreamBlob)
	var got image.BlobInfo
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("inspect --json printed no JSON object: %v\n%s", err, out)
	}
	if got.Path != upstreamBlob {
		t.Errorf("path = %q, want %q", got.Path, upstreamBlob)
	}
	got.Path = ""
	want := upstreamBlobInfo
	gotJSON, _ := json.MarshalIndent(got, "", "  ")
	wantJSON, _ := json.MarshalIndent(want, "", "  ")
	if string(gotJSON) != string(wantJSON) {
		t.Errorf("inspect --json:\n%s\nwant:\n%s", gotJSON, wantJSON)
	}
	// The keys are part of the CLI's interface: scripts read them.
	for _, key := range []string{`"member"`, `"blockSize"`, `"blocks"`, `"originalSize"`, `"crcOK"`, `"uuid"`, `"validEntries"`, `"indexEntries"`, `"virtualSize"`} {
		if !strings.Contains(out, key) {
			t.Errorf("inspect --json lacks key %s", key)
		}
	}
}

// upstreamZFileLayout returns the offset of the ZFile inside upstreamBlob and the ZFile's parameters.
func upstreamZFileLayout(t *testing.T) (member tarwrap.Member, info zfile.Info) {
	t.Helper()
	f, err := os.Open(upstreamBlob)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if member, err = tarwrap.Detect(f, st.Size()); err != nil {
		t.Fatal(err)
	}
	z, err := zfile.Open(io.NewSectionReader(f, member.Offset, member.Size), member.Size, true)
	if err != nil {
		t.Fatal(err)
	}
	return member, z.Info()
}

func TestInspectCorruptBlock(t *testing.T) {
	member, zi := upstreamZFileLayout(t)
	// The block records lie between the ZFile header and its index; the first one starts right after the header.
	first := member.Offset + zfile.SlotSize
	tests := []struct {
		name    string
		off     int64  // byte of the blob to flip
		wantErr string // regexp the error must match
	}{
		{"first block", first, `zfile: block 0: .*(CRC|checksum|corrupt)`},
		{"a middle block", member.Offset + zi.IndexOffset/2, `zfile: block [1-9][0-9]*: .*(CRC|checksum|corrupt)`},
		{"last block", member.Offset + zi.IndexOffset - 1, `zfile: block 17462: .*(CRC|checksum|corrupt)`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := readFile(t, upstreamBlob)
			b[tc.off] ^= 0x5a
			path := filepath.Join(t.TempDir(), "blob")
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
			re := regexp.MustCompile(`(?i)` + tc.wantErr)

			out, _, err := obd(t, "inspect", path)
			if err == nil {
				t.Fatalf("inspect of a blob with a flipped byte at %d succeeded:\n%s", tc.off, out)
			}
			if !re.MatchString(err.Error()) || !strings.Contains(err.Error(), path) {
				t.Errorf("inspect error = %q, want it to name %s and match %q", err, path, tc.wantErr)
			}
			if !strings.Contains(out, "CRC ERROR") {
				t.Errorf("inspect output does not flag the CRC error:\n%s", out)
			}

			out, _, err = obd(t, "inspect", "--json", path)
			if err == nil {
				t.Fatal("inspect --json of a corrupt blob succeeded")
			}
			var got image.BlobInfo
			if jerr := json.Unmarshal([]byte(out), &got); jerr != nil {
				t.Fatalf("inspect --json printed no JSON object on error: %v\n%s", jerr, out)
			}
			if got.ZFile == nil || got.ZFile.CRCOK || !re.MatchString(got.ZFile.CRCError) {
				t.Errorf("zfile = %+v, want crcOK false and a crcError matching %q", got.ZFile, tc.wantErr)
			}
			if got.Error == "" || got.LSMT != nil {
				t.Errorf("error = %q, lsmt = %+v: want the error and no LSMT facts", got.Error, got.LSMT)
			}
		})
	}
}

func TestInspectNotABlob(t *testing.T) {
	dir := t.TempDir()
	random := make([]byte, 1<<20)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range random {
		random[i] = byte(r.Uint32())
	}
	tests := []struct {
		name    string
		data    []byte // nil: the file does not exist
		wantErr string
	}{
		{"random bytes", random, "not an overlaybd blob or layer file"},
		{"empty file", []byte{}, "not an overlaybd blob or layer file"},
		{"text", []byte(strings.Repeat("hello world\n", 1000)), "not an overlaybd blob or layer file"},
		{"missing file", nil, "no such file or directory"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))
			if tc.data != nil {
				if err := os.WriteFile(path, tc.data, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			for _, args := range [][]string{{"inspect", path}, {"inspect", "--json", path}} {
				out, _, err := obd(t, args...)
				if err == nil {
					t.Fatalf("obd %s succeeded:\n%s", strings.Join(args, " "), out)
				}
				if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Errorf("obd %s: error %q, want it to name the file and say %q", strings.Join(args, " "), err, tc.wantErr)
				}
				if regexp.MustCompile(`(?m)^lsmt:|"lsmt":`).MatchString(out) {
					t.Errorf("obd %s printed LSMT facts for a file that has none:\n%s", strings.Join(args, " "), out)
				}
			}
		})
	}
}

func TestInspectArgs(t *testing.T) {
	for _, args := range [][]string{{"inspect"}, {"inspect", "a", "b"}} {
		if _, _, err := obd(t, args...); err == nil || !strings.Contains(err.Error(), "arg") {
			t.Errorf("obd %v: error %v, want one about the arguments", args, err)
		}
	}
}

// The files of a writable layer are described, not refused with an API hint.
func TestInspectWritableLayerFiles(t *testing.T) {
	dir := t.TempDir()
	data, index := filepath.Join(dir, "data"), filepath.Join(dir, "index")
	mustObd(t, "layer", "create", data, index, "1")
	for path, kind := range map[string]string{data: "rw-data", index: "rw-index"} {
		out := mustObd(t, "inspect", path)
		if !strings.Contains(out, "lsmt:        "+kind+" layer, virtual size 1.0 GiB") || !strings.Contains(out, "writable layer") {
			t.Errorf("inspect %s:\n%s", kind, out)
		}
		if strings.Contains(out, "OpenRW") {
			t.Errorf("inspect %s names a Go function:\n%s", kind, out)
		}
	}
}

// A committed layer whose index is corrupt (an entry pointing past its data) is reported as a corrupt layer, not
// as a TurboOCI "warp" layer.
func TestInspectCorruptIndexIsNotWarp(t *testing.T) {
	dir := t.TempDir()
	commit := filepath.Join(dir, "commit")
	// The upstream blob's tar member is a ZFile: decompressed, it is a plain committed LSMT file.
	member, _ := upstreamZFileLayout(t)
	blob, err := os.ReadFile(upstreamBlob)
	if err != nil {
		t.Fatal(err)
	}
	z, err := zfile.Open(bytes.NewReader(blob[member.Offset:member.Offset+member.Size]), member.Size, true)
	if err != nil {
		t.Fatal(err)
	}
	var plain bytes.Buffer
	if _, err := zfile.Decompress(&plain, z); err != nil {
		t.Fatal(err)
	}
	b := plain.Bytes()
	trailer, err := lsmt.ParseHeader(b[len(b)-lsmt.HeaderSize:])
	if err != nil {
		t.Fatal(err)
	}
	// The second word of an index entry holds its data offset in sectors (low 55 bits): point it far away.
	e := b[trailer.IndexOffset:]
	binary.LittleEndian.PutUint64(e[8:], binary.LittleEndian.Uint64(e[8:])|1<<50)
	if err := os.WriteFile(commit, b, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err = obd(t, "inspect", commit)
	if err == nil || strings.Contains(err.Error(), "warp") || !strings.Contains(err.Error(), "LSMT layer") {
		t.Fatalf("inspect of a corrupt committed layer: %v", err)
	}
}
