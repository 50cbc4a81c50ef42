package lsmt

import (
	"bytes"
	"io"
	"io/fs"
	"time"
)

// memFile is an in-memory WriteAtFile and HoleFile with sector-granular allocation tracking.
type memFile struct {
	b     []byte
	alloc []bool // per 512-byte sector: holds data
	reads int    // ReadAt calls
}

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	m.reads++
	if off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		m.resize(end)
	}
	copy(m.b[off:], p)
	for s := off / SectorSize; s*SectorSize < off+int64(len(p)); s++ {
		m.alloc[s] = true
	}
	return len(p), nil
}

func (m *memFile) resize(n int64) {
	if n <= int64(len(m.b)) {
		m.b = m.b[:n]
	} else {
		m.b = append(m.b, make([]byte, n-int64(len(m.b)))...)
	}
	ns := int((n + SectorSize - 1) / SectorSize)
	if ns <= len(m.alloc) {
		m.alloc = m.alloc[:ns]
	} else {
		m.alloc = append(m.alloc, make([]bool, ns-len(m.alloc))...)
	}
}

func (m *memFile) Truncate(n int64) error { m.resize(n); return nil }

func (m *memFile) Stat() (fs.FileInfo, error) { return memInfo(len(m.b)), nil }

func (m *memFile) SeekData(off int64) (int64, error) {
	for s := off / SectorSize; s < int64(len(m.alloc)); s++ {
		if m.alloc[s] {
			return max(off, s*SectorSize), nil
		}
	}
	return 0, io.EOF
}

func (m *memFile) SeekHole(off int64) (int64, error) {
	for s := off / SectorSize; s < int64(len(m.alloc)); s++ {
		if !m.alloc[s] {
			return max(off, s*SectorSize), nil
		}
	}
	return int64(len(m.b)), nil
}

func (m *memFile) PunchHole(off, n int64) error {
	end := min(off+n, int64(len(m.b)))
	if off >= end {
		return nil
	}
	clear(m.b[off:end])
	for s := (off + SectorSize - 1) / SectorSize; (s+1)*SectorSize <= end; s++ {
		m.alloc[s] = false
	}
	return nil
}

type memInfo int64

func (i memInfo) Name() string       { return "mem" }
func (i memInfo) Size() int64        { return int64(i) }
func (i memInfo) Mode() fs.FileMode  { return 0o644 }
func (i memInfo) ModTime() time.Time { return time.Time{} }
func (i memInfo) IsDir() bool        { return false }
func (i memInfo) Sys() any           { return nil }

// commitBytes commits src into memory.
func commitBytes(t interface{ Fatal(...any) }, src Source, opts CommitOptions) []byte {
	var buf bytes.Buffer
	n, err := Commit(&buf, src, opts)
	if err != nil {
		t.Fatal(err)
	}
	if n != int64(buf.Len()) {
		t.Fatal("Commit returned", n, "but wrote", buf.Len())
	}
	return buf.Bytes()
}

// openBytes opens a committed or sealed layer held in memory.
func openBytes(t interface{ Fatal(...any) }, b []byte) *File {
	f, err := Open(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// pattern returns n deterministic bytes derived from seed.
func pattern(seed, n int) []byte {
	b := make([]byte, n)
	x := uint32(seed)*2654435761 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}
