package zfile

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"

	"github.com/obdproject/obd/internal/lz4c"
	"github.com/obdproject/obd/internal/testenv"
)

var lsmtMagic = []byte{0x4C, 0x53, 0x4D, 0x54, 0x00, 0x01, 0x02, 0x00}

func TestFixtureExt4(t *testing.T) {
	zf := ext4Fixture(t)
	sum := sha256.Sum256(zf)
	if got := hex.EncodeToString(sum[:]); got != "c3a417552a6cf9ffa959b541850bab7d7f08f4255425bf8b48c85f7b36b378d9" {
		t.Fatalf("ext4_64 sha256 %s", got)
	}
	z := openBytes(t, zf, true)
	info := z.Info()
	if info.Algorithm != AlgoLZ4 || info.BlockSize != 4096 || !info.Verify || info.Blocks != 132309 ||
		info.OriginalSize != 541937664 || info.Size != 4737695 || info.HeaderOverwrite || info.HasDigest {
		t.Fatalf("info %+v", info)
	}
	// Old writer: garbage above the defined flag bits, digest bit clear.
	if info.HeaderFlags&0x3f != FlagHeader|FlagData || info.HeaderFlags>>6 == 0 {
		t.Errorf("header flags %#x", info.HeaderFlags)
	}
	if info.TrailerFlags&0x3f != FlagData|FlagSealed || info.TrailerFlags>>6 == 0 {
		t.Errorf("trailer flags %#x", info.TrailerFlags)
	}
	if z.Size() != 541937664 {
		t.Errorf("Size %d", z.Size())
	}
	head := make([]byte, 8)
	if n, err := z.ReadAt(head, 0); n != 8 || err != nil || !bytes.Equal(head, lsmtMagic) {
		t.Fatalf("ReadAt(0) = %d, %v, % x", n, err, head)
	}
	if err := z.Check(); err != nil {
		t.Fatal(err)
	}
	// Tail: the last bytes, and io.EOF past the end.
	tail := make([]byte, 8192)
	n, err := z.ReadAt(tail, z.Size()-4096)
	if n != 4096 || err != io.EOF {
		t.Fatalf("ReadAt(tail) = %d, %v", n, err)
	}
	if n, err := z.ReadAt(tail, z.Size()); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt(EOF) = %d, %v", n, err)
	}

	// Our writer reproduces the old writer's blocks and index byte for byte (only the header and
	// trailer differ: the old writer left garbage in them).
	pr, pw := io.Pipe()
	go func() {
		n, err := Decompress(pw, z)
		if err == nil && n != z.Size() {
			err = fmt.Errorf("Decompress wrote %d bytes", n)
		}
		pw.CloseWithError(err)
	}()
	var recompressed bytes.Buffer
	if _, err := Compress(&recompressed, pr, Options{Workers: 2}); err != nil {
		t.Fatal(err)
	}
	out := recompressed.Bytes()
	if len(out) != len(zf) || !bytes.Equal(out[SlotSize:len(out)-SlotSize], zf[SlotSize:len(zf)-SlotSize]) {
		t.Fatalf("recompressed ext4_64 differs (len %d vs %d)", len(out), len(zf))
	}
}

func TestFixtureHelloWorld(t *testing.T) {
	sr := helloFixture(t)
	z, err := Open(sr, helloSize, true)
	if err != nil {
		t.Fatal(err)
	}
	info := z.Info()
	if info.HeaderFlags != 0b11011 || info.TrailerFlags != 0b10110 || !info.HeaderOverwrite || !info.HasDigest ||
		info.Algorithm != AlgoLZ4 || info.BlockSize != 4096 || !info.Verify || info.Blocks != 17463 ||
		info.OriginalSize != 71528448 || info.Size != helloSize {
		t.Fatalf("info %+v", info)
	}
	if err := z.Check(); err != nil {
		t.Fatal(err)
	}
	var raw bytes.Buffer
	if n, err := Decompress(&raw, z); err != nil || n != 71528448 {
		t.Fatalf("Decompress = %d, %v", n, err)
	}
	if !bytes.HasPrefix(raw.Bytes(), lsmtMagic) {
		t.Fatalf("not an LSMT file: % x", raw.Bytes()[:8])
	}
	ok, err := IsZFile(sr)
	if !ok || err != nil {
		t.Fatalf("IsZFile = %v, %v", ok, err)
	}

	// CompressOverwrite is upstream's overlaybd-commit -z: same bytes, header included.
	fix := make([]byte, helloSize)
	if _, err := sr.ReadAt(fix, 0); err != nil {
		t.Fatal(err)
	}
	for _, workers := range []int{1, 3} {
		out := compressBytes(t, raw.Bytes(), Options{Workers: workers}, true)
		if !bytes.Equal(out, fix) {
			t.Fatalf("workers %d: CompressOverwrite output differs from upstream's", workers)
		}
	}
	// Compress differs only in the header.
	out := compressBytes(t, raw.Bytes(), Options{}, false)
	if len(out) != len(fix) || !bytes.Equal(out[SlotSize:], fix[SlotSize:]) {
		t.Fatal("Compress body differs from upstream's")
	}
}

