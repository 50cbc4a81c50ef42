// Package tarwrap reads and writes the tar wrapper that overlaybd puts around a layer blob, so the blob is also a
// valid tar that a plain containerd pull unpacks into `overlaybd.commit`.
//
// Reading follows upstream's detection rule (ustar magic "ustar\0", version "00", valid checksum) but computes the
// data offset from the headers instead of assuming it. Writing produces upstream's bytes exactly.
package tarwrap

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

const (
	blockSize = 512
	// CommitName is the member name upstream writers give the layer file.
	CommitName = "overlaybd.commit"
	paxName    = "overlaybd.pax"
	// DefaultMode is the mode written by upstream for a committed layer file (a regular file, rw-r--r--).
	DefaultMode = 0o100644
	// maxHeaders bounds the extended headers (pax, GNU long name) accepted before the member.
	maxHeaders = 16
	// maxExtSize bounds the size of one extended header's data.
	maxExtSize = 1 << 20
)

// ErrNotWrapped is returned by Detect when the blob does not start with a ustar header.
var ErrNotWrapped = errors.New("tarwrap: not a tar-wrapped blob")

// Member locates the wrapped file inside a blob.
type Member struct {
	Name   string // member name, e.g. "overlaybd.commit"
	Offset int64  // byte offset of the member's data in the blob
	Size   int64  // member data length in bytes
	Mode   int64  // mode field of the member header
	PAX    bool   // the member had a pax extended header
}

// Detect reports where the wrapped file lies in a blob of the given size. It returns ErrNotWrapped (test with
// errors.Is) when the first block is not a ustar header with a valid checksum, as upstream's is_tar_file decides;
// any other error means the blob claims to be a tar but is malformed.
func Detect(r io.ReaderAt, size int64) (Member, error) {
	var hdr [blockSize]byte
	if size < blockSize {
		return Member{}, ErrNotWrapped
	}
	if _, err := r.ReadAt(hdr[:], 0); err != nil {
		return Member{}, fmt.Errorf("tarwrap: read first header: %w", err)
	}
	if !isUstar(hdr[:]) {
		return Member{}, ErrNotWrapped
	}
	var (
		off     int64
		paxSize = int64(-1)
		name    string
		pax     bool
	)
	for i := 0; ; i++ {
		if i > 0 {
			if off+blockSize > size {
				return Member{}, fmt.Errorf("tarwrap: header at offset %d: beyond end of blob (%d bytes)", off, size)
			}
			if _, err := r.ReadAt(hdr[:], off); err != nil {
				return Member{}, fmt.Errorf("tarwrap: read header at offset %d: %w", off, err)
			}
			if !validChecksum(hdr[:]) {
				return Member{}, fmt.Errorf("tarwrap: header at offset %d: bad checksum", off)
			}
		}
		if i >= maxHeaders {
			return Member{}, fmt.Errorf("tarwrap: more than %d extended headers before the member", maxHeaders)
		}
		hsize, err := parseNumeric(hdr[124:136])
		if err != nil {
			return Member{}, fmt.Errorf("tarwrap: header at offset %d: size field: %w", off, err)
		}
		typ := hdr[156]
		data := off + blockSize
		switch typ {
		case 'x', 'g', 'L', 'K':
			if hsize > maxExtSize || data+hsize > size {
				return Member{}, fmt.Errorf("tarwrap: extended header at offset %d: size %d out of range", off, hsize)
			}
			ext := make([]byte, hsize)
			if _, err := r.ReadAt(ext, data); err != nil {
				return Member{}, fmt.Errorf("tarwrap: read extended header at offset %d: %w", off, err)
			}
			switch typ {
			case 'x':
				recs, err := parsePAX(ext)
				if err != nil {
					return Member{}, fmt.Errorf("tarwrap: pax header at offset %d: %w", off, err)
				}
				pax = true
				if v, ok := recs["size"]; ok {
					n, err := strconv.ParseInt(v, 10, 64)
					if err != nil || n < 0 {
						return Member{}, fmt.Errorf("tarwrap: pax header at offset %d: bad size %q", off, v)
					}
					paxSize = n
				}
				if v, ok := recs["path"]; ok {
					name = v
				}
			case 'L':
				name = cString(ext)
			}
			off = data + roundUp(hsize)
			continue
		case '0', 0, '7':
		default:
			return Member{}, fmt.Errorf("tarwrap: first member has type %q, want a regular file", typ)
		}
		if name == "" {
			name = ustarName(hdr[:])
		}
		mode, err := parseNumeric(hdr[100:108])
		if err != nil {
			return Member{}, fmt.Errorf("tarwrap: member header at offset %d: mode field: %w", off, err)
		}
		msize := hsize
		if paxSize >= 0 {
			msize = paxSize
		}
		if msize > size-data {
			return Member{}, fmt.Errorf("tarwrap: member %q: size %d exceeds blob (%d bytes from offset %d)", name, msize, size-data, data)
		}
		return Member{Name: name, Offset: data, Size: msize, Mode: mode, PAX: pax}, nil
	}
}

// Open returns the layer file inside a blob: the wrapped member when the blob is tar-wrapped, else the whole blob.
func Open(r io.ReaderAt, size int64) (*io.SectionReader, error) {
	m, err := Detect(r, size)
	if errors.Is(err, ErrNotWrapped) {
		return io.NewSectionReader(r, 0, size), nil
	}
	if err != nil {
		return nil, err
	}
	return io.NewSectionReader(r, m.Offset, m.Size), nil
}

// HeadSize is the size of the headers Write puts before the payload: the payload of a wrapped blob starts here.
const HeadSize = 3 * blockSize

