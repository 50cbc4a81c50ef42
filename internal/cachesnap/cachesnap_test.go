package cachesnap

import (
	"bytes"
	"encoding/json"
	"errors"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/trace"
)

// testEntry returns an entry of a blob of 3 blocks of 8 bytes (the last one 5) with blocks 0 and 2 and their data.
func testEntry(name string) (Entry, []byte) {
	b0, b2 := bytes.Repeat([]byte(name[:1]), 8), bytes.Repeat([]byte(name[1:2]), 5)
	data := append(append([]byte(nil), b0...), b2...)
	e := cache.ExportedBlob{Digest: digest.FromString(name), Size: 21, BlockSize: 8, Blocks: []int64{0, 2},
		CRCs: []uint32{crc32.Checksum(b0, crc32.MakeTable(crc32.Castagnoli)), crc32.Checksum(b2, crc32.MakeTable(crc32.Castagnoli))}}
	return Entry{ExportedBlob: e, Data: ocispec.Descriptor{MediaType: MediaTypeBlocks, Digest: digest.FromBytes(data), Size: int64(len(data))}}, data
}

func TestTarRoundTrip(t *testing.T) {
	e1, d1 := testEntry("ab")
	e2, d2 := testEntry("cd")
	data := map[digest.Digest][]byte{e1.Digest: d1, e2.Digest: d2}
	idx := Index{Blobs: []Entry{e1, e2}}
	var buf bytes.Buffer
	if err := WriteTar(&buf, idx, func(e Entry) (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data[e.Digest])), nil }); err != nil {
		t.Fatal(err)
	}
	snap := buf.Bytes()
	var got []digest.Digest
	load := func(e Entry, r io.Reader) error {
		vr, check := Verified(e, r)
		if b, err := io.ReadAll(vr); err != nil || !bytes.Equal(b, data[e.Digest]) {
			t.Errorf("data of %s: %q, %v", e.Digest, b, err)
		}
		got = append(got, e.Digest)
		return check()
	}
	back, err := ReadTar(bytes.NewReader(snap), load)
	if err != nil || len(back.Blobs) != 2 || len(got) != 2 || got[1] != e2.Digest {
		t.Fatalf("read back: %+v, %v, loaded %v", back, err, got)
	}

	// A flipped data byte fails the data digest.
	bad := bytes.Clone(snap)
	bad[bytes.Index(bad, d2)] ^= 1
	_, err = ReadTar(bytes.NewReader(bad), func(e Entry, r io.Reader) error {
		vr, check := Verified(e, r)
		io.Copy(io.Discard, vr)
		return check()
	})
	if !errors.Is(err, ErrDataDigest) {
		t.Fatalf("damaged data: %v, want ErrDataDigest", err)
	}
	if _, err := ReadTar(bytes.NewReader(snap[:len(snap)/2]), load); err == nil {
		t.Fatal("a truncated snapshot was read")
	}
}

func TestArtifact(t *testing.T) {
	e1, _ := testEntry("ab")
	idx := Index{Blobs: []Entry{e1}}
	m, cfg, err := Artifact(idx)
	if err != nil {
		t.Fatal(err)
	}
	pm, err := ParseArtifact(m)
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParseIndex(cfg)
	if err != nil || pm.Config.Digest != digest.FromBytes(cfg) || CheckArtifact(pm, back) != nil {
		t.Fatalf("artifact does not round-trip: %v", err)
	}
	if pm.Layers[0].Annotations[AnnotationBlob] != e1.Digest.String() {
		t.Fatalf("layer annotations %v", pm.Layers[0].Annotations)
	}
	if _, _, err := Artifact(Index{}); !errors.Is(err, ErrEmpty) {
		t.Fatalf("empty snapshot: %v", err)
	}
	if _, err := ParseArtifact([]byte(`{"config":{"mediaType":"x"}}`)); err == nil {
		t.Fatal("an image manifest was taken for a snapshot")
	}
	other, _ := testEntry("cd")
	if err := CheckArtifact(pm, Index{Blobs: []Entry{other}}); err == nil {
		t.Fatal("an index naming other data was accepted")
	}
}

func TestParseIndexRejects(t *testing.T) {
	e, _ := testEntry("ab")
	good, _ := Index{Blobs: []Entry{e}}.Marshal()
	if _, err := ParseIndex(good); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		mod  func(*Index)
		want string
	}{
		{"twice", func(i *Index) { i.Blobs = append(i.Blobs, i.Blobs[0]) }, "listed twice"},
		{"data size", func(i *Index) { i.Blobs[0].Data.Size++ }, "want 13 bytes"},
		{"data type", func(i *Index) { i.Blobs[0].Data.MediaType = "x" }, "want 13 bytes of"},
		{"blocks", func(i *Index) { i.Blobs[0].Blocks = []int64{2, 0} }, "out of order"},
	} {
		i := Index{Blobs: []Entry{e}}
		i.Blobs[0].Blocks = append([]int64(nil), e.Blocks...)
		c.mod(&i)
		b, _ := i.Marshal()
		if _, err := ParseIndex(b); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error with %q", c.name, err, c.want)
		}
	}
	if _, err := ParseIndex([]byte(`{"mediaType":"other","blobs":[]}`)); err == nil {
		t.Error("another media type was accepted")
	}
}

