package zfile

import (
	"encoding/binary"
	"fmt"
	"io"
	"sync"

	"github.com/pierrec/lz4/v4"

	"github.com/obdproject/obd/internal/iocount"
)

// batchSize is the uncompressed size handed to a worker at a time (and written with one Write).
const batchSize = 1 << 20

// Options configures Compress and CompressOverwrite. The zero value gives upstream's defaults:
// LZ4, 4 KiB blocks, a CRC after each block, one goroutine.
type Options struct {
	// Algorithm is AlgoLZ4 (default when zero) or AlgoZSTD.
	Algorithm Algorithm
	// BlockSize is the uncompressed block size: 4, 8, 16, 32 or 64 KiB (default 4 KiB).
	BlockSize int
	// Workers is the number of compressing goroutines; <= 1 compresses in the calling goroutine.
	// The output is byte-identical for any value.
	Workers int
	// NoVerify omits the CRC32C written after each compressed block.
	NoVerify bool
	// LZ4Batch, if set, compresses a batch of LZ4 blocks faster than the Go compressor, with the same bytes (the
	// converter uses package internal/lz4c, the system's liblz4): raw is cut into blocks of bs bytes, compressed
	// one after another into dst[:cap(dst)] with gap bytes left after each, lens[i] set to the compressed size of
	// block i; it returns the bytes used, or false to let the Go compressor do the batch.
	LZ4Batch func(raw []byte, bs int, dst []byte, gap int, lens []int32) (int, bool)
}

// Validate reports whether a compressor accepts o: a supported algorithm and block size.
func (o Options) Validate() error {
	_, err := o.normalize()
	return err
}

// normalize fills in defaults and validates o.
func (o Options) normalize() (Options, error) {
	if o.Algorithm == AlgoMiniLZO {
		o.Algorithm = AlgoLZ4
	}
	if o.Algorithm != AlgoLZ4 && o.Algorithm != AlgoZSTD {
		return o, errorf(ErrUnsupported, "algorithm %v not supported", o.Algorithm)
	}
	if o.BlockSize == 0 {
		o.BlockSize = 4096
	}
	switch o.BlockSize {
	case 4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10:
	default:
		return o, errorf(ErrUnsupported, "block size %d not supported (want 4, 8, 16, 32 or 64 KiB)", o.BlockSize)
	}
	o.Workers = max(o.Workers, 1)
	return o, nil
}

// Compress writes a complete ZFile of src to w, like upstream's overlaybd-zfile: a header
// (flags header|data|digest, index fields zero), the blocks, the index and the trailer
// (flags data|sealed|digest). It returns the number of bytes written.
func Compress(w io.Writer, src io.Reader, opts Options) (int64, error) {
	n, _, err := compress(w, src, opts)
	return n, err
}

// CompressOverwrite is like Compress but, like upstream's overlaybd-commit -z (the streaming builder
// with overwrite_header), it then rewrites the header at offset 0 with the trailer's fields and flags
// header|data|overwrite|digest, so that readers need not read the trailer. The file is written
// sequentially from offset 0 with WriteAt, then the header again; an *os.File works. It returns the
// size of the ZFile.
func CompressOverwrite(w io.WriterAt, src io.Reader, opts Options) (int64, error) {
	n, trailer, err := compress(io.NewOffsetWriter(w, 0), src, opts)
	if err != nil {
		return n, err
	}
	trailer.flags = FlagHeader | FlagData | FlagHeaderOverwrite | FlagDigest
	if _, err := w.WriteAt(trailer.marshal(), 0); err != nil {
		return n, fmt.Errorf("zfile: overwrite header: %w", err)
	}
	return n, nil
}

// job is a batch of blocks to compress.
type job struct {
	raw   []byte   // uncompressed input (a whole number of blocks, except at the end)
	out   []byte   // compressed records
	lens  []uint32 // record length of each block
	clens []int32  // compressed length of each block (liblz4)
	done  chan struct{}
}

// compress writes header, blocks, index and trailer to w and returns the byte count and the trailer.
func compress(w io.Writer, src io.Reader, opts Options) (int64, slot, error) {
	opts, err := opts.normalize()
	if err != nil {
		return 0, slot{}, err
	}
	cw := &iocount.Writer{W: w}
	write := func(p []byte, what string) error {
		n, err := cw.Write(p)
		if err == nil && n < len(p) {
			err = io.ErrShortWrite
		}
		if err != nil {
			return fmt.Errorf("zfile: write %s: %w", what, err)
		}
		return nil
	}
	s := slot{
		flags:     FlagHeader | FlagData | FlagDigest,
		blockSize: uint32(opts.BlockSize),
		algo:      opts.Algorithm,
		verify:    !opts.NoVerify,
	}
	if err := write(s.marshal(), "header"); err != nil {
		return cw.N, s, err
	}
	var index []byte
	var orig uint64
	if err := compressBlocks(opts, src, func(j *job) error {
		orig += uint64(len(j.raw))
		for _, l := range j.lens {
			index = binary.LittleEndian.AppendUint32(index, l)
		}
		if uint64(len(index)/4) > maxIndexSize {
			return fmt.Errorf("zfile: input too large: more than %d blocks", maxIndexSize)
		}
		return write(j.out, "blocks")
	}); err != nil {
		return cw.N, s, err
	}
	s.indexOffset = uint64(cw.N)
	s.indexSize = uint64(len(index) / 4)
	s.origSize = orig
	s.indexCRC = crc32c(0, index)
	if err := write(index, "index"); err != nil {
		return cw.N, s, err
	}
	s.flags = FlagData | FlagSealed | FlagDigest
	err = write(s.marshal(), "trailer")
	return cw.N, s, err
}

