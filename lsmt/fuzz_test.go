package lsmt

import (
	"bytes"
	"encoding/binary"
	"math/rand"
	"testing"
)

// fuzzWindow bounds how much of a fuzzed layer's virtual disk is read back.
const fuzzWindow = 256 << 10

// Fuzz inputs are compact: header slots are stored as their 390-byte structs and expanded to
// 4096 bytes before use, so inputs stay small enough for the fuzzer to mutate and minimise.

// expandLayer turns hdr(390) | trailer(390) | body into hdr | body | trailer with 4096-byte slots.
func expandLayer(in []byte) []byte {
	if len(in) < 2*headerStructSize {
		return in
	}
	body := in[2*headerStructSize:]
	out := make([]byte, 2*HeaderSize+len(body))
	copy(out, in[:headerStructSize])
	copy(out[HeaderSize:], body)
	copy(out[HeaderSize+len(body):], in[headerStructSize:2*headerStructSize])
	return out
}

// compactLayer is the inverse of expandLayer for a committed layer, dropping index padding.
func compactLayer(t testing.TB, b []byte) []byte {
	f := openBytes(t, b)
	tr := f.Trailer()
	tr.IndexSize = uint64(len(f.Index()))
	ts, err := tr.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	out := append([]byte(nil), b[:headerStructSize]...)
	out = append(out, ts[:headerStructSize]...)
	return append(out, b[HeaderSize:tr.IndexOffset+tr.IndexSize*EntrySize]...)
}

// smallLayers returns a few small layers (fuzz seeds) with their workloads' RW files.
func smallLayers(t testing.TB) (layers [][]byte, rws [][2][]byte) {
	for seed := int64(1); seed <= 3; seed++ {
		rng := rand.New(rand.NewSource(seed))
		data, index := &memFile{}, &memFile{}
		w, err := CreateRW(data, index, 64<<10, CreateOptions{Sparse: seed == 3})
		if err != nil {
			t.Fatal(err)
		}
		workload(t, rng, w, newModel(64<<10), int(seed)*2, 4)
		var buf bytes.Buffer
		if _, err := Commit(&buf, w, CommitOptions{}); err != nil {
			t.Fatal(err)
		}
		layers = append(layers, compactLayer(t, buf.Bytes()))
		if seed != 3 {
			w.Close()
			// The sparse data file is vsize+4096 bytes; keep only the append layers' files.
			rws = append(rws, [2][]byte{compactSlot(data.b), compactSlot(index.b)})
		}
	}
	return layers, rws
}

// compactSlot keeps only the 390-byte struct of a file's leading header slot.
func compactSlot(b []byte) []byte {
	return append(append([]byte(nil), b[:headerStructSize]...), b[HeaderSize:]...)
}

// expandSlot is the inverse of compactSlot.
func expandSlot(in []byte) []byte {
	if len(in) < headerStructSize {
		return in
	}
	out := make([]byte, HeaderSize+len(in)-headerStructSize)
	copy(out, in[:headerStructSize])
	copy(out[HeaderSize:], in[headerStructSize:])
	return out
}

func FuzzOpen(f *testing.F) {
	layers, _ := smallLayers(f)
	for _, b := range layers {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, in []byte) { checkOpen(t, expandLayer(in)) })
}

// checkOpen opens b as a layer; when that succeeds, the index must be valid and reads must agree
// with a naive interpretation of it.
func checkOpen(t *testing.T, b []byte) {
	{
		lf, err := Open(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		idx := lf.Index()
		dataEnd := lf.Trailer().IndexOffset / SectorSize
		for i, s := range idx {
			if s.Invalid() || s.Length == 0 || s.Tag != 0 || s.MOffset < 8 || (!s.Zeroed && s.MOffset+uint64(s.Length) > dataEnd) {
				t.Fatalf("accepted bad entry %d: %v", i, s)
			}
			if i > 0 && idx[i-1].End() > s.Offset {
				t.Fatalf("accepted overlapping entries %v %v", idx[i-1], s)
			}
		}
		// Reads agree with a naive per-sector interpretation of the index.
		n := min(uint64(lf.VirtualSize()), fuzzWindow)
		want := make([]byte, n)
		for _, s := range idx {
			for k := uint64(0); k < uint64(s.Length) && (s.Offset+k+1)*SectorSize <= n; k++ {
				if !s.Zeroed {
					src := (s.MOffset + k) * SectorSize
					copy(want[(s.Offset+k)*SectorSize:], b[src:src+SectorSize])
				}
			}
		}
		got := make([]byte, n)
		if c, err := lf.ReadAt(got, 0); uint64(c) != n || (err != nil && uint64(lf.VirtualSize()) != n) {
			t.Fatalf("read %d of %d: %v", c, n, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("read differs at byte %d", firstDiff(got, want))
		}
	}
}

func FuzzIndexDecode(f *testing.F) {
	f.Add(AppendEntry(nil, Segment{Offset: 8, Length: 8, MOffset: 16, Zeroed: true}))
	f.Add(AppendEntry(nil, InvalidSegment))
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < EntrySize {
			return
		}
		s := DecodeEntry(b)
		if enc := AppendEntry(nil, s); !bytes.Equal(enc, b[:EntrySize]) {
			t.Fatalf("re-encoding %v gives %x, want %x", s, enc, b[:EntrySize])
		}
		if s.Offset > maxOffset || s.Length > MaxSegmentLength || s.MOffset > maxMOffset {
			t.Fatalf("decoded fields out of range: %v", s)
		}
		if s.Invalid() != (binary.LittleEndian.Uint64(b)&maxOffset == maxOffset) {
			t.Fatal("invalid flag")
		}
	})
}

