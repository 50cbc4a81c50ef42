package mounter

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	digest "github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/atomicfile"
	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/trace"
	"github.com/obdproject/obd/zfile"
)

// A start decoded ahead (see learn.go) costs a core for as long as zstd takes: a warm python start decoded 600
// ZFile blocks (38 MiB) in 0.15–0.2 s of the daemon's 0.3 s of CPU, while runc and the container's first process
// wanted both cores. So a start's decoding is not thrown away:
//
//   - A start's pool also keeps a copy of each block its reads decoded themselves (a first start, with nothing to
//     follow, has a pool for that alone), so that it ends up holding what the start decoded.
//   - A start that begins while the pool of the one before is held (its reads took blocks in the last poolIdle)
//     takes that pool's blocks.
//   - Once a start is over (its reads stopped taking blocks from the pool for poolIdle, or LearnWindow passed), the
//     blocks its pool holds are written beside the image's learned start (<hash>.blocks next to <hash>.json in
//     Options.StartsDir) when that file is missing or bad or holds less than 1-decodedRewrite of them, and the pool
//     is dropped. The next start loads that file into its pool, in the order the blocks were decoded, before it
//     decodes what the file lacks: a sequential read instead of zstd. The maxDecodedStarts files written last are
//     kept, each at most Options.PredecodeBytes of blocks.
//   - A node that imports a cache snapshot writes the file of each start the snapshot brings, decoding the
//     imported blocks (DecodeStart): the image's first start on that node loads them too.
//
// The file: decodedMagic; the image's layers (a uint32 count, then each layer's digest as a uint16 length and its
// bytes); then one record per block: the layer's index (uint32), the block's number (uint64), its length
// (uint32), the CRC32C of its bytes (uint32), its bytes; integers little-endian. A file whose layers are not the
// image's is not used; loading stops at the first record that does not check (the blocks before it are used), and
// the file is written again when the start is over.

const decodedMagic = "obd decoded start 1\n"

// maxDecodedStarts bounds the files of decoded blocks a node keeps: those of the images started last.
const maxDecodedStarts = 16

// decodedRewrite: a start's blocks are written again when it decoded at least this share of the blocks it loaded.
const decodedRewrite = 0.1

// maxDecodedBlock bounds a record's length (ZFile blocks are at most 1 MiB).
const maxDecodedBlock = 1 << 20

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// decodedPath names the file of decoded blocks of the start whose learned start is at startPath.
func decodedPath(startPath string) string {
	return strings.TrimSuffix(startPath, ".json") + ".blocks"
}

// writeDecoded writes to w the blocks (zfile.Predecoded.Held's) of the layers of an image (digests, by index).
func writeDecoded(w io.Writer, digests []string, blocks []zfile.HeldBlock) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	bw.WriteString(decodedMagic)
	var hdr [20]byte
	binary.LittleEndian.PutUint32(hdr[:4], uint32(len(digests)))
	bw.Write(hdr[:4])
	for _, d := range digests {
		binary.LittleEndian.PutUint16(hdr[:2], uint16(len(d)))
		bw.Write(hdr[:2])
		bw.WriteString(d)
	}
	for _, b := range blocks {
		binary.LittleEndian.PutUint32(hdr[0:], uint32(b.Reader))
		binary.LittleEndian.PutUint64(hdr[4:], uint64(b.Block))
		binary.LittleEndian.PutUint32(hdr[12:], uint32(len(b.Data)))
		binary.LittleEndian.PutUint32(hdr[16:], crc32.Checksum(b.Data, castagnoli))
		bw.Write(hdr[:])
		if _, err := bw.Write(b.Data); err != nil {
			return err
		}
	}
	return bw.Flush()
}

// saveDecoded writes blocks to the file of decoded blocks at path (mode 0600: image content, as the cache's data
// files) and prunes the files of other images.
func (m *Mounter) saveDecoded(path string, digests []string, blocks []zfile.HeldBlock) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if err := atomicfile.Replace(path, 0o600, func(f *os.File) error { return writeDecoded(f, digests, blocks) }); err != nil {
		return err
	}
	pruneDecoded(filepath.Dir(path), m.opts.Logger.Warn)
	return nil
}

