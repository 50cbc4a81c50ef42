package device

import (
	"encoding/binary"
	"fmt"
)

// The subset of the FUSE protocol (linux/fuse.h, protocol 7.x) that a filesystem of one regular file needs. Requests
// are parsed field by field, never cast from bytes: a malformed request is answered with an error, never trusted.

// Opcodes.
const (
	opLookup      = 1
	opForget      = 2
	opGetattr     = 3
	opOpen        = 14
	opRead        = 15
	opWrite       = 16
	opStatfs      = 17
	opRelease     = 18
	opFsync       = 20
	opFlush       = 25
	opInit        = 26
	opInterrupt   = 36
	opDestroy     = 38
	opBatchForget = 42
	opFallocate   = 43
)

const (
	inHeaderSize  = 40 // struct fuse_in_header
	outHeaderSize = 16 // struct fuse_out_header
	readInSize    = 40 // struct fuse_read_in
	writeInSize   = 40 // struct fuse_write_in
	fallocInSize  = 32 // struct fuse_fallocate_in
	initInSize    = 16 // struct fuse_init_in up to flags (kernels since 7.36 send 64 bytes)
	initOutSize   = 64 // struct fuse_init_out
	attrOutSize   = 104
	openOutSize   = 16
	writeOutSize  = 8
	statfsOutSize = 80

	fuseRootID       = 1
	fuseMajor        = 7
	fuseMinMinor     = 23 // every reply below has its modern layout
	fuseMaxMinor     = 36
	notifyResend     = 7 // FUSE_NOTIFY_RESEND, kernel 6.9
	minReadBufferLen = 8192

	// fuse_init_in/out flags.
	initAsyncRead = 1 << 0
	initBigWrites = 1 << 5
	initAsyncDIO  = 1 << 15
	initMaxPages  = 1 << 22
	initExt       = 1 << 30
	// fuse_init_in flags2 (flags >> 32).
	init2HasResend = 1 << (39 - 32)

	fopenDirectIO             = 1 << 0
	fopenParallelDirectWrites = 1 << 6
)

var ne = binary.NativeEndian

// inHeader is struct fuse_in_header.
type inHeader struct {
	len    uint32
	opcode uint32
	unique uint64
	nodeID uint64
}

// parseRequest splits a request read from /dev/fuse into its header and body.
func parseRequest(b []byte) (inHeader, []byte, error) {
	if len(b) < inHeaderSize {
		return inHeader{}, nil, fmt.Errorf("FUSE request of %d bytes is shorter than its header", len(b))
	}
	h := inHeader{len: ne.Uint32(b[0:]), opcode: ne.Uint32(b[4:]), unique: ne.Uint64(b[8:]), nodeID: ne.Uint64(b[16:])}
	if h.len < inHeaderSize || int(h.len) > len(b) {
		return h, nil, fmt.Errorf("FUSE request (opcode %d) says it has %d bytes, read %d", h.opcode, h.len, len(b))
	}
	return h, b[inHeaderSize:h.len], nil
}

// putOutHeader writes struct fuse_out_header for a reply of n bytes in all (header included) to b.
func putOutHeader(b []byte, n int, errno int32, unique uint64) {
	ne.PutUint32(b[0:], uint32(n))
	ne.PutUint32(b[4:], uint32(-errno))
	ne.PutUint64(b[8:], unique)
}

// initReply negotiates the connection: the INIT request's body in, the fuse_init_out body (initOutSize bytes)
// out. hasResend reports whether the kernel can re-send requests to a new server (FUSE_NOTIFY_RESEND).
func initReply(body []byte, maxWrite, maxBackground int) (out []byte, hasResend bool, err error) {
	if len(body) < initInSize {
		return nil, false, fmt.Errorf("FUSE INIT of %d bytes, want at least %d", len(body), initInSize)
	}
	major, minor := ne.Uint32(body[0:]), ne.Uint32(body[4:])
	maxReadahead, flags := ne.Uint32(body[8:]), ne.Uint32(body[12:])
	if major != fuseMajor || minor < fuseMinMinor {
		return nil, false, fmt.Errorf("kernel FUSE protocol %d.%d, need %d.%d or newer", major, minor, fuseMajor, fuseMinMinor)
	}
	if flags&initExt != 0 && len(body) >= 20 {
		hasResend = ne.Uint32(body[16:])&init2HasResend != 0
	}
	out = make([]byte, initOutSize)
	ne.PutUint32(out[0:], fuseMajor)
	ne.PutUint32(out[4:], min(minor, fuseMaxMinor))
	ne.PutUint32(out[8:], maxReadahead)
	ne.PutUint32(out[12:], flags&(initAsyncRead|initBigWrites|initAsyncDIO|initMaxPages))
	ne.PutUint16(out[16:], uint16(maxBackground))
	ne.PutUint16(out[18:], uint16(maxBackground*3/4)) // congestion threshold
	ne.PutUint32(out[20:], uint32(maxWrite))
	ne.PutUint32(out[24:], 1)                     // time granularity (ns)
	ne.PutUint16(out[28:], uint16(maxWrite/4096)) // max pages per request
	return out, hasResend, nil
}

