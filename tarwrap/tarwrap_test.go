package tarwrap

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
)

const fixture = "../testdata/upstream/hello-world-oci/blobs/sha256/022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"

func readFixture(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile(fixture)
	if err != nil {
		t.Fatalf("upstream fixture: %v", err)
	}
	return b
}

func TestDetectUpstreamFixture(t *testing.T) {
	blob := readFixture(t)
	m, err := Detect(bytes.NewReader(blob), int64(len(blob)))
	if err != nil {
		t.Fatal(err)
	}
	want := Member{Name: "overlaybd.commit", Offset: 1536, Size: 639491, Mode: 0o100644, PAX: true}
	if m != want {
		t.Fatalf("Detect = %+v, want %+v", m, want)
	}
	sr, err := Open(bytes.NewReader(blob), int64(len(blob)))
	if err != nil {
		t.Fatal(err)
	}
	magic := make([]byte, 8)
	if _, err := sr.ReadAt(magic, 0); err != nil || string(magic[:5]) != "ZFile" {
		t.Fatalf("payload starts %q, %v; want ZFile magic", magic, err)
	}
}

// Writing the fixture's payload must reproduce the upstream blob byte for byte.
func TestWriteMatchesUpstream(t *testing.T) {
	blob := readFixture(t)
	payload := blob[1536 : 1536+639491]
	var out bytes.Buffer
	n, err := Write(&out, bytes.NewReader(payload), int64(len(payload)), DefaultMode)
	if err != nil {
		t.Fatal(err)
	}
	if n != int64(len(blob)) || WrappedSize(int64(len(payload))) != n {
		t.Fatalf("wrote %d bytes, WrappedSize %d, upstream blob %d", n, WrappedSize(int64(len(payload))), len(blob))
	}
	if !bytes.Equal(out.Bytes(), blob) {
		got := out.Bytes()
		for i := range got {
			if got[i] != blob[i] {
				t.Fatalf("first difference at byte %d: got %q want %q", i, got[i], blob[i])
			}
		}
	}
}

func TestRoundTripSizes(t *testing.T) {
	for _, size := range []int{0, 1, 511, 512, 513, 4096, 100000} {
		payload := bytes.Repeat([]byte{0xa5}, size)
		var out bytes.Buffer
		if _, err := Write(&out, bytes.NewReader(payload), int64(size), DefaultMode); err != nil {
			t.Fatal(err)
		}
		m, err := Detect(bytes.NewReader(out.Bytes()), int64(out.Len()))
		if err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if HeadSize != 1536 || m.Offset != HeadSize || m.Size != int64(size) || int64(out.Len()) != WrappedSize(int64(size)) {
			t.Fatalf("size %d: member %+v in %d bytes", size, m, out.Len())
		}
		// Go's archive/tar must read it too: the blob is a real tar.
		tr := tar.NewReader(bytes.NewReader(out.Bytes()))
		h, err := tr.Next()
		if err != nil || h.Name != CommitName || h.Size != int64(size) {
			t.Fatalf("size %d: archive/tar: %+v %v", size, h, err)
		}
		got, _ := io.ReadAll(tr)
		if !bytes.Equal(got, payload) {
			t.Fatalf("size %d: archive/tar payload differs", size)
		}
		if _, err := tr.Next(); err != io.EOF {
			t.Fatalf("size %d: want one member, got %v", size, err)
		}
	}
}

func TestWriteShortPayload(t *testing.T) {
	_, err := Write(io.Discard, strings.NewReader("abc"), 10, DefaultMode)
	if err == nil || !strings.Contains(err.Error(), "payload ended after 3 of 10 bytes") {
		t.Fatalf("err = %v", err)
	}
}

// Go-written wrappers (archive/tar, no pax, GNU long names) must be read with the offset computed from headers.
func TestDetectGoWritten(t *testing.T) {
	long := strings.Repeat("x", 150) + ".commit"
	cases := []struct {
		name   string
		format tar.Format
		wantAt int64
	}{
		{"trace", tar.FormatUSTAR, 512},
		{CommitName, tar.FormatPAX, 1536},
		{long, tar.FormatPAX, 1536},
	}
	for _, c := range cases {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		payload := []byte("LSMT payload bytes")
		h := &tar.Header{Name: c.name, Mode: 0o444, Size: int64(len(payload)), Typeflag: tar.TypeReg, Format: c.format}
		if c.format == tar.FormatPAX && c.name == CommitName {
			h.PAXRecords = map[string]string{"comment": "x"}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Write(payload)
		tw.Close()
		m, err := Detect(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if m.Name != c.name || m.Offset != c.wantAt || m.Size != int64(len(payload)) {
			t.Fatalf("%s: member %+v", c.name, m)
		}
		got := make([]byte, m.Size)
		if _, err := bytes.NewReader(buf.Bytes()).ReadAt(got, m.Offset); err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("%s: payload %q %v", c.name, got, err)
		}
	}
}

func TestNotWrapped(t *testing.T) {
	for _, b := range [][]byte{nil, []byte("ZFile\x00\x01\x00"), make([]byte, 4096)} {
		_, err := Detect(bytes.NewReader(b), int64(len(b)))
		if !errors.Is(err, ErrNotWrapped) {
			t.Fatalf("Detect(%d bytes) = %v, want ErrNotWrapped", len(b), err)
		}
		sr, err := Open(bytes.NewReader(b), int64(len(b)))
		if err != nil || sr.Size() != int64(len(b)) {
			t.Fatalf("Open raw: %v", err)
		}
	}
}

func TestMalformed(t *testing.T) {
	var good bytes.Buffer
	Write(&good, bytes.NewReader(make([]byte, 1000)), 1000, DefaultMode)
	mutate := func(f func(b []byte)) []byte {
		b := bytes.Clone(good.Bytes())
		f(b)
		return b
	}
	fix := func(h []byte) { putChecksum(h) }
	cases := map[string]struct {
		blob []byte
		want string
	}{
		"truncated":       {good.Bytes()[:2000], "exceeds blob"},
		"bad 2nd cksum":   {mutate(func(b []byte) { b[1024] = 'X' }), "bad checksum"},
		"bad pax size":    {mutate(func(b []byte) { copy(b[512:], "13 size=abcd\n"); fix(b[:512]) }), "bad size"},
		"bad pax length":  {mutate(func(b []byte) { copy(b[512:], "99 size=1\n") }), "malformed record length"},
		"directory type":  {mutate(func(b []byte) { b[1024+156] = '5'; fix(b[1024:1536]) }), "want a regular file"},
		"huge ext header": {mutate(func(b []byte) { putOctal(b[124:136], 1<<30, 11); fix(b[:512]) }), "out of range"},
	}
	for name, c := range cases {
		_, err := Detect(bytes.NewReader(c.blob), int64(len(c.blob)))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want %q", name, err, c.want)
		}
	}
}

func FuzzDetect(f *testing.F) {
	var good bytes.Buffer
	Write(&good, bytes.NewReader([]byte("payload")), 7, DefaultMode)
	f.Add(good.Bytes())
	f.Add(readFixture(f)[:4096])
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Detect(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		if m.Offset < 0 || m.Size < 0 || m.Offset+m.Size > int64(len(b)) {
			t.Fatalf("member %+v outside %d-byte blob", m, len(b))
		}
	})
}