// readDecoded reads a file of decoded blocks from r and calls add with each block, in order, after checking that
// the file's layers are digests and the block's CRC32C. At most maxBytes of blocks are read. It returns the number
// of blocks added; an error says what did not check, or is add's.
func readDecoded(r io.Reader, digests []string, maxBytes int64, add func(layer int, block int64, data []byte) error) (int, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	magic := make([]byte, len(decodedMagic))
	if _, err := io.ReadFull(br, magic); err != nil || string(magic) != decodedMagic {
		return 0, errors.New("decoded blocks: not a file of decoded blocks")
	}
	var hdr [20]byte
	if _, err := io.ReadFull(br, hdr[:4]); err != nil {
		return 0, fmt.Errorf("decoded blocks: layers: %w", noEOF(err))
	}
	if n := binary.LittleEndian.Uint32(hdr[:4]); n != uint32(len(digests)) {
		return 0, fmt.Errorf("decoded blocks: %d layers, the image has %d", n, len(digests))
	}
	for i, want := range digests {
		if _, err := io.ReadFull(br, hdr[:2]); err != nil {
			return 0, fmt.Errorf("decoded blocks: layer %d: %w", i, noEOF(err))
		}
		d := make([]byte, binary.LittleEndian.Uint16(hdr[:2]))
		if _, err := io.ReadFull(br, d); err != nil {
			return 0, fmt.Errorf("decoded blocks: layer %d: %w", i, noEOF(err))
		}
		if string(d) != want {
			return 0, fmt.Errorf("decoded blocks: layer %d is %.80q, the image's is %s", i, d, want)
		}
	}
	var n int
	var total int64
	for {
		if _, err := io.ReadFull(br, hdr[:]); err == io.EOF {
			return n, nil
		} else if err != nil {
			return n, fmt.Errorf("decoded blocks: record %d: %w", n, noEOF(err))
		}
		layer := binary.LittleEndian.Uint32(hdr[0:])
		block := binary.LittleEndian.Uint64(hdr[4:])
		size := binary.LittleEndian.Uint32(hdr[12:])
		sum := binary.LittleEndian.Uint32(hdr[16:])
		switch {
		case layer >= uint32(len(digests)):
			return n, fmt.Errorf("decoded blocks: record %d: layer %d of %d", n, layer, len(digests))
		case block > 1<<40:
			return n, fmt.Errorf("decoded blocks: record %d: block %d", n, block)
		case size == 0 || size > maxDecodedBlock:
			return n, fmt.Errorf("decoded blocks: record %d: %d bytes", n, size)
		case total+int64(size) > maxBytes:
			return n, nil // the pool's bound may have shrunk since the file was written
		}
		data := make([]byte, size)
		if _, err := io.ReadFull(br, data); err != nil {
			return n, fmt.Errorf("decoded blocks: record %d: %w", n, noEOF(err))
		}
		if crc32.Checksum(data, castagnoli) != sum {
			return n, fmt.Errorf("decoded blocks: record %d (layer %d, block %d): CRC mismatch", n, layer, block)
		}
		if err := add(int(layer), int64(block), data); err != nil {
			return n, err
		}
		n++
		total += int64(size)
	}
}

// noEOF turns the end of a file inside a structure into io.ErrUnexpectedEOF.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// zfileReaders returns the ZFile reader of each layer (nil for a layer that has none).
func zfileReaders(opened []*image.Layer) []*zfile.Reader {
	zs := make([]*zfile.Reader, len(opened))
	for i, l := range opened {
		zs[i] = l.ZFile()
	}
	return zs
}

// loadDecoded adds the blocks kept at path to pool; a missing file loads nothing, a bad one is logged and what it
// held before the fault is kept. It reports whether the file needs writing again (it is bad).
func (m *Mounter) loadDecoded(ctx context.Context, path string, digests []string, opened []*image.Layer, pool *zfile.Predecoded) (bad bool) {
	f, err := os.Open(path)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			m.opts.Logger.Warn("the image's decoded start cannot be read: ignored", "path", path, "err", err)
			return true
		}
		return false
	}
	defer f.Close()
	zs := zfileReaders(opened)
	_, err = readDecoded(f, digests, m.opts.PredecodeBytes, func(layer int, block int64, data []byte) error {
		if zs[layer] == nil {
			return fmt.Errorf("decoded blocks: layer %d is not a ZFile", layer)
		}
		if err := ctx.Err(); err != nil {
			return err // stopped: a next start takes what is loaded
		}
		return zs[layer].AddPredecoded(ctx, pool, block, data)
	})
	if err != nil && ctx.Err() == nil {
		m.opts.Logger.Warn("the image's decoded start is damaged: using the blocks before the damage", "path", path, "err", err)
		return true
	}
	return false
}

// keepDecoded writes the blocks the pool of p holds to path when the file is bad or missing or when the blocks
// decoded since it was written are at least a decodedRewrite share of them, and prunes the files of other images.
// It takes the list of blocks at once and writes them in the background (img.keeping counts it): the pool may be
// dropped meanwhile.
func (m *Mounter) keepDecoded(img *mounted, p *predecoding, path string, bad bool, digests []string, opened []*image.Layer) {
	blocks := p.pool.Held(zfileReaders(opened))
	if len(blocks) == 0 {
		return
	}
	_, statErr := os.Stat(path)
	if unsaved := p.unsaved(); !bad && statErr == nil && (unsaved == 0 || float64(unsaved) < decodedRewrite*float64(len(blocks))) {
		return
	}
	img.keeping.Add(1)
	go func() {
		defer img.keeping.Done()
		if err := m.saveDecoded(path, digests, blocks); err != nil {
			m.opts.Logger.Warn("cannot keep the image's decoded start", "path", path, "err", err)
		}
	}()
}

