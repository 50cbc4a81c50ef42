// Package trace encodes and decodes overlaybd prefetch trace files: the list of reads a container made during
// start-up, recorded once and replayed on later starts so those blocks are fetched ahead of demand.
//
// Offsets and counts are in the decompressed layer-file space (the LSMT file inside a blob's tar and ZFile wrappers);
// layer 0 is the bottom lower.
package trace

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"slices"
	"sync"
	"time"
)

// Magic opens every trace file (the CRC32 of "Container Image Trace Format").
const Magic uint32 = 0xC2EF1820

const (
	headerSize = 24
	recordSize = 24
	// MaxRecords bounds a trace file read from outside (24 MiB of records).
	MaxRecords = 1 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Op is the kind of a recorded I/O.
type Op byte

// Recorded operations.
const (
	Read  Op = 'R'
	Write Op = 'W'
)

// Record is one recorded I/O.
type Record struct {
	Op     Op
	Layer  uint32 // 0 = bottom lower layer
	Count  uint64 // bytes
	Offset int64  // bytes, in the layer file
}

// ErrNotTrace reports input that does not start with the trace magic (upstream then treats it as a file list).
var ErrNotTrace = errors.New("trace: not a trace file (bad magic)")

// Decode parses a whole trace file.
func Decode(b []byte) ([]Record, error) {
	if len(b) < headerSize || binary.LittleEndian.Uint32(b) != Magic {
		return nil, ErrNotTrace
	}
	size := binary.LittleEndian.Uint64(b[8:])
	if size != uint64(len(b)-headerSize) {
		return nil, fmt.Errorf("trace: header says %d bytes of records, file has %d", size, len(b)-headerSize)
	}
	if size%recordSize != 0 {
		return nil, fmt.Errorf("trace: %d bytes of records is not a multiple of %d", size, recordSize)
	}
	if size/recordSize > MaxRecords {
		return nil, fmt.Errorf("trace: %d records exceeds the limit of %d", size/recordSize, MaxRecords)
	}
	body := b[headerSize:]
	if got, want := rawCRC(body), binary.LittleEndian.Uint32(b[16:]); got != want {
		return nil, fmt.Errorf("trace: checksum mismatch: records hash to %#08x, header says %#08x", got, want)
	}
	recs := make([]Record, 0, len(body)/recordSize)
	for i := 0; i < len(body); i += recordSize {
		r := body[i : i+recordSize]
		rec := Record{
			Op:     Op(r[0]),
			Layer:  binary.LittleEndian.Uint32(r[4:]),
			Count:  binary.LittleEndian.Uint64(r[8:]),
			Offset: int64(binary.LittleEndian.Uint64(r[16:])),
		}
		if rec.Op != Read && rec.Op != Write {
			return nil, fmt.Errorf("trace: record %d: unknown op %q", i/recordSize, r[0])
		}
		if rec.Offset < 0 || rec.Count > 1<<40 {
			return nil, fmt.Errorf("trace: record %d: offset %d count %d out of range", i/recordSize, rec.Offset, rec.Count)
		}
		recs = append(recs, rec)
	}
	return recs, nil
}

// Encode writes recs as a trace file.
func Encode(w io.Writer, recs []Record) error {
	buf := make([]byte, headerSize+len(recs)*recordSize)
	body := buf[headerSize:]
	for i, rec := range recs {
		r := body[i*recordSize:]
		r[0] = byte(rec.Op)
		binary.LittleEndian.PutUint32(r[4:], rec.Layer)
		binary.LittleEndian.PutUint64(r[8:], rec.Count)
		binary.LittleEndian.PutUint64(r[16:], uint64(rec.Offset))
	}
	binary.LittleEndian.PutUint32(buf, Magic)
	binary.LittleEndian.PutUint64(buf[8:], uint64(len(body)))
	binary.LittleEndian.PutUint32(buf[16:], rawCRC(body))
	_, err := w.Write(buf)
	return err
}

// rawCRC is CRC32C without pre/post inversion, seed 0, as upstream's crc32c computes it.
func rawCRC(p []byte) uint32 { return ^crc32.Update(^uint32(0), castagnoli, p) }

// Recorder collects the reads of a start, in the order they were first made. It is safe for concurrent use.
// A read that repeats an earlier one exactly is recorded once; beyond MaxRecords, reads are dropped (and counted).
type Recorder struct {
	start   time.Time
	mu      sync.Mutex
	recs    []Record
	at      []time.Duration // when each record was first read, since the recorder was made
	seen    map[Record]struct{}
	dropped int64
}

// NewRecorder returns an empty Recorder; the times of its records count from now.
func NewRecorder() *Recorder {
	return &Recorder{start: time.Now(), seen: map[Record]struct{}{}}
}

// Read records a read of n bytes at off of layer (0 = bottom).
func (r *Recorder) Read(layer int, off, n int64) {
	rec := Record{Op: Read, Layer: uint32(layer), Count: uint64(n), Offset: off}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.seen[rec]; ok {
		return
	}
	if len(r.recs) >= MaxRecords {
		r.dropped++
		return
	}
	r.seen[rec] = struct{}{}
	r.recs = append(r.recs, rec)
	r.at = append(r.at, time.Since(r.start))
}

// Started returns when the recorder was made: the origin of its records' times.
func (r *Recorder) Started() time.Time { return r.start }

// Records returns what was recorded so far, the time of each record since the recorder was made, and the number of
// reads dropped beyond MaxRecords.
func (r *Recorder) Records() ([]Record, []time.Duration, int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.recs), slices.Clone(r.at), r.dropped
}
