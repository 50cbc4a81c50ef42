package lsmt

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"strings"
	"testing"
)

// TestWarp builds a warp layer with writes and target mappings that overwrite one another, commits it as upstream's
// LSMTWarpFile does and reads it back, alone and stacked, against a model of the disk.
func TestWarp(t *testing.T) {
	const vsize = 4 << 20
	target := pattern(99, 2<<20)
	data, index := &memFile{}, &memFile{}
	w, err := CreateRW(data, index, vsize, CreateOptions{Warp: true, UUID: "11111111-2222-3333-4444-555555555555"})
	if err != nil {
		t.Fatal(err)
	}
	w.SetTarget(bytes.NewReader(target))
	model := make([]byte, vsize)
	known := make([]bool, vsize/SectorSize) // sectors the layer maps
	rng := rand.New(rand.NewPCG(5, 5))
	for i := range 300 {
		off := rng.Int64N(vsize/SectorSize-64) * SectorSize
		n := (1 + rng.Int64N(63)) * SectorSize
		if rng.IntN(2) == 0 {
			p := pattern(i, int(n))
			if _, err := w.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], p)
		} else {
			toff := rng.Int64N(int64(len(target))/SectorSize-64) * SectorSize
			if err := w.MapTarget(off, n, toff); err != nil {
				t.Fatal(err)
			}
			copy(model[off:off+n], target[toff:toff+n])
		}
		for s := off / SectorSize; s < (off+n)/SectorSize; s++ {
			known[s] = true
		}
	}
	// A long mapping is split into entries of at most MaxSegmentLength sectors.
	if err := w.MapTarget(3<<20, 1<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	copy(model[3<<20:], target[1<<20:2<<20])
	for s := (3 << 20) / SectorSize; s < 4<<20/SectorSize; s++ {
		known[s] = true
	}
	check := func(name string, r interface {
		ReadAt([]byte, int64) (int, error)
	}) {
		t.Helper()
		got := make([]byte, vsize)
		if _, err := r.ReadAt(got, 0); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for s, k := range known {
			if k && !bytes.Equal(got[s*SectorSize:(s+1)*SectorSize], model[s*SectorSize:(s+1)*SectorSize]) {
				t.Fatalf("%s: sector %d differs from the model", name, s)
			}
		}
	}
	check("rw", w)
	committed := commitBytes(t, w, CommitOptions{Warp: true, UUID: "11111111-2222-3333-4444-555555555555"})
	if k, err := Kind(bytes.NewReader(committed), int64(len(committed))); err != nil || k != KindWarp {
		t.Fatalf("Kind = %q, %v", k, err)
	}
	// Remote entries are kept with tag 1, fs-meta with tag 0, the index is not padded.
	trl, err := ParseHeader(committed[len(committed)-HeaderSize:])
	if err != nil {
		t.Fatal(err)
	}
	tags := map[uint8]int{}
	for i := uint64(0); i < trl.IndexSize; i++ {
		e := committed[trl.IndexOffset+i*EntrySize:]
		m := unpack(binary.LittleEndian.Uint64(e), binary.LittleEndian.Uint64(e[8:]))
		if m.invalid() {
			t.Fatal("a padding entry in a warp index")
		}
		tags[m.tag()]++
	}
	if tags[TagMeta] == 0 || tags[TagTarget] == 0 || len(tags) != 2 {
		t.Fatalf("entry tags %v", tags)
	}
	f, err := OpenWarp(bytes.NewReader(committed), int64(len(committed)), bytes.NewReader(target), int64(len(target)))
	if err != nil {
		t.Fatal(err)
	}
	check("committed", f)
	if _, err := Open(bytes.NewReader(committed), int64(len(committed))); err == nil {
		t.Fatal("Open took a warp layer for a normal one")
	}
	if _, err := OpenWarp(bytes.NewReader(committed), int64(len(committed)), bytes.NewReader(target), 1<<20); err == nil {
		t.Fatal("remote entries beyond a short target accepted")
	}
	// Stacked between normal layers, with a writable layer on top.
	lowerRW, err := CreateRW(&memFile{}, &memFile{}, vsize, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	lowerRW.WriteAt(bytes.Repeat([]byte{0xee}, vsize), 0)
	lower := openBytes(t, commitBytes(t, lowerRW, CommitOptions{}))
	up, err := CreateRW(&memFile{}, &memFile{}, 0, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st, err := NewStack([]*File{lower, f}, up)
	if err != nil {
		t.Fatal(err)
	}
	top := pattern(7, 8192)
	st.WriteAt(top, 1<<20)
	want := bytes.Repeat([]byte{0xee}, vsize)
	for s, k := range known {
		if k {
			copy(want[s*SectorSize:], model[s*SectorSize:(s+1)*SectorSize])
		}
	}
	copy(want[1<<20:], top)
	got := make([]byte, vsize)
	if _, err := st.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("stack over a warp layer reads wrong data")
	}
	// Merging the stack materialises the target's data.
	merged := openBytes(t, commitBytes(t, st, CommitOptions{}))
	if _, err := merged.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatal("merged stack differs", err)
	}
}

func TestWarpErrors(t *testing.T) {
	w, err := CreateRW(&memFile{}, &memFile{}, 1<<20, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.MapTarget(0, 4096, 0); err == nil || !strings.Contains(err.Error(), "Warp") {
		t.Fatalf("MapTarget on a normal layer: %v", err)
	}
	if _, err := CreateRW(&memFile{}, nil, 1<<20, CreateOptions{Warp: true, Sparse: true}); err == nil {
		t.Fatal("sparse warp layer created")
	}
	w, _ = CreateRW(&memFile{}, &memFile{}, 1<<20, CreateOptions{Warp: true})
	if err := w.MapTarget(0, 4096, 100); err == nil {
		t.Fatal("unaligned target offset accepted")
	}
	w.MapTarget(0, 4096, 0)
	// Without a target, reading remote data fails instead of returning the data file's bytes.
	if _, err := w.ReadAt(make([]byte, 4096), 0); err == nil {
		t.Fatal("remote data read without a target")
	}
}

// TestStackFrozenLayers stacks MaxLayers frozen writable layers (the converter's lowers): only a warp layer reads a
// second file, so they fit the stack's 8-bit tags, and a warp upper takes one slot more.
func TestStackFrozenLayers(t *testing.T) {
	lowers := make([]*File, MaxLayers)
	for i := range lowers {
		w, err := CreateRW(&memFile{}, &memFile{}, 1<<20, CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		w.WriteAt(pattern(i, 512), int64(i)*512)
		if lowers[i], err = w.Freeze(); err != nil {
			t.Fatal(err)
		}
	}
	up, _ := CreateRW(&memFile{}, &memFile{}, 0, CreateOptions{})
	st, err := NewStack(lowers, up)
	if err != nil {
		t.Fatal(err)
	}
	p := make([]byte, 512)
	if _, err := st.ReadAt(p, 254*512); err != nil || !bytes.Equal(p, pattern(254, 512)) {
		t.Fatal("top frozen layer reads wrong", err)
	}
	warp, _ := CreateRW(&memFile{}, &memFile{}, 0, CreateOptions{Warp: true})
	if _, err := NewStack(lowers, warp); err == nil {
		t.Fatal("a warp upper over 255 files stacked: its target has no tag left")
	}
	if _, err := NewStack(lowers[1:], warp); err != nil {
		t.Fatal(err)
	}
}
