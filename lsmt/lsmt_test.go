package lsmt

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

func newMemRW(t *testing.T, vsize int64, opts CreateOptions) (*RW, *memFile, *memFile) {
	t.Helper()
	data, index := &memFile{}, &memFile{}
	w, err := CreateRW(data, index, vsize, opts)
	if err != nil {
		t.Fatal(err)
	}
	return w, data, index
}

func entryAt(b []byte, off int) Segment { return DecodeEntry(b[off:]) }

// TestCommitVector is the spec's test vector: one 4096-byte write at LBA 0.
func TestCommitVector(t *testing.T) {
	w, _, _ := newMemRW(t, 64<<30, CreateOptions{})
	data := pattern(1, 4096)
	if _, err := w.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	out := commitBytes(t, w, CommitOptions{})
	if len(out) != 16384 {
		t.Fatalf("committed size %d, want 16384", len(out))
	}
	h, err := ParseHeader(out[:HeaderSize])
	if err != nil {
		t.Fatal(err)
	}
	if h.Flags != 7 || h.IndexOffset != 0 || h.IndexSize != 0 || h.VirtualSize != 64<<30 || h.UUID != NullUUID || h.ParentUUID != NullUUID {
		t.Fatalf("header %+v", h)
	}
	if !bytes.Equal(out[4096:8192], data) {
		t.Fatal("data not at 4096")
	}
	if got := entryAt(out, 8192); got != (Segment{Offset: 0, Length: 8, MOffset: 8}) {
		t.Fatalf("entry 0 = %v", got)
	}
	for i := 1; i < 256; i++ {
		if got := entryAt(out, 8192+16*i); !got.Invalid() || got.Length != 0 || got.MOffset != 0 {
			t.Fatalf("entry %d = %v, want invalid", i, got)
		}
	}
	tr, err := ParseHeader(out[12288:])
	if err != nil {
		t.Fatal(err)
	}
	if tr.Flags != 6 || tr.IndexOffset != 8192 || tr.IndexSize != 256 || tr.VirtualSize != 64<<30 {
		t.Fatalf("trailer %+v", tr)
	}
	// Raw bytes of the two slots: struct size, versions, null UUID strings, zero padding.
	for _, slot := range [][]byte{out[:4096], out[12288:]} {
		if binary.LittleEndian.Uint32(slot[24:]) != 390 || slot[132] != 1 || slot[133] != 1 {
			t.Fatal("bad struct size or version")
		}
		if string(slot[56:93]) != NullUUID+"\x00" || string(slot[93:130]) != NullUUID+"\x00" {
			t.Fatalf("uuid fields %q %q", slot[56:93], slot[93:130])
		}
		if !bytes.Equal(slot[390:], make([]byte, 4096-390)) || slot[130] != 0 || slot[131] != 0 {
			t.Fatal("slot padding not zero")
		}
	}

	// A discard of LBA 8..15 adds a zeroed entry at the next data sector.
	if err := w.Discard(8*512, 8*512); err != nil {
		t.Fatal(err)
	}
	out2 := commitBytes(t, w, CommitOptions{})
	if len(out2) != 16384 || !bytes.Equal(out2[:8192], out[:8192]) {
		t.Fatal("discard changed header or data")
	}
	if got := entryAt(out2, 8192+16); got != (Segment{Offset: 8, Length: 8, MOffset: 16, Zeroed: true}) {
		t.Fatalf("entry 1 = %v", got)
	}
	if got := entryAt(out2, 8192+32); !got.Invalid() {
		t.Fatalf("entry 2 = %v", got)
	}
	// Determinism.
	if !bytes.Equal(out2, commitBytes(t, w, CommitOptions{})) {
		t.Fatal("commit is not deterministic")
	}
	f := openBytes(t, out2)
	buf := make([]byte, 3*4096)
	if _, err := f.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf[:4096], data) || !bytes.Equal(buf[4096:], make([]byte, 8192)) {
		t.Fatal("read back differs")
	}
	if f.DataSectors() != 8 || f.RawIndexEntries() != 256 || len(f.Index()) != 2 {
		t.Fatalf("data %d raw %d index %v", f.DataSectors(), f.RawIndexEntries(), f.Index())
	}
	if k, err := Kind(bytes.NewReader(out2), int64(len(out2))); err != nil || k != KindCommitted {
		t.Fatal(k, err)
	}
}

func TestCommitChunkingAndMerge(t *testing.T) {
	// One 8 MiB write (two 4 MiB pieces) is copied in 64-sector chunks and re-merged below
	// MaxSegmentLength: 255 chunks (16320 sectors) per entry.
	w, _, _ := newMemRW(t, 1<<30, CreateOptions{})
	if _, err := w.WriteAt(pattern(2, 8<<20), 1<<20); err != nil {
		t.Fatal(err)
	}
	f := openBytes(t, commitBytes(t, w, CommitOptions{}))
	idx := f.Index()
	if len(idx) != 2 || idx[0] != (Segment{Offset: 2048, Length: 16320, MOffset: 8}) ||
		idx[1] != (Segment{Offset: 2048 + 16320, Length: 64, MOffset: 8 + 16320}) {
		t.Fatalf("index %v", idx)
	}
	// Writes that are not contiguous in the data file are not merged even when adjacent in LBA.
	w2, _, _ := newMemRW(t, 1<<30, CreateOptions{})
	w2.WriteAt(pattern(3, 4096), 4096)
	w2.WriteAt(pattern(4, 4096), 0)
	f2 := openBytes(t, commitBytes(t, w2, CommitOptions{}))
	if idx := f2.Index(); len(idx) != 1 || idx[0] != (Segment{Offset: 0, Length: 16, MOffset: 8}) {
		// Data is copied in LBA order, so both land contiguously and merge.
		t.Fatalf("index %v", idx)
	}
	// Consecutive zeroed extents merge too (same moffset).
	w3, _, _ := newMemRW(t, 1<<30, CreateOptions{})
	w3.Discard(0, 4096)
	w3.Discard(4096, 4096)
	f3 := openBytes(t, commitBytes(t, w3, CommitOptions{}))
	if idx := f3.Index(); len(idx) != 1 || idx[0] != (Segment{Offset: 0, Length: 16, MOffset: 8, Zeroed: true}) {
		t.Fatalf("index %v", idx)
	}
}

