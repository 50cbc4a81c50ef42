package trace

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

func TestRoundTrip(t *testing.T) {
	for _, recs := range [][]Record{
		{},
		{{Op: Read, Layer: 0, Count: 4096, Offset: 0}},
		{{Read, 3, 1 << 20, 1 << 33}, {Write, 1, 512, 4096}, {Read, 254, 65536, 123 * 512}},
	} {
		var buf bytes.Buffer
		if err := Encode(&buf, recs); err != nil {
			t.Fatal(err)
		}
		if buf.Len() != headerSize+recordSize*len(recs) {
			t.Fatalf("size %d", buf.Len())
		}
		got, err := Decode(buf.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(recs) {
			t.Fatalf("got %d records, want %d", len(got), len(recs))
		}
		for i := range recs {
			if got[i] != recs[i] {
				t.Fatalf("record %d: %+v != %+v", i, got[i], recs[i])
			}
		}
	}
}

// The layout is fixed by upstream: check the bytes of a one-record file field by field.
func TestLayout(t *testing.T) {
	var buf bytes.Buffer
	Encode(&buf, []Record{{Read, 2, 4096, 8192}})
	b := buf.Bytes()
	le := binary.LittleEndian
	if le.Uint32(b) != 3270449184 || le.Uint64(b[8:]) != 24 || b[24] != 'R' || le.Uint32(b[28:]) != 2 ||
		le.Uint64(b[32:]) != 4096 || le.Uint64(b[40:]) != 8192 {
		t.Fatalf("layout: % x", b)
	}
	// Raw CRC32C (no inversion) of the record bytes.
	if got := le.Uint32(b[16:]); got != rawCRC(b[24:]) || got == 0 {
		t.Fatalf("checksum %#x", got)
	}
	// Empty record list: CRC of nothing with a zero seed is zero.
	var empty bytes.Buffer
	Encode(&empty, nil)
	if le.Uint32(empty.Bytes()[16:]) != 0 {
		t.Fatal("empty trace checksum must be 0")
	}
}

func TestDecodeErrors(t *testing.T) {
	var good bytes.Buffer
	Encode(&good, []Record{{Read, 0, 4096, 0}, {Read, 1, 4096, 512}})
	mut := func(f func([]byte) []byte) []byte { return f(bytes.Clone(good.Bytes())) }
	cases := map[string]struct {
		b    []byte
		want string
	}{
		"file list": {[]byte("/usr/bin/python3\n"), "bad magic"},
		"truncated": {good.Bytes()[:40], "header says 48 bytes"},
		"checksum":  {mut(func(b []byte) []byte { b[40] ^= 1; return b }), "checksum mismatch"},
		"op": {mut(func(b []byte) []byte {
			b[24] = 'X'
			binary.LittleEndian.PutUint32(b[16:], rawCRC(b[24:]))
			return b
		}), "unknown op"},
		"ragged": {mut(func(b []byte) []byte {
			b = append(b, 0)
			binary.LittleEndian.PutUint64(b[8:], 49)
			binary.LittleEndian.PutUint32(b[16:], rawCRC(b[24:]))
			return b
		}), "not a multiple"},
	}
	for name, c := range cases {
		_, err := Decode(c.b)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want %q", name, err, c.want)
		}
	}
	if _, err := Decode([]byte("x")); !errors.Is(err, ErrNotTrace) {
		t.Errorf("short input: %v", err)
	}
}

func FuzzDecode(f *testing.F) {
	var good bytes.Buffer
	Encode(&good, []Record{{Read, 0, 4096, 0}, {Write, 7, 512, 1 << 30}})
	f.Add(good.Bytes())
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		recs, err := Decode(b)
		if err != nil {
			return
		}
		var again bytes.Buffer
		if err := Encode(&again, recs); err != nil {
			t.Fatal(err)
		}
		// Padding bytes are not preserved, but everything decoded must decode the same again.
		recs2, err := Decode(again.Bytes())
		if err != nil || len(recs2) != len(recs) {
			t.Fatalf("re-decode: %v", err)
		}
	})
}

func TestRecorder(t *testing.T) {
	r := NewRecorder()
	r.Read(1, 4096, 512)
	r.Read(0, 0, 4096)
	r.Read(1, 4096, 512) // a repeat
	r.Read(1, 4096, 1024)
	recs, at, dropped := r.Records()
	want := []Record{{Read, 1, 512, 4096}, {Read, 0, 4096, 0}, {Read, 1, 1024, 4096}}
	if len(recs) != len(want) || len(at) != len(want) || dropped != 0 {
		t.Fatalf("records %+v, times %v, dropped %d", recs, at, dropped)
	}
	for i := range want {
		if recs[i] != want[i] {
			t.Fatalf("record %d: %+v, want %+v", i, recs[i], want[i])
		}
		if i > 0 && at[i] < at[i-1] {
			t.Fatalf("times out of order: %v", at)
		}
	}
}
