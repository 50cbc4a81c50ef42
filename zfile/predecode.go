package zfile

import (
	"context"
	"encoding/binary"
	"sync"
	"sync/atomic"
)

// Predecoded holds blocks decoded ahead of their reads, for the Readers that use it (UsePredecoded): when a node
// knows what a start reads, a second core decodes it while the container is being created, and the start's reads
// copy it instead of waiting for the decoder. It holds at most a set number of bytes. A block is kept until it
// is evicted, and blocks read at least once are evicted first, oldest first: Predecode waits while the pool is full
// of blocks not read yet, so that it stays at most the pool's size ahead of the reads. It is safe for concurrent
// use.
type Predecoded struct {
	max int64

	mu     sync.Mutex
	bytes  int64 // held
	blocks map[predecodedKey]*predecodedBlock
	read   []predecodedKey // blocks read since they were decoded, in the order of their first read
	room   chan struct{}   // closed and replaced when a block is read or evicted

	decoded, hits, missed atomic.Int64
}

type predecodedKey struct {
	reader uint64
	block  int64
}

type predecodedBlock struct {
	data []byte
	read bool
}

// predecodedTotal counts, over every pool of the process, the blocks decoded ahead and the reads served from them.
var predecodedTotal struct{ decoded, hits atomic.Int64 }

// PredecodedTotals returns the blocks decoded into every pool of the process and the reads served from them.
func PredecodedTotals() (decoded, hits int64) {
	return predecodedTotal.decoded.Load(), predecodedTotal.hits.Load()
}

// NewPredecoded returns a pool of at most max bytes of decoded blocks.
func NewPredecoded(max int64) *Predecoded {
	return &Predecoded{max: max, blocks: map[predecodedKey]*predecodedBlock{}, room: make(chan struct{})}
}

// Stats returns the number of blocks decoded into the pool and of reads served from it.
func (c *Predecoded) Stats() (decoded, hits int64) { return c.decoded.Load(), c.hits.Load() }

// Missed returns the number of blocks that readers using the pool did not find there and decoded themselves.
func (c *Predecoded) Missed() int64 { return c.missed.Load() }

// get copies the bytes of a held block from off into p and reports whether it had them.
func (c *Predecoded) get(k predecodedKey, p []byte, off int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.blocks[k]
	if b == nil || off+int64(len(p)) > int64(len(b.data)) {
		return false
	}
	copy(p, b.data[off:])
	c.hits.Add(1)
	predecodedTotal.hits.Add(1)
	if !b.read {
		b.read = true
		c.read = append(c.read, k)
		c.wake()
	}
	return true
}

func (c *Predecoded) has(k predecodedKey) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.blocks[k] != nil
}

// wake tells a waiting Predecode that there may be room. c.mu is held.
func (c *Predecoded) wake() {
	close(c.room)
	c.room = make(chan struct{})
}

// add keeps data as block k, evicting read blocks to make room, and waits while the pool is full of blocks not read
// yet. It fails only when ctx is done.
func (c *Predecoded) add(ctx context.Context, k predecodedKey, data []byte) error {
	n := int64(len(data))
	for {
		c.mu.Lock()
		if c.blocks[k] != nil {
			c.mu.Unlock()
			return nil
		}
		for c.bytes+n > c.max && len(c.read) > 0 {
			old := c.read[0]
			c.read = c.read[1:]
			if b := c.blocks[old]; b != nil {
				c.bytes -= int64(len(b.data))
				delete(c.blocks, old)
			}
		}
		if c.bytes+n <= c.max {
			c.blocks[k] = &predecodedBlock{data: data}
			c.bytes += n
			c.decoded.Add(1)
			predecodedTotal.decoded.Add(1)
			c.mu.Unlock()
			return nil
		}
		room := c.room
		c.mu.Unlock()
		select {
		case <-room:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// UsePredecoded makes reads look for their blocks in p first (nil: no longer).
func (z *Reader) UsePredecoded(p *Predecoded) { z.pre.Store(p) }

// Predecode decodes the blocks that hold the uncompressed bytes [off, off+n) into p, except those p holds already,
// waiting for room in p (see Predecoded). It reads their compressed bytes as ReadAt does and checks their CRCs if
// the Reader does; a block that fails is not kept, and the error says which.
func (z *Reader) Predecode(ctx context.Context, p *Predecoded, off, n int64) error {
	size := z.info.OriginalSize
	end := min(off+n, size)
	off = max(off, 0)
	if end <= off {
		return nil
	}
	first, last := off>>z.bsShift, (end-1)>>z.bsShift
	for b := first; b <= last; {
		if p.has(predecodedKey{z.id, b}) {
			b++
			continue
		}
		start := z.offset(b)
		e := b + 1
		for e <= last && z.offset(e+1)-start <= chunkSize && !p.has(predecodedKey{z.id, e}) {
			e++
		}
		comp := make([]byte, z.offset(e)-start)
		if err := readFull(z.r, comp, start, "blocks"); err != nil {
			return err
		}
		for i := b; i < e; i++ {
			rec := comp[z.offset(i)-start : z.offset(i+1)-start]
			data := rec[:len(rec)-z.crcLen]
			if z.verify && z.crcLen != 0 {
				if c := crc32c(blockCRCSeed, data); c != binary.LittleEndian.Uint32(rec[len(data):]) {
					return blockErr(i, z.offset(i), ErrChecksum, "CRC mismatch")
				}
			}
			bStart := i << z.bsShift
			blk := make([]byte, min(int64(1)<<z.bsShift, size-bStart))
			if err := decodeBlock(z.info.Algorithm, data, blk); err != nil {
				return &BlockError{Block: i, Offset: z.offset(i), Err: err}
			}
			if err := p.add(ctx, predecodedKey{z.id, i}, blk); err != nil {
				return err
			}
		}
		b = e
	}
	return nil
}