// compressBlocks reads src in batches, compresses them (in parallel when opts.Workers > 1) and
// calls emit for each batch in input order.
func compressBlocks(opts Options, src io.Reader, emit func(*job) error) error {
	bs := opts.BlockSize
	perBatch := batchSize / bs
	proto := blockEncoder{algo: opts.Algorithm}
	if opts.Algorithm == AlgoZSTD {
		enc, err := newZstdEncoder(opts.Workers)
		if err != nil {
			return fmt.Errorf("zfile: zstd: %w", err)
		}
		defer enc.Close()
		proto.zstd = enc
	}
	// newEncoder returns an encoder for one goroutine (LZ4 state is per goroutine, zstd's shared).
	newEncoder := func() *blockEncoder {
		e := proto
		if e.algo == AlgoLZ4 {
			e.lz4 = new(lz4.CompressorCCompat)
		}
		return &e
	}
	ring := make([]*job, 1)
	if opts.Workers > 1 {
		ring = make([]*job, 2*opts.Workers)
	}
	for i := range ring {
		ring[i] = &job{
			raw:   make([]byte, perBatch*bs),
			out:   make([]byte, 0, perBatch*maxRecord(bs)),
			lens:  make([]uint32, 0, perBatch),
			clens: make([]int32, perBatch),
			done:  make(chan struct{}, 1),
		}
	}
	withCRC := !opts.NoVerify
	gap := 0
	if withCRC {
		gap = crcSize
	}
	run := func(e *blockEncoder, j *job) {
		j.out, j.lens = j.out[:0], j.lens[:0]
		if e.algo == AlgoLZ4 && opts.LZ4Batch != nil {
			if n, ok := opts.LZ4Batch(j.raw, bs, j.out, gap, j.clens[:cap(j.clens)]); ok {
				// liblz4 compressed every block, leaving room for the CRCs.
				j.out = j.out[:n]
				pos := 0
				for _, c := range j.clens[:(len(j.raw)+bs-1)/bs] {
					if withCRC {
						binary.LittleEndian.PutUint32(j.out[pos+int(c):], crc32c(blockCRCSeed, j.out[pos:pos+int(c)]))
					}
					j.lens = append(j.lens, uint32(int(c)+gap))
					pos += int(c) + gap
				}
				return
			}
		}
		for p := 0; p < len(j.raw); p += bs {
			n := len(j.out)
			j.out = e.appendBlock(j.out, j.raw[p:min(p+bs, len(j.raw))], withCRC)
			j.lens = append(j.lens, uint32(len(j.out)-n))
		}
	}
	read := func(j *job) (bool, error) {
		n, err := io.ReadFull(src, j.raw[:cap(j.raw)])
		j.raw = j.raw[:n]
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return n > 0, nil
		}
		if err != nil {
			return false, fmt.Errorf("zfile: read input: %w", err)
		}
		return true, nil
	}

	if opts.Workers <= 1 {
		e := newEncoder()
		j := ring[0]
		for {
			ok, err := read(j)
			if err != nil || !ok {
				return err
			}
			run(e, j)
			if err := emit(j); err != nil {
				return err
			}
		}
	}

	work := make(chan *job, len(ring))
	var wg sync.WaitGroup
	for range opts.Workers {
		e := newEncoder()
		wg.Go(func() {
			for j := range work {
				run(e, j)
				j.done <- struct{}{}
			}
		})
	}
	defer func() {
		close(work)
		wg.Wait()
	}()
	// Jobs are issued round-robin over the ring; job seq is emitted (in order) before its slot is
	// reused for job seq+len(ring). After an error, finished jobs are only drained.
	var inFlight, seq int
	var ferr error
	flush := func() {
		j := ring[(seq-inFlight)%len(ring)]
		<-j.done
		inFlight--
		if ferr == nil {
			ferr = emit(j)
		}
	}
	for ferr == nil {
		if inFlight == len(ring) {
			if flush(); ferr != nil {
				break
			}
		}
		j := ring[seq%len(ring)]
		ok, err := read(j)
		if err != nil || !ok {
			ferr = err
			break
		}
		work <- j
		seq++
		inFlight++
	}
	for inFlight > 0 {
		flush()
	}
	return ferr
}