// checkHeaderBytes checks the bytes our writers put in a slot: defined fields, zeros elsewhere.
func checkHeaderBytes(t *testing.T, b []byte, flags uint64, opts Options, s slot) {
	t.Helper()
	le := binary.LittleEndian
	want := make([]byte, SlotSize)
	copy(want, magic[:])
	le.PutUint32(want[24:], 96)
	le.PutUint64(want[32:], flags)
	le.PutUint64(want[40:], s.indexOffset)
	le.PutUint64(want[48:], s.indexSize)
	le.PutUint64(want[56:], s.origSize)
	le.PutUint32(want[64:], s.indexCRC)
	le.PutUint32(want[72:], uint32(opts.BlockSize))
	want[76] = byte(opts.Algorithm)
	if !opts.NoVerify {
		want[88] = 1
	}
	le.PutUint32(want[28:], slotDigest(want))
	if !bytes.Equal(b, want) {
		t.Fatalf("slot flags %#x:\n got % x\nwant % x", flags, b[:96], want[:96])
	}
}

func TestRoundTrip(t *testing.T) {
	type gen struct {
		name string
		f    func(n int, seed uint64) []byte
	}
	gens := []gen{
		{"random", randomData},
		{"zero", func(n int, _ uint64) []byte { return make([]byte, n) }},
		{"text", textData},
		{"mixed", mixedData},
	}
	sizes := []int{0, 1, 4095, 4096, 4097, 65535, 65536, 65537, 200000}
	for _, algo := range []Algorithm{AlgoLZ4, AlgoZSTD} {
		for _, bs := range []int{4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10} {
			for _, g := range gens {
				for i, size := range sizes {
					opts := Options{Algorithm: algo, BlockSize: bs, NoVerify: i%3 == 2}
					name := fmt.Sprintf("%v/%d/%s/%d", algo, bs, g.name, size)
					t.Run(name, func(t *testing.T) {
						roundTrip(t, g.f(size, uint64(i)), opts, i%2 == 1)
					})
				}
			}
		}
	}
	// Multi-MiB inputs with an odd tail.
	for _, algo := range []Algorithm{AlgoLZ4, AlgoZSTD} {
		for _, bs := range []int{4 << 10, 64 << 10} {
			t.Run(fmt.Sprintf("%v/%d/mixed/large", algo, bs), func(t *testing.T) {
				roundTrip(t, mixedData(5<<20+777, 42), Options{Algorithm: algo, BlockSize: bs, Workers: 2}, false)
			})
		}
	}
}

