// Package gunzip decompresses gzip streams (layer blobs) with Intel's ISA-L when the machine has it (Debian's
// libisal2, loaded at run time) and with klauspost/compress's inflater otherwise. ISA-L's inflate is about 2.5×
// faster; nothing else changes: the two readers share the code that reads member headers, so they accept the same
// headers (as Go's compress/gzip does), both check every member's CRC-32 and size, read concatenated members as one
// stream, reject bytes after the last member that do not start another, and take a stream that ends early anywhere
// (even inside a header or a trailer) for the error io.ErrUnexpectedEOF.
package gunzip

import (
	"bufio"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"

	"github.com/klauspost/compress/flate"
)

// Errors of both readers, worded as Go's gzip package words its own.
var (
	ErrHeader   = errors.New("gzip: invalid header")
	ErrChecksum = errors.New("gzip: invalid checksum")
	ErrCorrupt  = errors.New("flate: corrupt input")
)

// Backend names the implementation NewReader uses: "isa-l" or "go".
func Backend() string {
	if isalAvailable() {
		return "isa-l"
	}
	return "go"
}

// NewReader returns a reader of the decompressed content of the gzip stream r. The first member's header is read
// (and checked) before it returns; an empty r gives io.EOF.
func NewReader(r io.Reader) (io.ReadCloser, error) {
	if isalAvailable() {
		return newISAL(r)
	}
	return NewGoReader(r)
}

// NewGoReader is NewReader with the pure Go implementation.
func NewGoReader(r io.Reader) (io.ReadCloser, error) {
	br, ok := r.(*bufio.Reader)
	if !ok {
		br = bufio.NewReader(r)
	}
	if err := readHeader(br.ReadByte); err != nil {
		return nil, err
	}
	return &goReader{br: br, inflater: flate.NewReader(br)}, nil
}

// Header flags (RFC 1952, section 2.3.1).
const (
	flagHdrCrc   = 1 << 1
	flagExtra    = 1 << 2
	flagName     = 1 << 3
	flagComment  = 1 << 4
	flagReserved = 0xe0
)

// maxHeaderString is the longest file name or comment a header may hold, with its NUL, as in Go's compress/gzip.
const maxHeaderString = 512

// readHeader reads and checks a member header from next, which returns the stream's bytes one at a time. It
// returns io.EOF only when the stream ends before the header's first byte, io.ErrUnexpectedEOF when it ends
// inside the header, and next's other errors as they are.
func readHeader(next func() (byte, error)) error {
	var crc uint32
	n := 0
	get := func() (byte, error) {
		c, err := next()
		if err == io.EOF && n > 0 {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return 0, err
		}
		n++
		crc = crc32.Update(crc, crc32.IEEETable, []byte{c})
		return c, nil
	}
	var fixed [10]byte
	for i := range fixed {
		c, err := get()
		if err != nil {
			return err
		}
		fixed[i] = c
	}
	flags := fixed[3]
	if fixed[0] != 0x1f || fixed[1] != 0x8b || fixed[2] != 8 || flags&flagReserved != 0 {
		return ErrHeader
	}
	if flags&flagExtra != 0 {
		lo, err := get()
		if err != nil {
			return err
		}
		hi, err := get()
		if err != nil {
			return err
		}
		for range int(lo) | int(hi)<<8 {
			if _, err := get(); err != nil {
				return err
			}
		}
	}
	for _, flag := range []byte{flagName, flagComment} {
		if flags&flag == 0 {
			continue
		}
		for i := 0; ; i++ {
			if i == maxHeaderString {
				return ErrHeader
			}
			c, err := get()
			if err != nil {
				return err
			}
			if c == 0 {
				break
			}
		}
	}
	if flags&flagHdrCrc != 0 {
		want := uint16(crc)
		lo, err := get()
		if err != nil {
			return err
		}
		hi, err := get()
		if err != nil {
			return err
		}
		if uint16(lo)|uint16(hi)<<8 != want {
			return ErrHeader
		}
	}
	return nil
}

// goReader decompresses a gzip stream with klauspost/compress's inflater.
type goReader struct {
	br       *bufio.Reader
	inflater io.ReadCloser
	crc      uint32
	size     uint32
	err      error // sticky
}

func (z *goReader) Read(p []byte) (int, error) {
	if z.err != nil {
		return 0, z.err
	}
	for {
		n, err := z.inflater.Read(p)
		z.crc = crc32.Update(z.crc, crc32.IEEETable, p[:n])
		z.size += uint32(n)
		if err == io.EOF {
			err = z.nextMember()
		}
		if err != nil {
			z.err = err
			return n, err
		}
		if n > 0 || len(p) == 0 {
			return n, nil
		}
	}
}

// nextMember checks the trailer of the member that ended and reads the header of the next one, if any (io.EOF if
// none).
func (z *goReader) nextMember() error {
	var trailer [8]byte
	if _, err := io.ReadFull(z.br, trailer[:]); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	if binary.LittleEndian.Uint32(trailer[:4]) != z.crc || binary.LittleEndian.Uint32(trailer[4:]) != z.size {
		return ErrChecksum
	}
	if err := readHeader(z.br.ReadByte); err != nil {
		return err
	}
	z.crc, z.size = 0, 0
	return z.inflater.(flate.Resetter).Reset(z.br, nil)
}

// Close releases the inflater.
func (z *goReader) Close() error {
	if z.err == nil {
		z.err = errors.New("gunzip: read after Close")
	}
	return z.inflater.Close()
}