// readIn is the part of struct fuse_read_in (and fuse_write_in) that a disk file needs.
type readIn struct {
	offset uint64
	size   uint32
}

func parseReadIn(body []byte) (readIn, error) {
	if len(body) < readInSize {
		return readIn{}, fmt.Errorf("FUSE READ of %d bytes, want %d", len(body), readInSize)
	}
	return readIn{offset: ne.Uint64(body[8:]), size: ne.Uint32(body[16:])}, nil
}

// parseWriteIn returns a WRITE request's offset and data.
func parseWriteIn(body []byte) (off uint64, data []byte, err error) {
	if len(body) < writeInSize {
		return 0, nil, fmt.Errorf("FUSE WRITE of %d bytes, want at least %d", len(body), writeInSize)
	}
	size := ne.Uint32(body[16:])
	if uint64(size) > uint64(len(body)-writeInSize) {
		return 0, nil, fmt.Errorf("FUSE WRITE of %d bytes carries %d", size, len(body)-writeInSize)
	}
	return ne.Uint64(body[8:]), body[writeInSize : writeInSize+int(size)], nil
}

// fallocIn is struct fuse_fallocate_in.
type fallocIn struct {
	offset, length uint64
	mode           uint32
}

func parseFallocIn(body []byte) (fallocIn, error) {
	if len(body) < fallocInSize {
		return fallocIn{}, fmt.Errorf("FUSE FALLOCATE of %d bytes, want %d", len(body), fallocInSize)
	}
	return fallocIn{offset: ne.Uint64(body[8:]), length: ne.Uint64(body[16:]), mode: ne.Uint32(body[24:])}, nil
}

// parseOpenFlags returns the open(2) flags of an OPEN request.
func parseOpenFlags(body []byte) (uint32, error) {
	if len(body) < 8 {
		return 0, fmt.Errorf("FUSE OPEN of %d bytes, want 8", len(body))
	}
	return ne.Uint32(body[0:]), nil
}

// fileAttr is the part of struct fuse_attr a disk file sets.
type fileAttr struct {
	size    uint64
	mode    uint32
	blksize uint32
}

// attrOut encodes struct fuse_attr_out for the root inode with attributes valid for validSec seconds.
func attrOut(a fileAttr, validSec uint64) []byte {
	out := make([]byte, attrOutSize)
	ne.PutUint64(out[0:], validSec)
	attr := out[16:]
	ne.PutUint64(attr[0:], fuseRootID)
	ne.PutUint64(attr[8:], a.size)
	ne.PutUint64(attr[16:], (a.size+511)/512)
	ne.PutUint32(attr[60:], a.mode)
	ne.PutUint32(attr[64:], 1) // nlink
	ne.PutUint32(attr[80:], a.blksize)
	return out
}

func openOut(openFlags uint32) []byte {
	out := make([]byte, openOutSize)
	ne.PutUint32(out[8:], openFlags)
	return out
}

func writeOut(n int) []byte {
	out := make([]byte, writeOutSize)
	ne.PutUint32(out[0:], uint32(n))
	return out
}

// statfsOut encodes struct fuse_statfs_out for a filesystem of one file of size bytes.
func statfsOut(size int64) []byte {
	out := make([]byte, statfsOutSize)
	ne.PutUint64(out[0:], uint64(size)/4096) // blocks
	ne.PutUint64(out[24:], 1)                // files
	ne.PutUint32(out[40:], 4096)             // bsize
	ne.PutUint32(out[44:], 255)              // namelen
	ne.PutUint32(out[48:], 4096)             // frsize
	return out
}