func FuzzParseIndex(f *testing.F) {
	e, _ := testEntry("ab")
	good, _ := Index{Blobs: []Entry{e}}.Marshal()
	f.Add(good)
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		idx, err := ParseIndex(b)
		if err != nil {
			return
		}
		for _, e := range idx.Blobs {
			if e.Validate() != nil || e.Data.Size != e.DataSize() {
				t.Fatalf("accepted an invalid entry %+v", e)
			}
		}
		again, err := json.Marshal(idx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseIndex(again); err != nil {
			t.Fatalf("re-parse of an accepted index: %v", err)
		}
	})
}

func TestIndexBlocks(t *testing.T) {
	idx := Index{Blobs: []Entry{{ExportedBlob: cache.ExportedBlob{Blocks: []int64{0, 1}}}, {ExportedBlob: cache.ExportedBlob{Blocks: []int64{7}}}}}
	if n := idx.Blocks(); n != 3 {
		t.Errorf("Blocks() = %d, want 3", n)
	}
}

// A snapshot written in one pass into a file reads back like one written by WriteTar: the index in its room, each
// data member named after its digest; a blob without blocks is left out, and an export that writes other than it
// announced fails.
func TestWriteSeekable(t *testing.T) {
	e1, d1 := testEntry("ab")
	e2, d2 := testEntry("cd")
	blobs := []struct {
		e    Entry
		data []byte
	}{{e1, d1}, {Entry{}, nil}, {e2, d2}}
	export := func(short bool) func(k int) ExportFunc {
		return func(k int) ExportFunc {
			return func(begin func(int64) (io.Writer, error)) (cache.ExportedBlob, digest.Digest, error) {
				b := blobs[k]
				if b.data == nil {
					return cache.ExportedBlob{}, "", nil
				}
				w, err := begin(int64(len(b.data)))
				if err != nil {
					return b.e.ExportedBlob, "", err
				}
				data := b.data
				if short {
					data = data[1:]
				}
				_, err = w.Write(data)
				return b.e.ExportedBlob, digest.FromBytes(b.data), err
			}
		}
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "snap.tar"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var tb bytes.Buffer
	if err := trace.Encode(&tb, []trace.Record{{Op: trace.Read, Layer: 1, Count: 4096, Offset: 65536}}); err != nil {
		t.Fatal(err)
	}
	start := trace.Start{Layers: []trace.StartLayer{{Digest: e1.Digest}, {Digest: e2.Digest}}, Trace: tb.Bytes()}
	idx, n, err := WriteSeekable(f, []int{2, 0, 2}, []trace.Start{start}, export(false))
	if err != nil || n != int64(len(d1)+len(d2)) || len(idx.Blobs) != 2 || len(idx.Starts) != 1 {
		t.Fatalf("WriteSeekable: %+v, %d bytes, %v", idx, n, err)
	}
	f.Seek(0, io.SeekStart)
	var got [][]byte
	back, err := ReadTar(f, func(e Entry, r io.Reader) error {
		vr, check := Verified(e, r)
		b, err := io.ReadAll(vr)
		got = append(got, b)
		if err != nil {
			return err
		}
		return check()
	})
	if err != nil || !reflect.DeepEqual(back, idx) || len(got) != 2 || !bytes.Equal(got[0], d1) || !bytes.Equal(got[1], d2) {
		t.Fatalf("read back: %+v (wrote %+v), %v", back, idx, err)
	}
	if rest, _ := io.ReadAll(f); len(rest) == 0 || bytes.ContainsFunc(rest, func(r rune) bool { return r != 0 }) {
		t.Fatalf("the tar's end: %d bytes, not all zero", len(rest))
	}
	// A start whose trace is damaged makes the index bad.
	idx.Starts[0].Trace = idx.Starts[0].Trace[:10]
	if ib, err := idx.Marshal(); err != nil {
		t.Fatal(err)
	} else if _, err := ParseIndex(ib); err == nil || !strings.Contains(err.Error(), "start 0") {
		t.Fatalf("an index with a damaged start: %v", err)
	}

	g, err := os.Create(filepath.Join(t.TempDir(), "short.tar"))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if _, _, err := WriteSeekable(g, []int{2, 0, 2}, nil, export(true)); err == nil || !strings.Contains(err.Error(), "written for") {
		t.Fatalf("an export short of what it announced: %v", err)
	}
	if _, _, err := WriteSeekable(g, []int{0, 0, 0}, nil, func(int) ExportFunc {
		return func(func(int64) (io.Writer, error)) (cache.ExportedBlob, digest.Digest, error) {
			return cache.ExportedBlob{}, "", nil
		}
	}); !errors.Is(err, ErrEmpty) {
		t.Fatalf("nothing to export: %v, want ErrEmpty", err)
	}
}
