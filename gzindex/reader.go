package gzindex

import (
	"container/list"
	"errors"
	"fmt"
	"io"
	"sync"
)

// inChunk is how much compressed input a Reader reads ahead: little beyond what a read needs is fetched
// (CompressedRange allows for it).
const inChunk = 16 << 10

// SpanCacheBytes bounds the inflated spans (the stream between two checkpoints, about 1 MiB each) that all Readers
// keep, least recently used out first: a span is inflated once for all the reads that fall in it while it stays.
const SpanCacheBytes = 64 << 20

// Reader reads the uncompressed stream of a gzip blob at any offset: it inflates the span holding the offset from
// the checkpoint that starts it, reading the compressed bytes from the blob (an io.ReaderAt, e.g. a lazily fetched
// remote blob), and keeps it in the shared span cache.
type Reader struct {
	ix *Index
	gz io.ReaderAt
}

// NewReader returns a Reader of the blob gz, indexed by ix.
func NewReader(ix *Index, gz io.ReaderAt) *Reader { return &Reader{ix: ix, gz: gz} }

// Size returns the size of the uncompressed stream.
func (r *Reader) Size() int64 { return r.ix.UncompressedSize }

// ReadAt reads the uncompressed stream at off.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) {
	size := r.ix.UncompressedSize
	if off < 0 {
		return 0, fmt.Errorf("gzip index: read at negative offset %d", off)
	}
	if off >= size {
		return 0, io.EOF
	}
	want := len(p)
	if int64(len(p)) > size-off {
		p = p[:size-off]
	}
	n := 0
	for n < len(p) {
		at := off + int64(n)
		i := r.ix.find(at)
		s := spans.get(spanKey{r, i})
		k, err := s.read(r, i, p[n:], at-r.ix.Entries[i].Out)
		spans.settle(s)
		n += k
		if err != nil {
			return n, err
		}
	}
	if n < want {
		return n, io.EOF
	}
	return n, nil
}

// spanStep is how far past a read a span is inflated: a little ahead for the next read of a file, not so far that
// a random read waits for (and fetches) the span's whole compressed bytes.
const spanStep = 64 << 10

// read copies the bytes of span i (of r) at rel into p, inflating the span as far as they need.
func (s *span) read(r *Reader, i int, p []byte, rel int64) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.data == nil {
		if err := s.start(r, i); err != nil {
			return 0, err
		}
	}
	need := min(rel+int64(len(p)), int64(cap(s.data)))
	if need > int64(len(s.data)) {
		upto := min(max(need, int64(len(s.data))+spanStep), int64(cap(s.data)))
		have := len(s.data)
		k, err := io.ReadFull(s.inf, s.data[have:upto])
		s.data = s.data[:have+k]
		if err != nil {
			s.inf = nil
			s.data = nil
			return 0, r.streamErr(err, r.ix.Entries[i].Out+int64(have+k))
		}
		if len(s.data) == cap(s.data) {
			s.inf = nil // complete: the inflater's memory goes
		}
	}
	if rel >= int64(len(s.data)) {
		return 0, fmt.Errorf("gzip index: span %d ends at %d bytes, a read wants byte %d", i, len(s.data), rel)
	}
	return copy(p, s.data[rel:]), nil
}

// start opens span i: the stream from checkpoint i to the next (or the end), inflated as reads need it.
func (s *span) start(r *Reader, i int) error {
	e := r.ix.Entries[i]
	end := r.ix.UncompressedSize
	if i+1 < len(r.ix.Entries) {
		end = r.ix.Entries[i+1].Out
	}
	dict, err := r.ix.window(i)
	if err != nil {
		return err
	}
	start := e.In
	if e.Bits > 0 {
		start--
	}
	src := io.NewSectionReader(r.gz, start, r.ix.GzipFileSize-start)
	var first byte
	if e.Bits > 0 {
		var b [1]byte
		if _, err := io.ReadFull(src, b[:]); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("gzip index: reading the blob at %d: %w", start, err)
		}
		first = b[0]
	}
	s.inf = newInflater(src, dict, e.Bits, first)
	s.data = make([]byte, 0, end-e.Out)
	return nil
}

func (r *Reader) streamErr(err error, pos int64) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("gzip index: the deflate stream ends at %d, the index says %d: %w", pos, r.ix.UncompressedSize, io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("gzip index: inflating at %d: %w", pos, err)
}

// spanCache holds the spans of every Reader within SpanCacheBytes (a span counts its whole length, and an inflater
// while it has one), least recently used out first.
type spanCache struct {
	mu    sync.Mutex
	max   int64
	bytes int64
	lru   *list.List // of *span, most recent first
	m     map[spanKey]*list.Element
}

type spanKey struct {
	r *Reader
	i int
}

// span is the stream between two checkpoints, inflated from its start as far as reads have needed.
type span struct {
	key  spanKey
	mu   sync.Mutex
	data []byte    // inflated so far; its capacity is the span's length
	inf  *inflater // continues data; nil once the span is whole (or before it starts)
	cost int64     // what the cache counts for it
}

// inflaterCost is what a span's live inflater counts for in the cache: its window, input and Huffman tables.
const inflaterCost = 320 << 10

var spans = &spanCache{max: SpanCacheBytes, lru: list.New(), m: map[spanKey]*list.Element{}}

// get returns the span of k, new and empty if the cache does not hold it.
func (c *spanCache) get(k spanKey) *span {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[k]; ok {
		c.lru.MoveToFront(e)
		return e.Value.(*span)
	}
	s := &span{key: k}
	c.m[k] = c.lru.PushFront(s)
	return s
}

// settle recounts s after a read and evicts the least recently used spans beyond the bound.
func (c *spanCache) settle(s *span) {
	s.mu.Lock()
	cost := int64(cap(s.data))
	if s.inf != nil {
		cost += inflaterCost
	}
	s.mu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[s.key]
	if !ok || e.Value.(*span) != s {
		return // evicted meanwhile
	}
	c.bytes += cost - s.cost
	s.cost = cost
	for c.bytes > c.max && c.lru.Len() > 1 {
		back := c.lru.Back()
		if back == e {
			break
		}
		old := c.lru.Remove(back).(*span)
		delete(c.m, old.key)
		c.bytes -= old.cost
	}
}