func FuzzOpenRW(f *testing.F) {
	_, rws := smallLayers(f)
	for _, p := range rws {
		f.Add(p[0], p[1])
	}
	sparse := &memFile{}
	w, err := CreateRW(sparse, nil, 4096, CreateOptions{Sparse: true})
	if err != nil {
		f.Fatal(err)
	}
	w.WriteAt(pattern(9, 1024), 1024)
	f.Add(compactSlot(sparse.b), []byte{})
	f.Fuzz(func(t *testing.T, dataIn, indexIn []byte) {
		db, ib := expandSlot(dataIn), expandSlot(indexIn)
		data := &memFile{}
		data.WriteAt(db, 0)
		index := &memFile{}
		index.WriteAt(ib, 0)
		w, err := OpenRW(data, index)
		if err != nil {
			return
		}
		n := min(w.limit(), fuzzWindow)
		// Naive replay: later entries win sector by sector.
		want := make([]byte, n)
		if !w.Header().IsSparse() {
			for i := HeaderSize; i+EntrySize <= len(ib); i += EntrySize {
				s := DecodeEntry(ib[i:])
				if s.Invalid() {
					continue
				}
				for k := uint64(0); k < uint64(s.Length) && (s.Offset+k+1)*SectorSize <= n; k++ {
					dst := want[(s.Offset+k)*SectorSize:][:SectorSize]
					if s.Zeroed {
						clear(dst)
					} else {
						copy(dst, db[(s.MOffset+k)*SectorSize:])
					}
				}
			}
		} else if len(db) > HeaderSize {
			// Extents cover whole sectors only.
			copy(want, db[HeaderSize:HeaderSize+(len(db)-HeaderSize)/SectorSize*SectorSize])
		}
		got := make([]byte, n)
		if c, err := w.ReadAt(got, 0); uint64(c) != n || (err != nil && w.limit() != n) {
			t.Fatalf("read %d of %d: %v", c, n, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("read differs at byte %d", firstDiff(got, want))
		}
	})
}

// FuzzOpenWarp opens fuzzed warp layers over a 64 KiB target: what opens has a valid index, and reads agree with it.
func FuzzOpenWarp(f *testing.F) {
	layers, _ := smallLayers(f)
	for _, b := range layers {
		f.Add(b)
	}
	target := pattern(3, 64<<10)
	f.Fuzz(func(t *testing.T, in []byte) {
		b := expandLayer(in)
		lf, err := OpenWarp(bytes.NewReader(b), int64(len(b)), bytes.NewReader(target), int64(len(target)))
		if err != nil {
			return
		}
		idx := lf.Index()
		dataEnd := lf.Trailer().IndexOffset / SectorSize
		for i, s := range idx {
			bad := s.Length == 0 || s.Tag > TagTarget || (i > 0 && idx[i-1].End() > s.Offset)
			if s.Tag == TagMeta {
				bad = bad || s.MOffset < 8 || (!s.Zeroed && s.MOffset+uint64(s.Length) > dataEnd)
			} else {
				bad = bad || s.Zeroed || s.MOffset+uint64(s.Length) > uint64(len(target))/SectorSize
			}
			if bad {
				t.Fatalf("accepted bad entry %d: %v", i, s)
			}
		}
		p := make([]byte, fuzzWindow)
		if _, err := lf.ReadAt(p, 0); err != nil && err.Error() != "EOF" {
			return
		}
		for _, s := range idx {
			if s.Tag != TagTarget || s.End()*SectorSize > fuzzWindow || int64(s.End()*SectorSize) > lf.VirtualSize() {
				continue
			}
			got := p[s.Offset*SectorSize : s.End()*SectorSize]
			if !bytes.Equal(got, target[s.MOffset*SectorSize:(s.MOffset+uint64(s.Length))*SectorSize]) {
				t.Fatalf("remote entry %v reads other bytes than the target's", s)
			}
		}
	})
}
