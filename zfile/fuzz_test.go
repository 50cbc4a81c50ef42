package zfile

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
)

// fuzzSeeds returns small valid ZFiles of both algorithms, with and without CRCs and header overwrite.
func fuzzSeeds(t testing.TB) [][]byte {
	srcs := [][]byte{nil, []byte("a"), textData(5000, 1), mixedData(20000, 2)}
	var seeds [][]byte
	for i, src := range srcs {
		for _, algo := range []Algorithm{AlgoLZ4, AlgoZSTD} {
			seeds = append(seeds, compressBytes(t, src, Options{Algorithm: algo, NoVerify: i == 2}, i%2 == 1))
		}
	}
	return seeds
}

// fixChecksums recomputes, where the layout allows, the block CRCs, index CRC and slot digests of
// a (mutated) ZFile, so that fuzzing reaches the decompressors.
func fixChecksums(b []byte) {
	if len(b) < 2*SlotSize {
		return
	}
	le := binary.LittleEndian
	hdr, tr := b[:SlotSize], b[len(b)-SlotSize:]
	sel := tr
	if le.Uint64(hdr[offFlags:])&FlagHeaderOverwrite != 0 {
		sel = hdr
	}
	indexOff, n := le.Uint64(sel[offIndexOffset:]), le.Uint64(sel[offIndexSize:])
	limit := uint64(len(b) - SlotSize)
	if n <= limit/4 && indexOff <= limit-4*n {
		index := b[indexOff : indexOff+4*n]
		if sel[offVerify] != 0 {
			pos := uint64(SlotSize) + uint64(le.Uint32(sel[offDictSize:]))
			for i := uint64(0); i < n; i++ {
				l := uint64(le.Uint32(index[4*i:]))
				if l <= crcSize || pos+l > indexOff {
					break
				}
				rec := b[pos : pos+l]
				le.PutUint32(rec[l-crcSize:], crc32c(blockCRCSeed, rec[:l-crcSize]))
				pos += l
			}
		}
		le.PutUint32(sel[offIndexCRC:], crc32c(0, index))
	}
	le.PutUint32(hdr[offDigest:], slotDigest(hdr))
	le.PutUint32(tr[offDigest:], slotDigest(tr))
}

// FuzzOpen opens mutated ZFiles: Open and Check must not panic, and a successful Open gives a
// consistent Info.
func FuzzOpen(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s, false)
		f.Add(s, true)
	}
	f.Fuzz(func(t *testing.T, data []byte, fix bool) {
		if fix {
			fixChecksums(data)
		}
		z, err := Open(bytes.NewReader(data), int64(len(data)), true)
		if err != nil {
			if !errors.Is(err, ErrFormat) && !errors.Is(err, ErrChecksum) && !errors.Is(err, ErrUnsupported) &&
				!errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("Open error of unexpected kind: %v", err)
			}
			return
		}
		info := z.Info()
		bs := int64(info.BlockSize)
		if info.Blocks != (info.OriginalSize+bs-1)/bs || info.IndexOffset+4*info.Blocks > info.Size-SlotSize {
			t.Fatalf("inconsistent info %+v", info)
		}
		if err := z.Check(); err != nil && !errors.Is(err, ErrChecksum) && !errors.Is(err, ErrCorrupt) {
			t.Fatalf("Check error of unexpected kind: %v", err)
		}
	})
}

// FuzzRead reads ranges of mutated ZFiles: ReadAt must not panic, must return the length io.ReaderAt
// requires, and a multi-block read must agree with block-by-block reads.
func FuzzRead(f *testing.F) {
	for i, s := range fuzzSeeds(f) {
		f.Add(s, true, int64(i*1000), uint16(10000))
		f.Add(s, false, int64(4000), uint16(200))
	}
	f.Fuzz(func(t *testing.T, data []byte, fix bool, off int64, n uint16) {
		if fix {
			fixChecksums(data)
		}
		z, err := Open(bytes.NewReader(data), int64(len(data)), true)
		if err != nil {
			return
		}
		size := z.Size()
		if off < 0 {
			off = -off
		}
		if off < 0 || size == 0 {
			off = 0
		} else {
			off %= size + 1
		}
		p := make([]byte, n)
		got, err := z.ReadAt(p, off)
		want := int(min(int64(n), size-off))
		if err != nil && err != io.EOF {
			if !errors.Is(err, ErrChecksum) && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("ReadAt error of unexpected kind: %v", err)
			}
			return
		}
		if got != want || (err == io.EOF) != (got < int(n)) {
			t.Fatalf("ReadAt(%d, %d) = %d, %v; size %d", n, off, got, err, size)
		}
		// The same bytes, read one block at a time.
		bs := int64(z.Info().BlockSize)
		for pos := off; pos < off+int64(got); {
			l := min(bs-pos%bs, off+int64(got)-pos)
			q := make([]byte, l)
			if k, err := z.ReadAt(q, pos); k != int(l) || (err != nil && err != io.EOF) || !bytes.Equal(q, p[pos-off:pos-off+l]) {
				t.Fatalf("block read at %d: %d, %v; differs from the multi-block read", pos, k, err)
			}
			pos += l
		}
	})
}

// TestMutations corrupts small ZFiles at random places (checksums fixed up or not) and reads them
// whole: no panic, errors of the documented kinds, and the right length when there is no error.
func TestMutations(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	seeds := fuzzSeeds(t)
	for i := range 3000 {
		data := bytes.Clone(seeds[i%len(seeds)])
		for range 1 + r.IntN(4) {
			data[r.IntN(len(data))] ^= byte(1 + r.IntN(255))
		}
		if i%4 != 0 {
			fixChecksums(data)
		}
		z, err := Open(bytes.NewReader(data), int64(len(data)), true)
		if err != nil {
			continue
		}
		p := make([]byte, z.Size()+1)
		n, err := z.ReadAt(p, 0)
		if err != io.EOF && !errors.Is(err, ErrChecksum) && !errors.Is(err, ErrCorrupt) {
			t.Fatalf("mutation %d: ReadAt = %d, %v", i, n, err)
		}
		if err == io.EOF && int64(n) != z.Size() {
			t.Fatalf("mutation %d: ReadAt = %d, %v; size %d", i, n, err, z.Size())
		}
	}
}
