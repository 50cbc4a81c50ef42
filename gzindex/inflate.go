package gzindex

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// inflater decodes a raw deflate stream (RFC 1951) that may start at any bit of its first byte, with a preset
// window: what resuming at a gzip index checkpoint takes. Go's compress/flate can only start at a byte boundary, and
// shifting the bytes to make one breaks at the first stored block, which is aligned to the blob's bytes; this
// decoder keeps the blob's alignment because its bit buffer is fed whole bytes of the blob.
type inflater struct {
	src   io.Reader
	in    []byte // input read from src, not yet in the bit buffer: in[ipos:]
	ipos  int
	bits  uint64 // bit buffer, least significant bit first
	nbits uint
	eof   bool // src is exhausted: in and the bit buffer hold what is left

	hist [WindowSize]byte // the last WindowSize bytes of output, circular
	hpos int              // where the next output byte goes in hist

	state      int // stHeader, stStored, stHuffman, stDone
	final      bool
	storedLeft int
	lit, dist  *huffTable // the block's codes: fixedLit/fixedDist or the dynamic ones below
	dynLit     huffTable
	dynDist    huffTable
	clen       huffTable
	// a match being copied
	copyLen, copyDist int
}

const (
	stHeader = iota
	stStored
	stHuffman
	stDone
)

var errCorrupt = errors.New("corrupt deflate stream")

// newInflater starts inflating src at a checkpoint: the first bits of the stream are the top bits of first (none
// when bits is 0), then src's bytes; window is the output before the checkpoint.
func newInflater(src io.Reader, window []byte, bits uint8, first byte) *inflater {
	in := &inflater{src: src, in: make([]byte, 0, inChunk)}
	if bits > 0 {
		in.bits, in.nbits = uint64(first>>(8-bits)), uint(bits)
	}
	copy(in.hist[WindowSize-len(window):], window)
	return in
}

// need makes n bits available (n ≤ 56); it fails only if the stream ends before them.
func (in *inflater) need(n uint) error {
	for in.nbits < n {
		if len(in.in)-in.ipos >= 8 {
			// Whole bytes, as many as fit.
			v := binary.LittleEndian.Uint64(in.in[in.ipos:])
			k := (63 - in.nbits) / 8
			in.bits |= (v & (1<<(8*k) - 1)) << in.nbits
			in.nbits += 8 * k
			in.ipos += int(k)
			continue
		}
		if in.ipos < len(in.in) {
			in.bits |= uint64(in.in[in.ipos]) << in.nbits
			in.nbits += 8
			in.ipos++
			continue
		}
		if err := in.refill(); err != nil {
			return err
		}
	}
	return nil
}

// refill reads the next chunk of input.
func (in *inflater) refill() error {
	if in.eof {
		return io.ErrUnexpectedEOF
	}
	n, err := io.ReadFull(in.src, in.in[:cap(in.in)])
	in.in, in.ipos = in.in[:n], 0
	switch {
	case err == io.EOF || err == io.ErrUnexpectedEOF:
		in.eof = true
		if n == 0 {
			return io.ErrUnexpectedEOF
		}
	case err != nil:
		return err
	}
	return nil
}

// take consumes n bits (n ≤ 57).
func (in *inflater) take(n uint) (uint32, error) {
	if err := in.need(n); err != nil {
		return 0, err
	}
	v := uint32(in.bits & (1<<n - 1))
	in.bits >>= n
	in.nbits -= n
	return v, nil
}

func (in *inflater) put(p []byte, n int, b byte) {
	p[n] = b
	in.hist[in.hpos] = b
	in.hpos = (in.hpos + 1) & (WindowSize - 1)
}

