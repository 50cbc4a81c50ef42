package ext4

/*
#include "obd.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"runtime/cgo"
	"slices"
	"sync"
	"unsafe"
)

// Device is the block storage an ext4 filesystem lives on. Areas never
// written must read as zeros. ReadAt and WriteAt must not keep p.
type Device interface {
	io.ReaderAt
	io.WriterAt
	// Size is the device size in bytes.
	Size() int64
}

// Discarder is implemented by devices that can drop a range so that it
// reads as zeros afterwards.
type Discarder interface {
	Discard(off, n int64) error
}

// Syncer is implemented by devices that can make their writes durable; it
// is called when libext2fs flushes.
type Syncer interface {
	Sync() error
}

// ioState is what the C io_manager reaches through a cgo.Handle. It keeps
// a write-back cache of the metadata blocks libext2fs writes: creating a
// file rewrites the same inode table and directory blocks many times.
type ioState struct {
	dev  Device
	mu   sync.Mutex
	err  error // first device error not yet reported
	zero []byte
	// bs is the cached block size; 0 until the filesystem is open.
	bs    int64
	dirty map[int64][]byte // block-aligned offset -> contents to write
	spare [][]byte
}

// maxDirty bounds the write-back cache (in blocks).
const maxDirty = 16384

func (st *ioState) fail(err error) C.int {
	st.mu.Lock()
	if st.err == nil {
		st.err = err
	}
	st.mu.Unlock()
	return 1
}

// takeErr returns and clears the pending device error.
func (st *ioState) takeErr() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	err := st.err
	st.err = nil
	return err
}

func (st *ioState) readAt(p []byte, off int64) error {
	if st.bs > 0 && int64(len(p)) == st.bs && off%st.bs == 0 {
		if b, ok := st.dirty[off]; ok {
			copy(p, b)
			return nil
		}
	}
	n, err := st.dev.ReadAt(p, off)
	if n != len(p) {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("device read of %d bytes at %d: %w", len(p), off, err)
	}
	st.overlay(p, off, false)
	return nil
}

// overlay reconciles p (device bytes at off) with the cached blocks it
// overlaps: it copies them into p, or p into them when toCache is set.
func (st *ioState) overlay(p []byte, off int64, toCache bool) {
	if len(st.dirty) == 0 {
		return
	}
	end := off + int64(len(p))
	for b := off / st.bs * st.bs; b < end; b += st.bs {
		blk, ok := st.dirty[b]
		if !ok {
			continue
		}
		lo, hi := max(b, off), min(b+st.bs, end)
		if toCache {
			copy(blk[lo-b:hi-b], p[lo-off:hi-off])
		} else {
			copy(p[lo-off:hi-off], blk[lo-b:hi-b])
		}
	}
}

// writeAt writes p straight to the device, keeping cached copies current.
func (st *ioState) writeAt(p []byte, off int64) error {
	if off < 0 || off+int64(len(p)) > st.dev.Size() {
		return fmt.Errorf("device write of %d bytes at %d: beyond the device end (%d)", len(p), off, st.dev.Size())
	}
	st.overlay(p, off, true)
	n, err := st.dev.WriteAt(p, off)
	if err == nil && n != len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return fmt.Errorf("device write of %d bytes at %d: %w", len(p), off, err)
	}
	return nil
}

// forget drops the cached blocks in [off, off+n): their place on the device now holds data written by others.
func (st *ioState) forget(off, n int64) {
	if len(st.dirty) == 0 || st.bs == 0 {
		return
	}
	for b := off / st.bs * st.bs; b < off+n; b += st.bs {
		if blk, ok := st.dirty[b]; ok {
			st.spare = append(st.spare, blk)
			delete(st.dirty, b)
		}
	}
}

// cacheWrite takes a metadata write from libext2fs: whole blocks are kept
// in the cache, anything else goes to the device.
func (st *ioState) cacheWrite(p []byte, off int64) error {
	bs := st.bs
	if bs == 0 || off%bs != 0 || int64(len(p))%bs != 0 {
		return st.writeAt(p, off)
	}
	for i := int64(0); i < int64(len(p)); i += bs {
		blk, ok := st.dirty[off+i]
		if !ok {
			if n := len(st.spare); n > 0 {
				blk, st.spare = st.spare[n-1], st.spare[:n-1]
			} else {
				blk = make([]byte, bs)
			}
			st.dirty[off+i] = blk
		}
		copy(blk, p[i:i+bs])
	}
	if len(st.dirty) > maxDirty {
		return st.flush()
	}
	return nil
}

// flush writes the cached blocks back in device order, merging neighbours.
func (st *ioState) flush() error {
	if len(st.dirty) == 0 {
		return nil
	}
	offs := slices.Sorted(maps.Keys(st.dirty))
	var run []byte
	var runOff int64
	write := func() error {
		if len(run) == 0 {
			return nil
		}
		n, err := st.dev.WriteAt(run, runOff)
		if err == nil && n != len(run) {
			err = io.ErrShortWrite
		}
		if err != nil {
			return fmt.Errorf("device write of %d bytes at %d: %w", len(run), runOff, err)
		}
		run = run[:0]
		return nil
	}
	var err error
	for _, off := range offs {
		if len(run) > 0 && (off != runOff+int64(len(run)) || len(run) >= 1<<20) {
			if err = write(); err != nil {
				break
			}
		}
		if len(run) == 0 {
			runOff = off
		}
		run = append(run, st.dirty[off]...)
	}
	if err == nil {
		err = write()
	}
	for off, blk := range st.dirty {
		st.spare = append(st.spare, blk)
		delete(st.dirty, off)
	}
	return err
}

func state(h C.uintptr_t) *ioState {
	return cgo.Handle(h).Value().(*ioState)
}

//export obdGoRead
func obdGoRead(h C.uintptr_t, off C.uint64_t, buf unsafe.Pointer, n C.int64_t) C.int {
	st := state(h)
	if err := st.readAt(unsafe.Slice((*byte)(buf), int(n)), int64(off)); err != nil {
		return st.fail(err)
	}
	return 0
}

//export obdGoWrite
func obdGoWrite(h C.uintptr_t, off C.uint64_t, buf unsafe.Pointer, n C.int64_t) C.int {
	st := state(h)
	if err := st.cacheWrite(unsafe.Slice((*byte)(buf), int(n)), int64(off)); err != nil {
		return st.fail(err)
	}
	return 0
}

//export obdGoFlush
func obdGoFlush(h C.uintptr_t) C.int {
	st := state(h)
	if err := st.flush(); err != nil {
		return st.fail(err)
	}
	if s, ok := st.dev.(Syncer); ok {
		if err := s.Sync(); err != nil {
			return st.fail(fmt.Errorf("device sync: %w", err))
		}
	}
	return 0
}

// obdGoDiscard returns 0 on success, 1 when the device cannot discard and
// 2 on error.
//
//export obdGoDiscard
func obdGoDiscard(h C.uintptr_t, off, n C.uint64_t) C.int {
	st := state(h)
	d, ok := st.dev.(Discarder)
	if !ok {
		return 1
	}
	if err := st.flush(); err != nil {
		st.fail(err)
		return 2
	}
	if err := d.Discard(int64(off), int64(n)); err != nil {
		st.fail(fmt.Errorf("device discard of %d bytes at %d: %w", n, off, err))
		return 2
	}
	return 0
}

//export obdGoZeroout
func obdGoZeroout(h C.uintptr_t, off, n C.uint64_t) C.int {
	st := state(h)
	for o, end := int64(off), int64(off+n); o < end; {
		k := min(int64(len(st.zero)), end-o)
		if err := st.writeAt(st.zero[:k], o); err != nil {
			return st.fail(err)
		}
		o += k
	}
	return 0
}

// Errcode is a libext2fs (com_err) error code.
type Errcode int64

// Errcodes that callers tell apart with errors.Is. All three also match
// syscall.ENOSPC.
const (
	// ErrNoFreeBlocks: the filesystem has no free block left.
	ErrNoFreeBlocks = Errcode(C.EXT2_ET_BLOCK_ALLOC_FAIL)
	// ErrNoFreeInodes: the filesystem has no free inode left.
	ErrNoFreeInodes = Errcode(C.EXT2_ET_INODE_ALLOC_FAIL)
	// ErrXattrNoSpace: an inode's extended attributes do not fit in the
	// room ext4 has for them, the inode's spare bytes and one block.
	ErrXattrNoSpace = Errcode(C.EXT2_ET_EA_NO_SPACE)
)

func (e Errcode) Error() string {
	return "ext2fs: " + C.GoString(C.obd_strerror(C.errcode_t(e)))
}

// Unwrap maps the codes that have a POSIX meaning to a syscall.Errno, so
// that errors.Is(err, fs.ErrNotExist) and friends work.
func (e Errcode) Unwrap() error {
	switch e {
	case C.EXT2_ET_BLOCK_ALLOC_FAIL, C.EXT2_ET_INODE_ALLOC_FAIL,
		C.EXT2_ET_EA_NO_SPACE, C.EXT2_ET_DIR_NO_SPACE:
		return errNoSpace
	case C.EXT2_ET_FILE_NOT_FOUND:
		return errNotExist
	case C.EXT2_ET_EA_KEY_NOT_FOUND:
		return errNoData
	case C.EXT2_ET_NO_DIRECTORY:
		return errNotDir
	case C.EXT2_ET_DIR_EXISTS, C.EXT2_ET_FILE_EXISTS:
		return errExist
	}
	return nil
}

// codeErr turns a libext2fs return code into an error, attaching the
// device error that caused it, if any.
func (st *ioState) codeErr(code C.errcode_t) error {
	if code == 0 {
		return nil
	}
	var err error
	if code > 0 && code < 4096 {
		err = errnoErr(int(code))
	} else {
		err = Errcode(code)
	}
	if devErr := st.takeErr(); devErr != nil {
		return errors.Join(err, devErr)
	}
	return err
}
