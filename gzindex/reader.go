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
		data, err := spans.get(spanKey{r, i}, func() ([]byte, error) { return r.inflate(i) })
		if err != nil {
			return n, err
		}
		k := copy(p[n:], data[at-r.ix.Entries[i].Out:])
		n += k
	}
	if n < want {
		return n, io.EOF
	}
	return n, nil
}

// inflate returns span i: the stream from checkpoint i to the next (or the end).
func (r *Reader) inflate(i int) ([]byte, error) {
	e := r.ix.Entries[i]
	end := r.ix.UncompressedSize
	if i+1 < len(r.ix.Entries) {
		end = r.ix.Entries[i+1].Out
	}
	dict, err := r.ix.window(i)
	if err != nil {
		return nil, err
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
			return nil, fmt.Errorf("gzip index: reading the blob at %d: %w", start, err)
		}
		first = b[0]
	}
	data := make([]byte, end-e.Out)
	if n, err := io.ReadFull(newInflater(src, dict, e.Bits, first), data); err != nil {
		return nil, r.streamErr(err, e.Out+int64(n))
	}
	return data, nil
}

func (r *Reader) streamErr(err error, pos int64) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("gzip index: the deflate stream ends at %d, the index says %d: %w", pos, r.ix.UncompressedSize, io.ErrUnexpectedEOF)
	}
	return fmt.Errorf("gzip index: inflating at %d: %w", pos, err)
}

// spanCache holds inflated spans of every Reader within SpanCacheBytes, least recently used out first. Readers of
// a span that is being inflated wait for it instead of inflating it again.
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

type span struct {
	key     spanKey
	ready   chan struct{}
	data    []byte
	err     error
	counted bool // its bytes are in the cache's total
}

var spans = &spanCache{max: SpanCacheBytes, lru: list.New(), m: map[spanKey]*list.Element{}}

func (c *spanCache) get(k spanKey, load func() ([]byte, error)) ([]byte, error) {
	c.mu.Lock()
	if e, ok := c.m[k]; ok {
		c.lru.MoveToFront(e)
		s := e.Value.(*span)
		c.mu.Unlock()
		<-s.ready
		return s.data, s.err
	}
	s := &span{key: k, ready: make(chan struct{})}
	c.m[k] = c.lru.PushFront(s)
	c.mu.Unlock()

	s.data, s.err = load()
	close(s.ready)

	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[k]
	switch {
	case !ok || e.Value.(*span) != s:
		// Evicted while it was inflated: not kept.
	case s.err != nil:
		c.remove(e) // a failed read is tried again next time
	default:
		s.counted = true
		c.bytes += int64(len(s.data))
		for c.bytes > c.max && c.lru.Len() > 1 {
			c.remove(c.lru.Back())
		}
	}
	return s.data, s.err
}

func (c *spanCache) remove(e *list.Element) {
	s := c.lru.Remove(e).(*span)
	delete(c.m, s.key)
	if s.counted {
		c.bytes -= int64(len(s.data))
	}
}