// Read returns the inflated stream; io.EOF after the final block.
func (in *inflater) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		switch in.state {
		case stDone:
			if n > 0 {
				return n, nil
			}
			return 0, io.EOF
		case stHeader:
			if err := in.header(); err != nil {
				return n, err
			}
		case stStored:
			if in.storedLeft == 0 {
				in.endBlock()
				continue
			}
			// Whole bytes still in the bit buffer come first.
			if err := in.need(8); err != nil {
				return n, err
			}
			in.put(p, n, byte(in.bits))
			in.bits >>= 8
			in.nbits -= 8
			n++
			in.storedLeft--
		case stHuffman:
			if in.copyLen > 0 {
				n += in.copyMatch(p[n:])
				continue
			}
			var err error
			if n, err = in.literals(p, n); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// literals decodes symbols into p from n on while they are literals, and the first other one (end of block or a
// match, which it sets up); it returns the new n.
func (in *inflater) literals(p []byte, n int) (int, error) {
	lit := in.lit
	mask := uint64(1)<<lit.bits - 1
	for n < len(p) {
		if in.nbits < lit.bits {
			if err := in.need(lit.bits); err != nil && err != io.ErrUnexpectedEOF {
				return n, err
			}
		}
		e := lit.t[in.bits&mask]
		l := uint(e & 15)
		if l == 0 {
			return n, fmt.Errorf("%w: invalid Huffman code", errCorrupt)
		}
		if l > in.nbits {
			return n, io.ErrUnexpectedEOF
		}
		in.bits >>= l
		in.nbits -= l
		sym := int(e >> 4)
		if sym < 256 {
			p[n] = byte(sym)
			in.hist[in.hpos] = byte(sym)
			in.hpos = (in.hpos + 1) & (WindowSize - 1)
			n++
			continue
		}
		if sym == 256 {
			in.endBlock()
			return n, nil
		}
		return n, in.match(sym)
	}
	return n, nil
}

// copyMatch copies the pending match into p, as much as fits, and returns how much it copied.
func (in *inflater) copyMatch(p []byte) int {
	n := 0
	for in.copyLen > 0 && n < len(p) {
		// A piece that neither overlaps its source nor wraps around the window.
		src := (in.hpos - in.copyDist) & (WindowSize - 1)
		k := min(in.copyLen, len(p)-n, in.copyDist, WindowSize-src, WindowSize-in.hpos)
		copy(p[n:n+k], in.hist[src:src+k])
		copy(in.hist[in.hpos:], p[n:n+k])
		in.hpos = (in.hpos + k) & (WindowSize - 1)
		n += k
		in.copyLen -= k
	}
	return n
}

func (in *inflater) endBlock() {
	if in.final {
		in.state = stDone
	} else {
		in.state = stHeader
	}
}

func (in *inflater) header() error {
	h, err := in.take(3)
	if err != nil {
		return err
	}
	in.final = h&1 == 1
	switch h >> 1 {
	case 0:
		// Stored: skip to the byte boundary, then LEN and its complement.
		in.bits >>= in.nbits % 8
		in.nbits -= in.nbits % 8
		v, err := in.take(32)
		if err != nil {
			return err
		}
		if uint16(v) != ^uint16(v>>16) {
			return fmt.Errorf("%w: stored block length %d does not match its complement", errCorrupt, uint16(v))
		}
		in.storedLeft, in.state = int(uint16(v)), stStored
	case 1:
		in.lit, in.dist = &fixedLit, &fixedDist
		in.state = stHuffman
	case 2:
		if err := in.dynamic(); err != nil {
			return err
		}
		in.state = stHuffman
	default:
		return fmt.Errorf("%w: reserved block type", errCorrupt)
	}
	return nil
}

// Length and distance codes: base values and extra bits (RFC 1951 3.2.5).
var (
	lenBase   = [29]uint16{3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258}
	lenExtra  = [29]uint8{0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0}
	distBase  = [30]uint16{1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577}
	distExtra = [30]uint8{0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13}
)

func (in *inflater) match(sym int) error {
	sym -= 257
	if sym >= len(lenBase) {
		return fmt.Errorf("%w: length code %d", errCorrupt, sym+257)
	}
	e, err := in.take(uint(lenExtra[sym]))
	if err != nil {
		return err
	}
	length := int(lenBase[sym]) + int(e)
	d, err := in.decode(in.dist)
	if err != nil {
		return err
	}
	if d >= len(distBase) {
		return fmt.Errorf("%w: distance code %d", errCorrupt, d)
	}
	if e, err = in.take(uint(distExtra[d])); err != nil {
		return err
	}
	in.copyLen, in.copyDist = length, int(distBase[d])+int(e)
	return nil
}

// codeOrder is the order of the code length code lengths in a dynamic block header.
var codeOrder = [19]uint8{16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15}

func (in *inflater) dynamic() error {
	h, err := in.take(14)
	if err != nil {
		return err
	}
	nlit, ndist, nclen := int(h&31)+257, int(h>>5&31)+1, int(h>>10)+4
	if nlit > 286 || ndist > 30 {
		return fmt.Errorf("%w: %d literal/length and %d distance codes", errCorrupt, nlit, ndist)
	}
	var clens [19]uint8
	for i := range nclen {
		v, err := in.take(3)
		if err != nil {
			return err
		}
		clens[codeOrder[i]] = uint8(v)
	}
	if err := in.clen.build(clens[:]); err != nil {
		return err
	}
	var lens [286 + 30]uint8
	for i := 0; i < nlit+ndist; {
		sym, err := in.decode(&in.clen)
		if err != nil {
			return err
		}
		if sym < 16 {
			lens[i] = uint8(sym)
			i++
			continue
		}
		var rep int
		var val uint8
		switch sym {
		case 16:
			if i == 0 {
				return fmt.Errorf("%w: repeat of no code length", errCorrupt)
			}
			v, err := in.take(2)
			if err != nil {
				return err
			}
			rep, val = 3+int(v), lens[i-1]
		case 17:
			v, err := in.take(3)
			if err != nil {
				return err
			}
			rep = 3 + int(v)
		default:
			v, err := in.take(7)
			if err != nil {
				return err
			}
			rep = 11 + int(v)
		}
		if i+rep > nlit+ndist {
			return fmt.Errorf("%w: code lengths repeat past their count", errCorrupt)
		}
		for ; rep > 0; rep-- {
			lens[i] = val
			i++
		}
	}
	if lens[256] == 0 {
		return fmt.Errorf("%w: no end-of-block code", errCorrupt)
	}
	if err := in.dynLit.build(lens[:nlit]); err != nil {
		return err
	}
	if err := in.dynDist.build(lens[nlit : nlit+ndist]); err != nil {
		return err
	}
	in.lit, in.dist = &in.dynLit, &in.dynDist
	return nil
}

const maxCodeBits = 15

// huffTable decodes a canonical Huffman code by a lookup of its next bits (as many as its longest code): entry =
// symbol<<4 | length, 0 for bit patterns that are no code.
type huffTable struct {
	t    []uint32
	bits uint
}

func (h *huffTable) build(lengths []uint8) error {
	var count [maxCodeBits + 1]int
	maxLen := 0
	for _, l := range lengths {
		count[l]++
		if int(l) > maxLen {
			maxLen = int(l)
		}
	}
	count[0] = 0
	// An over-subscribed code is corrupt; an incomplete one is allowed (unused patterns decode to errors).
	left := 1
	for l := 1; l <= maxCodeBits; l++ {
		left = left<<1 - count[l]
		if left < 0 {
			return fmt.Errorf("%w: over-subscribed Huffman code", errCorrupt)
		}
	}
	var next [maxCodeBits + 2]int
	for l := 1; l <= maxCodeBits; l++ {
		next[l+1] = (next[l] + count[l]) << 1
	}
	h.bits = uint(max(maxLen, 1))
	size := 1 << h.bits
	if cap(h.t) < size {
		h.t = make([]uint32, size)
	} else {
		h.t = h.t[:size]
		if left > 0 || count[maxLen] == 0 {
			clear(h.t) // an incomplete code leaves patterns unset: they must read as no code
		}
	}
	for sym, l := range lengths {
		if l == 0 {
			continue
		}
		code := next[l]
		next[l]++
		rev := 0
		for i := range int(l) {
			rev |= (code >> i & 1) << (int(l) - 1 - i)
		}
		for j := rev; j < size; j += 1 << l {
			h.t[j] = uint32(sym)<<4 | uint32(l)
		}
	}
	return nil
}

func (in *inflater) decode(h *huffTable) (int, error) {
	if err := in.need(h.bits); err != nil && err != io.ErrUnexpectedEOF {
		return 0, err
	}
	e := h.t[in.bits&(1<<h.bits-1)]
	l := uint(e & 15)
	if l == 0 {
		return 0, fmt.Errorf("%w: invalid Huffman code", errCorrupt)
	}
	if l > in.nbits {
		return 0, io.ErrUnexpectedEOF
	}
	in.bits >>= l
	in.nbits -= l
	return int(e >> 4), nil
}

// The fixed Huffman codes of block type 1.
var fixedLit, fixedDist = func() (huffTable, huffTable) {
	var lit, dist huffTable
	var ll [288]uint8
	for i := range ll {
		switch {
		case i < 144:
			ll[i] = 8
		case i < 256:
			ll[i] = 9
		case i < 280:
			ll[i] = 7
		default:
			ll[i] = 8
		}
	}
	var dl [30]uint8
	for i := range dl {
		dl[i] = 5
	}
	// Valid lengths: build cannot fail.
	_ = lit.build(ll[:])
	_ = dist.build(dl[:])
	return lit, dist
}()
