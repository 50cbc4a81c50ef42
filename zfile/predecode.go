package zfile

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
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
	order  []predecodedKey // blocks added, in order (evicted ones included)
	room   chan struct{}   // closed and replaced when a block is read or evicted

	decoded, loaded, offered, hits, missed atomic.Int64
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

// Loaded returns the number of blocks added to the pool already decoded (AddPredecoded, Take), not counted as
// decoded.
func (c *Predecoded) Loaded() int64 { return c.loaded.Load() }

// Room returns how many more bytes of blocks the pool holds without evicting any.
func (c *Predecoded) Room() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.max - c.bytes
}

// Offered returns the number of blocks that readers using the pool decoded themselves and the pool kept a copy of
// (see offer).
func (c *Predecoded) Offered() int64 { return c.offered.Load() }

// Take adds the blocks old holds to c, in the order old got them, as blocks not read yet (counted as loaded),
// while c has room. A start takes the blocks of the start before it, which it would otherwise decode again.
func (c *Predecoded) Take(old *Predecoded) {
	blocks := old.held()
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, b := range blocks {
		if c.blocks[b.key] != nil {
			continue
		}
		if c.bytes+int64(len(b.data)) > c.max {
			break
		}
		c.blocks[b.key] = &predecodedBlock{data: b.data}
		c.order = append(c.order, b.key)
		c.bytes += int64(len(b.data))
		c.loaded.Add(1)
	}
}

type heldBlock struct {
	key  predecodedKey
	data []byte
}

// held returns the blocks the pool holds, in the order they were added.
func (c *Predecoded) held() []heldBlock {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]heldBlock, 0, len(c.blocks))
	seen := make(map[predecodedKey]bool, len(c.blocks))
	for _, k := range c.order {
		if b := c.blocks[k]; b != nil && !seen[k] { // a block evicted and added again is in order twice
			seen[k] = true
			out = append(out, heldBlock{k, b.data})
		}
	}
	return out
}

// offer keeps a copy of block k, which a read decoded itself, if the pool has room for it without evicting. The
// copy counts as read: it is evicted first. With these, the pool holds what the start decoded, not only what it
// decoded ahead (see Held).
func (c *Predecoded) offer(k predecodedKey, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.blocks[k] != nil || c.bytes+int64(len(data)) > c.max {
		return
	}
	c.blocks[k] = &predecodedBlock{data: bytes.Clone(data), read: true}
	c.read = append(c.read, k)
	c.order = append(c.order, k)
	c.bytes += int64(len(data))
	c.offered.Add(1)
}

// HeldBlock is a block a pool holds: the index of its Reader (see Held), its number and its bytes, which must
// not be modified.
type HeldBlock struct {
	Reader int
	Block  int64
	Data   []byte
}

// Held returns, in the order they were added, the blocks the pool holds of the Readers rs (Reader: the index in
// rs).
func (c *Predecoded) Held(rs []*Reader) []HeldBlock {
	idx := map[uint64]int{}
	for i, z := range rs {
		if z != nil {
			idx[z.id] = i
		}
	}
	var out []HeldBlock
	for _, b := range c.held() {
		if i, ok := idx[b.key.reader]; ok {
			out = append(out, HeldBlock{i, b.key.block, b.data})
		}
	}
	return out
}

// Drop empties the pool (its counts stay): its readers no longer use it.
func (c *Predecoded) Drop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.blocks, c.order, c.read, c.bytes = map[predecodedKey]*predecodedBlock{}, nil, nil, 0
	c.wake()
}

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
// yet. It reports whether it added the block (false: the pool held it already), and fails only when ctx is done.
func (c *Predecoded) add(ctx context.Context, k predecodedKey, data []byte) (bool, error) {
	n := int64(len(data))
	for {
		c.mu.Lock()
		if c.blocks[k] != nil {
			c.mu.Unlock()
			return false, nil
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
			c.order = append(c.order, k)
			c.bytes += n
			c.mu.Unlock()
			return true, nil
		}
		room := c.room
		c.mu.Unlock()
		select {
		case <-room:
		case <-ctx.Done():
			return false, ctx.Err()
		}
	}
}

// UsePredecoded makes reads look for their blocks in p first (nil: no longer).
func (z *Reader) UsePredecoded(p *Predecoded) { z.pre.Store(p) }

// Predecode decodes the blocks that hold the uncompressed bytes [off, off+n) into p, except those p holds already,
// waiting for room in p (see Predecoded). It reads their compressed bytes as ReadAt does and checks their CRCs if
// the Reader does; a block that fails is not kept, and the error says which. It stops before the next block once
// ctx is done.
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
			if err := ctx.Err(); err != nil {
				return err
			}
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
			added, err := p.add(ctx, predecodedKey{z.id, i}, blk)
			if err != nil {
				return err
			}
			if added {
				p.decoded.Add(1)
				predecodedTotal.decoded.Add(1)
			}
		}
		b = e
	}
	return nil
}

// AddPredecoded adds block i, decoded elsewhere (data: its uncompressed bytes, which the pool keeps), to p as
// Predecode would, waiting for room in p. It checks only the block's number and length: the caller vouches for
// the bytes.
func (z *Reader) AddPredecoded(ctx context.Context, p *Predecoded, i int64, data []byte) error {
	size := z.info.OriginalSize
	if i < 0 || i<<z.bsShift >= size {
		return fmt.Errorf("zfile: block %d: out of range (%d blocks)", i, (size+int64(1)<<z.bsShift-1)>>z.bsShift)
	}
	if want := min(int64(1)<<z.bsShift, size-i<<z.bsShift); int64(len(data)) != want {
		return fmt.Errorf("zfile: block %d: %d bytes, want %d", i, len(data), want)
	}
	added, err := p.add(ctx, predecodedKey{z.id, i}, data)
	if added {
		p.loaded.Add(1)
	}
	return err
}