// pruneDecoded removes the files of decoded blocks of dir beyond maxDecodedStarts, least recently written first.
func pruneDecoded(dir string, warn func(msg string, args ...any)) {
	paths, _ := filepath.Glob(filepath.Join(dir, "*.blocks"))
	if len(paths) <= maxDecodedStarts {
		return
	}
	mod := map[string]time.Time{}
	for _, p := range paths {
		if fi, err := os.Stat(p); err == nil {
			mod[p] = fi.ModTime()
		}
	}
	slices.SortFunc(paths, func(a, b string) int { return mod[a].Compare(mod[b]) })
	for _, p := range paths[:len(paths)-maxDecodedStarts] {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			warn("cannot remove an old decoded start", "path", p, "err", err)
		}
	}
}

// DecodeStarts decodes the learned starts an import brought (see DecodeStart), one after another, at most as many
// as the node keeps files of decoded blocks for; a start that cannot be decoded is logged and left to its image's
// first start.
func (m *Mounter) DecodeStarts(ctx context.Context, starts []trace.Start) {
	for _, s := range starts[:min(len(starts), maxDecodedStarts)] {
		if err := m.DecodeStart(ctx, s); err != nil {
			m.opts.Logger.Warn("an imported start is not decoded ahead: its image's first start decodes it", "err", err)
		}
	}
}

// DecodeStart decodes the blocks of learned start s, whose layer blobs the cache holds, into the image's file of
// decoded blocks, as its first start on this node would have decoded and kept them: an import of a cache snapshot
// brings an image's blocks and its learned start, and its first start then loads the decoded blocks instead of
// running zstd while the container is created. Only ZFile layers in the cache are read (a missing block is never
// fetched: its records are left out), at most Options.PredecodeBytes of blocks, in the start's order. A start
// with a TurboOCI layer, or whose file of decoded blocks exists, is left alone.
func (m *Mounter) DecodeStart(ctx context.Context, s trace.Start) error {
	if m.opts.StartsDir == "" || m.opts.PredecodeBytes <= 0 || m.opts.Cache == nil {
		return nil
	}
	path := decodedPath(m.startFile(s.Layers))
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	recs, err := s.Records()
	if err != nil {
		return err
	}
	sizes := map[digest.Digest]int64{}
	for _, b := range m.opts.Cache.Blobs() {
		sizes[b.Digest] = b.Size
	}
	opened := make([]*image.Layer, len(s.Layers))
	caches := make([]*cache.Reader, len(s.Layers))
	digests := make([]string, len(s.Layers))
	for i, l := range s.Layers {
		size, ok := sizes[l.Digest]
		if l.Target != "" || !ok {
			return nil // TurboOCI, or not in the cache
		}
		caches[i] = m.opts.Cache.Reader(l.Digest, size, notCached{})
		name := snapshotter.Layer{Digest: l.Digest}
		if opened[i], err = image.OpenLayer(annotate(caches[i], name), size, image.LayerOptions{Verify: true}); err != nil {
			return fmt.Errorf("layer %d (%s): %w", i, l.Digest, err)
		}
		digests[i] = string(l.Digest)
	}
	pool := zfile.NewPredecoded(m.opts.PredecodeBytes)
	disk := diskAhead{caches: caches, opened: opened, recs: recs}
	for i, rec := range recs {
		if _, _, ok := disk.local(i); !ok {
			continue
		}
		z := opened[rec.Layer].ZFile()
		if z == nil {
			continue
		}
		if int64(rec.Count)+2*int64(z.Info().BlockSize) > pool.Room() {
			break // full: Predecode would wait for reads to make room
		}
		if err := opened[rec.Layer].Predecode(ctx, pool, rec.Offset, int64(rec.Count)); err != nil {
			return err
		}
	}
	blocks := pool.Held(zfileReaders(opened))
	if len(blocks) == 0 {
		return nil
	}
	if err := m.saveDecoded(path, digests, blocks); err != nil {
		return err
	}
	m.opts.Logger.Info("decoded the blocks of an imported start", "path", path, "blocks", len(blocks))
	return nil
}

// notCached is the source of a cache reader that reads only what the cache holds.
type notCached struct{}

func (notCached) ReadAt([]byte, int64) (int, error) {
	return 0, errors.New("not in the cache (decoding an imported start fetches nothing)")
}