func TestCommitOptions(t *testing.T) {
	w, _, _ := newMemRW(t, 1<<20, CreateOptions{UUID: "01bb4fce-3eb1-b56b-05ad-f99504dafd31", ParentUUID: "c02fb491-b4d4-4904-8684-a014d032af78"})
	if h := w.Header(); h.UUID != "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31" || h.ParentUUID != "C02FB491-B4D4-4904-8684-A014D032AF78" || h.Flags != 3 {
		t.Fatalf("rw header %+v", h)
	}
	f := openBytes(t, commitBytes(t, w, CommitOptions{UserTag: "hello"}))
	if h := f.Header(); h.UUID != NullUUID || h.ParentUUID != "C02FB491-B4D4-4904-8684-A014D032AF78" || h.UserTag != "hello" {
		t.Fatalf("inherited header %+v", h)
	}
	f = openBytes(t, commitBytes(t, w, CommitOptions{UUID: "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", ParentUUID: "11111111-2222-3333-4444-555555555555"}))
	if h := f.Trailer(); h.UUID != "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE" || h.ParentUUID != "11111111-2222-3333-4444-555555555555" {
		t.Fatalf("explicit header %+v", h)
	}
	for _, o := range []CommitOptions{{UUID: "nope"}, {ParentUUID: "zz"}, {UserTag: strings.Repeat("x", 257)}} {
		if _, err := Commit(&bytes.Buffer{}, w, o); err == nil {
			t.Fatalf("options %+v accepted", o)
		}
	}
	// An empty layer commits to header + trailer only.
	e, _, _ := newMemRW(t, 1<<20, CreateOptions{})
	out := commitBytes(t, e, CommitOptions{})
	if len(out) != 8192 {
		t.Fatalf("empty commit is %d bytes", len(out))
	}
	if f := openBytes(t, out); f.RawIndexEntries() != 0 || f.Trailer().IndexOffset != 4096 {
		t.Fatalf("empty commit trailer %+v", f.Trailer())
	}
}

func TestHeaderRoundTrip(t *testing.T) {
	h := Header{Flags: 0x13, IndexOffset: 4096, IndexSize: 12, VirtualSize: 64 << 30,
		UUID: "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31", ParentUUID: NullUUID, Version: 1, SubVersion: 1,
		UserTag: strings.Repeat("m", 256)}
	b, err := h.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != HeaderSize {
		t.Fatal(len(b))
	}
	got, err := ParseHeader(b)
	if err != nil || got != h {
		t.Fatalf("round trip %+v, %v", got, err)
	}
	b2, _ := got.MarshalBinary()
	if !bytes.Equal(b, b2) {
		t.Fatal("re-marshal differs")
	}
	lower := h
	lower.UUID = strings.ToLower(h.UUID)
	b3, _ := lower.MarshalBinary()
	if !bytes.Equal(b, b3) {
		t.Fatal("lower-case UUID not written upper-case")
	}
	if !h.IsHeader() || !h.IsDataFile() || h.IsSealed() || !h.IsSparse() {
		t.Fatal("flag accessors")
	}
	b[3] = 'X'
	if _, err := ParseHeader(b); !errors.Is(err, ErrBadMagic) || err.Error() != "lsmt: bad magic" {
		t.Fatalf("bad magic error: %v", err)
	}
	if _, err := (Header{UUID: "xyz"}).MarshalBinary(); err == nil {
		t.Fatal("invalid uuid accepted")
	}
	if _, ok := CanonicalUUID("01BB4FCE-3EB1-B56B-05AD-F99504DAFD3G"); ok {
		t.Fatal("bad hex accepted")
	}
}

func TestEntryCodec(t *testing.T) {
	s := Segment{Offset: 1<<50 - 2, Length: MaxSegmentLength, MOffset: 1<<55 - 1, Zeroed: true, Tag: 0xAB}
	b := AppendEntry(nil, s)
	if len(b) != 16 || DecodeEntry(b) != s {
		t.Fatalf("round trip %v", DecodeEntry(b))
	}
	lo, hi := binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint64(b[8:])
	if lo != (1<<50-2)|uint64(MaxSegmentLength)<<50 || hi != (1<<55-1)|1<<55|0xAB<<56 {
		t.Fatalf("bits %x %x", lo, hi)
	}
	inv := AppendEntry(nil, InvalidSegment)
	if binary.LittleEndian.Uint64(inv) != 1<<50-1 || binary.LittleEndian.Uint64(inv[8:]) != 0 || !DecodeEntry(inv).Invalid() {
		t.Fatal("invalid entry encoding")
	}
}