func roundTrip(t *testing.T, src []byte, opts Options, overwrite bool) {
	zf := compressBytes(t, src, opts, overwrite)
	z := openBytes(t, zf, true)
	norm, _ := opts.normalize()
	info := z.Info()
	blocks := (int64(len(src)) + int64(norm.BlockSize) - 1) / int64(norm.BlockSize)
	if info.Algorithm != norm.Algorithm || info.BlockSize != norm.BlockSize || info.Verify == opts.NoVerify ||
		info.OriginalSize != int64(len(src)) || info.Blocks != blocks || !info.HasDigest ||
		info.HeaderOverwrite != overwrite || info.Size != int64(len(zf)) {
		t.Fatalf("info %+v", info)
	}
	// Exact header and trailer bytes.
	tr, err := parseSlot(zf[len(zf)-SlotSize:])
	if err != nil {
		t.Fatal(err)
	}
	checkHeaderBytes(t, zf[len(zf)-SlotSize:], FlagData|FlagSealed|FlagDigest, norm, tr)
	if overwrite {
		checkHeaderBytes(t, zf[:SlotSize], FlagHeader|FlagData|FlagHeaderOverwrite|FlagDigest, norm, tr)
	} else {
		checkHeaderBytes(t, zf[:SlotSize], FlagHeader|FlagData|FlagDigest, norm, slot{})
	}
	if info.IndexOffset+4*info.Blocks != int64(len(zf)-SlotSize) {
		t.Fatalf("index at %d, %d blocks, file %d bytes", info.IndexOffset, info.Blocks, len(zf))
	}

	got := make([]byte, len(src)+10)
	n, err := z.ReadAt(got, 0)
	if n != len(src) || (err != io.EOF && len(src) > 0) || !bytes.Equal(got[:n], src) {
		t.Fatalf("ReadAt(all) = %d, %v; equal %v", n, err, bytes.Equal(got[:n], src))
	}
	var buf bytes.Buffer
	if n, err := Decompress(&buf, z); err != nil || n != int64(len(src)) || !bytes.Equal(buf.Bytes(), src) {
		t.Fatalf("Decompress = %d, %v", n, err)
	}
	if err := z.Check(); err != nil {
		t.Fatal(err)
	}
	ok, err := IsZFile(bytes.NewReader(zf))
	if !ok || err != nil {
		t.Fatalf("IsZFile = %v, %v", ok, err)
	}
}

func TestWorkersIdentical(t *testing.T) {
	src := mixedData(6<<20+4097, 7)
	for _, algo := range []Algorithm{AlgoLZ4, AlgoZSTD} {
		for _, bs := range []int{4 << 10, 32 << 10} {
			opts := Options{Algorithm: algo, BlockSize: bs}
			ref := compressBytes(t, src, opts, false)
			for _, w := range []int{0, 2, 3, 4} {
				opts.Workers = w
				if got := compressBytes(t, src, opts, false); !bytes.Equal(got, ref) {
					t.Fatalf("%v bs %d: workers %d output differs from workers 1", algo, bs, w)
				}
				if got := compressBytes(t, src, opts, true); !bytes.Equal(got[SlotSize:], ref[SlotSize:]) {
					t.Fatalf("%v bs %d: workers %d overwrite body differs", algo, bs, w)
				}
			}
		}
	}
}

func TestReadAtRandom(t *testing.T) {
	src := mixedData(3<<20+1234, 9)
	for _, algo := range []Algorithm{AlgoLZ4, AlgoZSTD} {
		for _, bs := range []int{4 << 10, 16 << 10, 64 << 10} {
			zf := compressBytes(t, src, Options{Algorithm: algo, BlockSize: bs, Workers: 2}, bs == 16<<10)
			z := openBytes(t, zf, true)
			r := rand.New(rand.NewPCG(uint64(bs), uint64(algo)))
			for range 300 {
				off := r.Int64N(int64(len(src)) + 100)
				var l int
				switch r.IntN(4) {
				case 0:
					l = r.IntN(64)
				case 1:
					l = r.IntN(3 * bs)
				case 2:
					l = r.IntN(3 << 20)
				default:
					off &^= int64(bs - 1)
					l = bs
				}
				p := make([]byte, l)
				n, err := z.ReadAt(p, off)
				want := src[min(off, int64(len(src))):min(off+int64(l), int64(len(src)))]
				if n != len(want) || !bytes.Equal(p[:n], want) {
					t.Fatalf("%v bs %d ReadAt(%d, %d) = %d, %v; want %d bytes", algo, bs, l, off, n, err, len(want))
				}
				if (n < l) != (err == io.EOF) || (err != nil && err != io.EOF) {
					t.Fatalf("ReadAt(%d, %d) = %d, %v", l, off, n, err)
				}
			}
			if _, err := z.ReadAt(make([]byte, 1), -1); err == nil {
				t.Fatal("negative offset accepted")
			}
		}
	}
}