// WrappedSize is the size of the blob Write produces for a payload of n bytes.
func WrappedSize(n int64) int64 {
	return HeadSize + roundUp(n) + 2*blockSize
}

// Write writes payload (exactly size bytes) wrapped as upstream's `overlaybd-commit -t` does: a pax header carrying
// the size, a ustar header for CommitName with the given mode, the payload, zero padding and two zero blocks.
// It returns the number of bytes written.
func Write(w io.Writer, payload io.Reader, size int64, mode int64) (int64, error) {
	if size < 0 {
		return 0, fmt.Errorf("tarwrap: negative payload size %d", size)
	}
	var total int64
	n, err := w.Write(Head(size, mode))
	total += int64(n)
	if err != nil {
		return total, err
	}
	c, err := io.CopyN(w, payload, size)
	total += c
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = fmt.Errorf("tarwrap: payload ended after %d of %d bytes", c, size)
		}
		return total, err
	}
	n, err = w.Write(Tail(size))
	total += int64(n)
	return total, err
}

// Head returns the HeadSize bytes Write puts before a payload of size bytes (size ≥ 0): a pax header carrying the
// size and a ustar header for CommitName with the given mode. With Tail, it lets a writer that only learns the size
// at the end (a compressor writing at offset HeadSize) wrap its output in place.
func Head(size, mode int64) []byte {
	head := make([]byte, HeadSize)
	record := paxRecord("size", strconv.FormatInt(size, 10))
	pax := head[0:blockSize]
	copy(pax, paxName)
	putOctal(pax[124:136], int64(len(record)), 11)
	pax[156] = 'x'
	copy(pax[257:], "ustar\x0000")
	putChecksum(pax)
	copy(head[blockSize:], record)
	mem := head[2*blockSize:]
	copy(mem, CommitName)
	putOctal(mem[100:108], mode, 6)
	putOctal(mem[108:116], 0, 6)
	putOctal(mem[116:124], 0, 6)
	putOctal(mem[124:136], 0, 11)
	putOctal(mem[136:148], 0, 11)
	mem[156] = '0'
	copy(mem[257:], "ustar\x0000")
	copy(mem[265:297], "root")
	copy(mem[297:329], "root")
	putChecksum(mem)
	return head
}

// Tail returns the bytes Write puts after a payload of size bytes: zero padding to a block and two zero blocks.
func Tail(size int64) []byte {
	return make([]byte, roundUp(size)-size+2*blockSize)
}

func roundUp(n int64) int64 { return (n + blockSize - 1) / blockSize * blockSize }

// paxRecord formats one pax record "<len> key=value\n" where len counts the whole record.
func paxRecord(k, v string) string {
	body := " " + k + "=" + v + "\n"
	n := len(body) + 1
	for len(strconv.Itoa(n))+len(body) != n {
		n++
	}
	return strconv.Itoa(n) + body
}

// putOctal writes v as upstream does: octal right-aligned in width digits, then a space, then NUL if room remains.
func putOctal(field []byte, v int64, width int) {
	s := strconv.FormatInt(v, 8)
	for len(s) < width {
		s = " " + s
	}
	s += " "
	copy(field, s)
}

func putChecksum(h []byte) {
	copy(h[148:156], "        ")
	var sum int64
	for _, b := range h[:blockSize] {
		sum += int64(b)
	}
	for i := 148; i < 156; i++ {
		h[i] = 0
	}
	putOctal(h[148:156], sum, 6)
}

func isUstar(h []byte) bool {
	return bytes.Equal(h[257:263], []byte("ustar\x00")) && bytes.Equal(h[263:265], []byte("00")) && validChecksum(h)
}

func validChecksum(h []byte) bool {
	want, err := parseNumeric(h[148:156])
	if err != nil {
		return false
	}
	var sum int64
	for i, b := range h[:blockSize] {
		if i >= 148 && i < 156 {
			b = ' '
		}
		sum += int64(b)
	}
	return sum == want
}

// parseNumeric parses a tar numeric field: octal digits padded with spaces or NULs, or GNU base-256.
func parseNumeric(f []byte) (int64, error) {
	if len(f) > 0 && f[0]&0x80 != 0 {
		if f[0] != 0x80 || len(f) > 9 && !allZero(f[1:len(f)-8]) || f[len(f)-8]&0x80 != 0 {
			return 0, fmt.Errorf("base-256 value %x out of range", f)
		}
		var v int64
		for _, b := range f[len(f)-8:] {
			v = v<<8 | int64(b)
		}
		return v, nil
	}
	s := strings.Trim(string(f), " \x00")
	if s == "" {
		return 0, nil
	}
	v, err := strconv.ParseInt(s, 8, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("bad octal %q", s)
	}
	return v, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func parsePAX(b []byte) (map[string]string, error) {
	recs := map[string]string{}
	for len(b) > 0 {
		if allZero(b) {
			break
		}
		sp := bytes.IndexByte(b, ' ')
		if sp <= 0 {
			return nil, errors.New("malformed record length")
		}
		n, err := strconv.Atoi(string(b[:sp]))
		if err != nil || n <= sp+1 || n > len(b) {
			return nil, fmt.Errorf("malformed record length %q", b[:sp])
		}
		rec := b[sp+1 : n]
		b = b[n:]
		if len(rec) == 0 || rec[len(rec)-1] != '\n' {
			return nil, errors.New("record not terminated by newline")
		}
		k, v, ok := strings.Cut(string(rec[:len(rec)-1]), "=")
		if !ok {
			return nil, fmt.Errorf("record %q has no '='", rec)
		}
		recs[k] = v
	}
	return recs, nil
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func ustarName(h []byte) string {
	name := cString(h[0:100])
	if prefix := cString(h[345:500]); prefix != "" {
		name = prefix + "/" + name
	}
	return name
}