func TestConcurrentReadAt(t *testing.T) {
	src := mixedData(2<<20, 11)
	for _, algo := range []Algorithm{AlgoLZ4, AlgoZSTD} {
		z := openBytes(t, compressBytes(t, src, Options{Algorithm: algo}, false), true)
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for g := range 8 {
			wg.Go(func() {
				r := rand.New(rand.NewPCG(uint64(g), 5))
				for range 200 {
					off, l := r.Int64N(int64(len(src))), 1+r.IntN(50000)
					p := make([]byte, l)
					n, _ := z.ReadAt(p, off)
					if !bytes.Equal(p[:n], src[off:min(off+int64(l), int64(len(src)))]) {
						errs <- fmt.Errorf("ReadAt(%d, %d) wrong data", l, off)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
}

// recordOffset returns the offset and length of block i's record in zf.
func recordOffset(t *testing.T, zf []byte, i int) (int, int) {
	t.Helper()
	tr, err := parseSlot(zf[len(zf)-SlotSize:])
	if err != nil {
		t.Fatal(err)
	}
	off := SlotSize
	for k := 0; k < i; k++ {
		off += int(binary.LittleEndian.Uint32(zf[int(tr.indexOffset)+4*k:]))
	}
	return off, int(binary.LittleEndian.Uint32(zf[int(tr.indexOffset)+4*i:]))
}

func TestCorruptBlock(t *testing.T) {
	src := mixedData(1<<20, 3)
	for _, algo := range []Algorithm{AlgoLZ4, AlgoZSTD} {
		zf := compressBytes(t, src, Options{Algorithm: algo}, false)
		for _, blk := range []int{0, 123, 255} {
			for _, where := range []string{"data", "crc"} {
				bad := bytes.Clone(zf)
				off, l := recordOffset(t, bad, blk)
				pos := off + l/3
				if where == "crc" {
					pos = off + l - 2
				}
				bad[pos] ^= 0x40
				z := openBytes(t, bad, true)
				// A read of many blocks including the bad one.
				_, err := z.ReadAt(make([]byte, 300<<10), int64(max(blk-20, 0))*4096)
				var be *BlockError
				if !errors.Is(err, ErrChecksum) || !errors.As(err, &be) || be.Block != int64(blk) || be.Offset != int64(off) {
					t.Fatalf("%v block %d %s: ReadAt err %v", algo, blk, where, err)
				}
				if want := fmt.Sprintf("zfile: block %d: CRC mismatch", blk); !strings.HasPrefix(err.Error(), want) {
					t.Errorf("error %q, want prefix %q", err, want)
				}
				if err := z.Check(); !errors.Is(err, ErrChecksum) || !strings.Contains(err.Error(), fmt.Sprintf("block %d:", blk)) {
					t.Fatalf("Check: %v", err)
				}
				// Unverified reads never panic, and the other blocks read fine.
				nz := openBytes(t, bad, false)
				p := make([]byte, 4096)
				if _, err := nz.ReadAt(p, int64(blk)*4096); err != nil && !errors.Is(err, ErrCorrupt) {
					t.Fatalf("unverified ReadAt: %v", err)
				}
				other := (blk ^ 1) * 4096
				if n, err := nz.ReadAt(p, int64(other)); n != 4096 || err != nil || !bytes.Equal(p, src[other:other+4096]) {
					t.Fatalf("neighbour block: %d, %v", n, err)
				}
			}
		}
	}
}

// setSlot rewrites a field of the slot at off, then its digest.
func setSlot(b []byte, off int, edit func(s []byte)) {
	s := b[off : off+SlotSize]
	edit(s)
	binary.LittleEndian.PutUint32(s[offDigest:], slotDigest(s))
}

func TestCorruptStructure(t *testing.T) {
	src := mixedData(300000, 5)
	good := compressBytes(t, src, Options{}, false)
	goodOW := compressBytes(t, src, Options{}, true)
	tail := len(good) - SlotSize
	indexOff := int(binary.LittleEndian.Uint64(good[tail+offIndexOffset:]))
	le := binary.LittleEndian
	cases := []struct {
		name string
		base []byte
		edit func(b []byte) []byte
		kind error
		msg  string
	}{
		{"bad magic", good, func(b []byte) []byte { b[3] = 'x'; return b }, ErrFormat, "zfile: bad magic"},
		{"header digest", good, func(b []byte) []byte { b[100] = 1; return b }, ErrChecksum, "zfile: header digest mismatch"},
		{"trailer digest", good, func(b []byte) []byte { b[tail+200] = 1; return b }, ErrChecksum, "zfile: trailer digest mismatch"},
		{"overwrite header digest", goodOW, func(b []byte) []byte { b[offIndexSize] ^= 1; return b }, ErrChecksum, "zfile: header digest mismatch"},
		{"index crc", good, func(b []byte) []byte { b[indexOff+5] ^= 1; return b }, ErrChecksum, "zfile: index CRC mismatch"},
		{"not a header", good, func(b []byte) []byte {
			setSlot(b, 0, func(s []byte) { s[offFlags] &^= 1 })
			return b
		}, ErrFormat, "zfile: header slot has the trailer flag"},
		{"trailer not sealed", good, func(b []byte) []byte {
			setSlot(b, tail, func(s []byte) { s[offFlags] &^= byte(FlagSealed) })
			return b
		}, ErrFormat, "zfile: trailer flags"},
		{"trailer bad magic", good, func(b []byte) []byte { b[tail] = 0; return b }, ErrFormat, "zfile: trailer: bad magic"},
		{"truncated", good, func(b []byte) []byte { return b[:len(b)-100] }, ErrFormat, ""},
		{"tiny", good, func(b []byte) []byte { return b[:100] }, ErrFormat, "zfile: file too small"},
		{"index_size too large", good, func(b []byte) []byte {
			setSlot(b, tail, func(s []byte) { le.PutUint64(s[offIndexSize:], 5e9) })
			return b
		}, ErrFormat, "zfile: index_size 5000000000 exceeds"},
		{"index beyond trailer", goodOW, func(b []byte) []byte {
			setSlot(b, 0, func(s []byte) { le.PutUint64(s[offIndexSize:], le.Uint64(s[offIndexSize:])+5) })
			return b
		}, ErrFormat, "does not fit before trailer"},
		{"original size", goodOW, func(b []byte) []byte {
			setSlot(b, 0, func(s []byte) { le.PutUint64(s[offOrigSize:], 1<<40) })
			return b
		}, ErrFormat, "does not match original_file_size"},
		{"block size", goodOW, func(b []byte) []byte {
			setSlot(b, 0, func(s []byte) { le.PutUint32(s[offBlockSize:], 3000) })
			return b
		}, ErrFormat, "zfile: block_size 3000"},
		{"mini_lzo", goodOW, func(b []byte) []byte {
			setSlot(b, 0, func(s []byte) { s[offAlgo] = 0 })
			return b
		}, ErrUnsupported, "zfile: algorithm mini_lzo not supported"},
		{"unknown algo", goodOW, func(b []byte) []byte {
			setSlot(b, 0, func(s []byte) { s[offAlgo] = 9 })
			return b
		}, ErrUnsupported, "zfile: algorithm algo(9) not supported"},
		{"index entry zero", goodOW, func(b []byte) []byte {
			setSlot(b, 0, func(s []byte) { s[offFlags] &^= byte(FlagDigest) })
			le.PutUint32(b[indexOff+8:], 4)
			return b
		}, ErrFormat, "zfile: block 2: index: record length 4 out of range"},
		{"index group overflow", goodOW, func(b []byte) []byte {
			setSlot(b, 0, func(s []byte) { s[offFlags] &^= byte(FlagDigest) })
			for i := range 9 {
				le.PutUint32(b[indexOff+4*i:], 8000)
			}
			return b
		}, ErrFormat, "zfile: block 8: index: records of one 64 KiB group exceed 65535 bytes"},
		{"index sum", goodOW, func(b []byte) []byte {
			setSlot(b, 0, func(s []byte) { s[offFlags] &^= byte(FlagDigest) })
			le.PutUint32(b[indexOff+8:], le.Uint32(b[indexOff+8:])-1)
			return b
		}, ErrFormat, "compressed blocks end at"},
		{"dict size", goodOW, func(b []byte) []byte {
			setSlot(b, 0, func(s []byte) { le.PutUint32(s[offDictSize:], 1<<30) })
			return b
		}, ErrFormat, "does not fit before trailer"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := c.edit(bytes.Clone(c.base))
			_, err := Open(bytes.NewReader(b), int64(len(b)), true)
			if !errors.Is(err, c.kind) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("Open error %v, want %v containing %q", err, c.kind, c.msg)
			}
		})
	}
	// Read errors of the underlying reader are passed on.
	_, err := Open(errReaderAt{}, 4096, true)
	if !errors.Is(err, errTest) {
		t.Fatalf("Open error %v", err)
	}
}

var errTest = errors.New("test read error")

type errReaderAt struct{}

func (errReaderAt) ReadAt([]byte, int64) (int, error) { return 0, errTest }

func TestReadError(t *testing.T) {
	src := textData(1<<20, 1)
	zf := compressBytes(t, src, Options{}, false)
	// Fail reads of the data area after Open.
	r := &failingReader{data: zf, failFrom: SlotSize, failTo: len(zf) - SlotSize - 4*256}
	z, err := Open(r, int64(len(zf)), true)
	if err != nil {
		t.Fatal(err)
	}
	r.on = true
	if _, err := z.ReadAt(make([]byte, 10), 5000); !errors.Is(err, errTest) {
		t.Fatalf("ReadAt error %v", err)
	}
	// A file truncated after Open reads as io.ErrUnexpectedEOF.
	r.on, r.data = false, zf[:2000]
	if _, err := z.ReadAt(make([]byte, 100000), 0); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("ReadAt error %v", err)
	}
}

type failingReader struct {
	data             []byte
	on               bool
	failFrom, failTo int
}

func (f *failingReader) ReadAt(p []byte, off int64) (int, error) {
	if f.on && int(off) < f.failTo && int(off)+len(p) > f.failFrom {
		return 0, errTest
	}
	return bytes.NewReader(f.data).ReadAt(p, off)
}

func TestIsZFile(t *testing.T) {
	zf := compressBytes(t, nil, Options{}, false)
	cases := []struct {
		data []byte
		want bool
	}{
		{nil, false},
		{zf[:23], false},
		{zf[:24], true},
		{zf, true},
		{append([]byte{'x'}, zf[1:]...), false},
		{bytes.Repeat([]byte{0}, 1024), false},
	}
	for i, c := range cases {
		if got, err := IsZFile(bytes.NewReader(c.data)); got != c.want || err != nil {
			t.Errorf("case %d: IsZFile = %v, %v", i, got, err)
		}
	}
	if _, err := IsZFile(errReaderAt{}); !errors.Is(err, errTest) {
		t.Errorf("IsZFile error %v", err)
	}
}

func TestOptions(t *testing.T) {
	for _, opts := range []Options{{BlockSize: 1000}, {BlockSize: 2048}, {BlockSize: 128 << 10}, {Algorithm: 3}} {
		if _, err := Compress(io.Discard, bytes.NewReader([]byte("x")), opts); err == nil {
			t.Errorf("Compress(%+v) accepted", opts)
		}
	}
	if s := AlgoLZ4.String() + AlgoZSTD.String() + AlgoMiniLZO.String() + Algorithm(7).String(); s != "lz4zstdmini_lzoalgo(7)" {
		t.Errorf("String() = %q", s)
	}
}

type errWriter struct{ n int }

func (w *errWriter) Write(p []byte) (int, error) {
	if w.n < len(p) {
		return 0, errTest
	}
	w.n -= len(p)
	return len(p), nil
}

func (w *errWriter) WriteAt(p []byte, _ int64) (int, error) { return w.Write(p) }

type errReader struct{ n int }

func (r *errReader) Read(p []byte) (int, error) {
	if r.n <= 0 {
		return 0, errTest
	}
	n := min(len(p), r.n)
	r.n -= n
	return n, nil
}

func TestWriteErrors(t *testing.T) {
	src := randomData(5<<20, 1)
	for _, workers := range []int{1, 4} {
		for _, limit := range []int{0, 600, 3 << 20, len(src)} {
			if _, err := Compress(&errWriter{n: limit}, bytes.NewReader(src), Options{Workers: workers}); !errors.Is(err, errTest) {
				t.Errorf("workers %d limit %d: Compress error %v", workers, limit, err)
			}
		}
		if _, err := Compress(io.Discard, &errReader{n: 3<<20 + 5}, Options{Workers: workers}); !errors.Is(err, errTest) {
			t.Errorf("workers %d: read error %v", workers, err)
		}
		w := &errWriter{n: 1 << 30}
		n, err := CompressOverwrite(w, bytes.NewReader(src[:10000]), Options{Workers: workers})
		if err != nil {
			t.Fatal(err)
		}
		w.n = 0
		if _, err := CompressOverwrite(w, bytes.NewReader(src[:10000]), Options{Workers: workers}); !errors.Is(err, errTest) {
			t.Errorf("CompressOverwrite error %v (size %d)", err, n)
		}
	}
}

// countingReader counts and records the underlying reads.
type countingReader struct {
	r     io.ReaderAt
	mu    sync.Mutex
	sizes []int
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	c.sizes = append(c.sizes, len(p))
	c.mu.Unlock()
	return c.r.ReadAt(p, off)
}

func (c *countingReader) take() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.sizes
	c.sizes = nil
	return s
}

func TestUnderlyingReads(t *testing.T) {
	src := append(textData(4<<20, 1), randomData(4<<20, 2)...)
	for _, overwrite := range []bool{false, true} {
		zf := compressBytes(t, src, Options{}, overwrite)
		c := &countingReader{r: bytes.NewReader(zf)}
		z, err := Open(c, int64(len(zf)), true)
		if err != nil {
			t.Fatal(err)
		}
		// Header, trailer, index; header-overwrite files: header, then index and trailer together.
		if got, want := len(c.take()), map[bool]int{false: 3, true: 2}[overwrite]; got != want {
			t.Errorf("overwrite %v: Open made %d reads, want %d", overwrite, got, want)
		}
		if overwrite && z.Info().TrailerFlags != FlagData|FlagSealed|FlagDigest {
			t.Errorf("trailer flags %#x", z.Info().TrailerFlags)
		}
		// 64 compressible blocks: one read.
		p := make([]byte, 256<<10)
		if _, err := z.ReadAt(p, 12345); err != nil {
			t.Fatal(err)
		}
		if got := c.take(); len(got) != 1 {
			t.Errorf("256 KiB read made reads %v", got)
		}
		// 4 MiB of incompressible data: chunks of at most 1 MiB.
		p = make([]byte, 4<<20)
		if _, err := z.ReadAt(p, 4<<20); err != nil || !bytes.Equal(p, src[4<<20:]) {
			t.Fatal(err)
		}
		got := c.take()
		total := 0
		for _, n := range got {
			if n > chunkSize {
				t.Errorf("read of %d bytes", n)
			}
			total += n
		}
		if len(got) != (total+chunkSize-1)/chunkSize {
			t.Errorf("4 MiB read made reads %v", got)
		}
	}
}

// TestZstdFrames checks that zstd blocks are frames like upstream's ZSTD_compress writes: single
// segment with the content size, no checksum.
func TestZstdFrames(t *testing.T) {
	src := mixedData(100000, 8)
	zf := compressBytes(t, src, Options{Algorithm: AlgoZSTD}, false)
	for i := range 25 {
		off, _ := recordOffset(t, zf, i)
		if m := binary.LittleEndian.Uint32(zf[off:]); m != 0xFD2FB528 {
			t.Fatalf("block %d: magic %#x", i, m)
		}
		fhd := zf[off+4]
		if fhd&0x20 == 0 || fhd&0x04 != 0 {
			t.Fatalf("block %d: frame header descriptor %#x", i, fhd)
		}
	}
}

// TestRoundTripProperty round-trips random data of random sizes with random options.
func TestRoundTripProperty(t *testing.T) {
	r := rand.New(rand.NewPCG(17, 18))
	for i := range 40 {
		opts := Options{
			Algorithm: []Algorithm{AlgoLZ4, AlgoZSTD}[r.IntN(2)],
			BlockSize: 4096 << r.IntN(5),
			Workers:   r.IntN(4),
			NoVerify:  r.IntN(3) == 0,
		}
		size := r.IntN(1 << 20)
		if r.IntN(4) == 0 {
			size = (r.IntN(64) + 1) * opts.BlockSize
		}
		t.Run(fmt.Sprintf("%d/%+v/%d", i, opts, size), func(t *testing.T) {
			roundTrip(t, mixedData(size, uint64(i)), opts, r.IntN(2) == 0)
		})
	}
}

func TestReadIndexChunks(t *testing.T) {
	data := randomData(3*indexChunk+12345, 4)
	c := &countingReader{r: bytes.NewReader(data)}
	got, err := readIndex(c, 100, int64(len(data)-200))
	if err != nil || !bytes.Equal(got, data[100:len(data)-100]) {
		t.Fatalf("readIndex: %v", err)
	}
	if n := len(c.take()); n != 4 {
		t.Errorf("%d reads, want 4", n)
	}
	f := &failingReader{data: data, on: true, failFrom: 2 * indexChunk, failTo: 2*indexChunk + 1}
	if _, err := readIndex(f, 0, int64(len(data))); !errors.Is(err, errTest) {
		t.Fatalf("readIndex error %v", err)
	}
}

// A ZFile compressed with the system's liblz4 (Options.LZ4Batch) has the same bytes as one compressed in Go, so
// digests do not depend on the machine.
func TestLZ4BatchSameBytes(t *testing.T) {
	if !lz4c.Available() {
		testenv.Skip(t, "liblz4.so.1 is not installed")
	}
	data := mixedData(3<<20+123, 7)
	for _, bs := range []int{4 << 10, 16 << 10, 64 << 10} {
		for _, noVerify := range []bool{false, true} {
			var goOut, cOut bytes.Buffer
			opts := Options{BlockSize: bs, NoVerify: noVerify, Workers: 2}
			if _, err := Compress(&goOut, bytes.NewReader(data), opts); err != nil {
				t.Fatal(err)
			}
			opts.LZ4Batch = lz4c.Batch
			if _, err := Compress(&cOut, bytes.NewReader(data), opts); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(goOut.Bytes(), cOut.Bytes()) {
				t.Fatalf("block size %d, no CRC %v: liblz4 and Go give different ZFiles", bs, noVerify)
			}
		}
	}
}

func TestCompressedRange(t *testing.T) {
	data := mixedData(1<<20+5000, 3)
	var buf bytes.Buffer
	if _, err := Compress(&buf, bytes.NewReader(data), Options{BlockSize: 8192}); err != nil {
		t.Fatal(err)
	}
	z, err := Open(bytes.NewReader(buf.Bytes()), int64(buf.Len()), true)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range [][2]int64{{0, 1}, {8191, 2}, {100000, 300000}, {int64(len(data)) - 10, 100}, {0, int64(len(data))}} {
		off, n := z.CompressedRange(c[0], c[1])
		// Besides the header, index and trailer, only the returned range is there: the rest of the file is zeros.
		only := make([]byte, buf.Len())
		copy(only[off:off+n], buf.Bytes()[off:off+n])
		copy(only[:SlotSize], buf.Bytes()[:SlotSize])
		copy(only[z.Info().IndexOffset:], buf.Bytes()[z.Info().IndexOffset:])
		zo, err := Open(bytes.NewReader(only), int64(len(only)), true)
		if err != nil {
			t.Fatal(err)
		}
		want := data[c[0]:min(int64(len(data)), c[0]+c[1])]
		got := make([]byte, len(want))
		if _, err := zo.ReadAt(got, c[0]); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("range %v: compressed range %d+%d does not hold its blocks: %v", c, off, n, err)
		}
		if n > int64(len(want))+2*int64(maxRecord(8192)) {
			t.Fatalf("range %v: compressed range %d bytes is too large", c, n)
		}
	}
	if _, n := z.CompressedRange(int64(len(data)), 10); n != 0 {
		t.Fatalf("range past the end: %d bytes", n)
	}
}

// The pieces of a block that reads use only part of are decoded once while the block is among the last ones
// decoded so: a piece read after the block's bytes went bad still comes from the first decoding, until enough
// other blocks were decoded after it.
func TestPartialReadsDecodeOnce(t *testing.T) {
	src := randomData(4<<20, 9)
	zf := compressBytes(t, src, Options{Algorithm: AlgoZSTD, BlockSize: 64 << 10}, false)
	z := openBytes(t, zf, false)
	const bs, blk = 64 << 10, 3
	piece := func(b, off, n int) []byte {
		t.Helper()
		p := make([]byte, n)
		if _, err := z.ReadAt(p, int64(b*bs+off)); err != nil && !errors.Is(err, ErrCorrupt) {
			t.Fatal(err)
		}
		return p
	}
	if p := piece(blk, 100, 1024); !bytes.Equal(p, src[blk*bs+100:][:1024]) {
		t.Fatal("first piece differs")
	}
	off, l := recordOffset(t, zf, blk)
	for i := off; i < off+l-4; i++ {
		zf[i] ^= 0x55 // the reader reads these bytes again for every read of the block
	}
	if p := piece(blk, 5000, 2048); !bytes.Equal(p, src[blk*bs+5000:][:2048]) {
		t.Fatal("a second piece of the block was decoded again from its damaged bytes")
	}
	for b := 10; b < 10+blockCacheSlots; b++ {
		piece(b, 1, 10)
	}
	if p := piece(blk, 5000, 2048); bytes.Equal(p, src[blk*bs+5000:][:2048]) {
		t.Fatal("the block stayed decoded after more blocks than the cache holds")
	}
}
