package mounter

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/obdproject/obd/internal/atomicfile"
	"github.com/obdproject/obd/internal/cache"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/trace"
	"github.com/obdproject/obd/zfile"
)

// A start of an image on a node whose cache holds it is bound by decoding: the container's reads wait for the
// ZFile blocks they touch to be decompressed. So the node learns what each image's start reads: a start begins
// when a container's snapshot is prepared over the image (Starting) or a container's writable layer is attached,
// and its layer reads until the next start (LearnWindow and maxLearnedReads at most) are kept in Options.StartsDir
// (one file per image, named after its layers: trace.Start). When the next start begins, the blocks of that start, or of the image's
// recorded start (acceleration layer, registered profile) when it has one, are decoded in the order they were
// first read, on another core, into a pool of at most Options.PredecodeBytes, while the container is being
// created; the container's reads then copy them. Only blocks whose bytes are local are decoded: fetching is the
// prefetch's and the demand reads' business. The pool is dropped poolIdle after the start's reads stop taking
// blocks from it, LearnWindow after the start began at most; maxPredecoding starts are decoded ahead at once.

// LearnWindow is how long after a start begins its reads are learned, and how long its pool of decoded blocks is
// kept.
const LearnWindow = 30 * time.Second

// maxLearnedReads bounds the reads a start's learning records (and so its memory): a start is the first seconds of
// a container, not its bulk reads.
const maxLearnedReads = 1 << 17

// maxPredecoding bounds the starts decoded ahead at once on a node (each on a core of its own, each holding up to
// Options.PredecodeBytes), beside one image decoded ahead on its attach (decodeOnAttach): memory stays within
// (maxPredecoding+1) × PredecodeBytes. A start beyond is not decoded ahead.
const maxPredecoding = 2

// poolIdle is how long the decoded blocks of a start are kept once it stops reading them.
const poolIdle = 2 * time.Second

// predecodeStall bounds how long the decoding of a start waits for the container to read what it decoded: past
// it, this start does not follow the learned one, and the rest is left to the reads.
const predecodeStall = 5 * time.Second

// learnedPath returns the file of the learned start of the image of layers, or "" when starts are not learned.
func (m *Mounter) learnedPath(layers []snapshotter.Layer) string {
	if m.opts.StartsDir == "" || m.opts.PredecodeBytes <= 0 {
		return ""
	}
	return m.startFile(startLayers(layers))
}

// startFile names the learned start of the image of layers in StartsDir.
func (m *Mounter) startFile(layers []trace.StartLayer) string {
	h := sha256.New()
	for _, l := range layers {
		h.Write([]byte(l.Digest))
		h.Write([]byte{0})
		h.Write([]byte(l.Target))
		h.Write([]byte{0})
	}
	return filepath.Join(m.opts.StartsDir, hex.EncodeToString(h.Sum(nil)[:16])+".json")
}

func startLayers(layers []snapshotter.Layer) []trace.StartLayer {
	sl := make([]trace.StartLayer, len(layers))
	for i, l := range layers {
		sl[i] = trace.StartLayer{Digest: l.Digest, Target: string(l.Target)}
	}
	return sl
}

// maxStartFile bounds a learned start's file (a trace of MaxRecords, in base64, and its layers).
const maxStartFile = 40 << 20

// readStart reads and checks a learned start's file.
func readStart(path string) (trace.Start, []trace.Record, error) {
	f, err := os.Open(path)
	if err != nil {
		return trace.Start{}, nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxStartFile+1))
	if err != nil {
		return trace.Start{}, nil, err
	}
	if len(b) > maxStartFile {
		return trace.Start{}, nil, fmt.Errorf("learned start: more than %d bytes", maxStartFile)
	}
	return trace.ParseStart(b)
}

// learnedStart reads the learned start at path; a missing or unreadable one is no start.
func (m *Mounter) learnedStart(id, path string) []trace.Record {
	if path == "" {
		return nil
	}
	_, recs, err := readStart(path)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			m.opts.Logger.Warn("the image's learned start cannot be read: ignored", "image", id, "path", path, "err", err)
		}
		return nil
	}
	return recs
}

// LearnedStarts returns the starts this node learned (unreadable ones are logged and left out); for an image whose
// start is being learned, the reads of that start so far.
func (m *Mounter) LearnedStarts() []trace.Start {
	if m.opts.StartsDir == "" {
		return nil
	}
	starts := map[string]trace.Start{}
	paths, _ := filepath.Glob(filepath.Join(m.opts.StartsDir, "*.json"))
	for _, p := range paths {
		s, _, err := readStart(p)
		if err != nil {
			m.opts.Logger.Warn("a learned start cannot be read: left out", "path", p, "err", err)
			continue
		}
		starts[p] = s
	}
	m.mu.Lock()
	for _, img := range m.images {
		if l := img.learn.Load(); l != nil && !l.over.Load() {
			if s, err := l.start(); err == nil {
				starts[l.path] = s
			}
		}
	}
	m.mu.Unlock()
	out := make([]trace.Start, 0, len(starts))
	for _, p := range slices.Sorted(maps.Keys(starts)) {
		out = append(out, starts[p])
	}
	return out
}

// KeepLearnedStart checks s and keeps it as the learned start of its image (a start learned on another node, from
// a cache snapshot), in place of the one this node learned, if any.
func (m *Mounter) KeepLearnedStart(s trace.Start) error {
	if m.opts.StartsDir == "" || m.opts.PredecodeBytes <= 0 {
		return nil
	}
	if _, err := s.Records(); err != nil {
		return err
	}
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(m.opts.StartsDir, 0o755); err != nil {
		return err
	}
	if err := atomicfile.Write(m.startFile(s.Layers), b, 0o644); err != nil {
		return err
	}
	pruneStarts(m.opts.StartsDir, m.opts.Logger)
	return nil
}

// maxStarts bounds the learned starts a node keeps: those of the images it started last.
const maxStarts = 512

// pruneStarts removes the learned starts of dir beyond maxStarts, least recently written first.
func pruneStarts(dir string, log *slog.Logger) {
	paths, _ := filepath.Glob(filepath.Join(dir, "*.json"))
	if len(paths) <= maxStarts {
		return
	}
	type file struct {
		path string
		mod  time.Time
	}
	files := make([]file, 0, len(paths))
	for _, p := range paths {
		if fi, err := os.Stat(p); err == nil {
			files = append(files, file{p, fi.ModTime()})
		}
	}
	slices.SortFunc(files, func(a, b file) int { return a.mod.Compare(b.mod) })
	for _, f := range files[:max(0, len(files)-maxStarts)] {
		if err := os.Remove(f.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			log.Warn("cannot remove an old learned start", "path", f.path, "err", err)
		}
	}
}

// learning records the layer reads of an image's first LearnWindow after its attach.
type learning struct {
	path   string
	layers []trace.StartLayer
	r      *trace.Recorder
	log    *slog.Logger
	over   atomic.Bool
	reads  atomic.Int64
	timer  *time.Timer
	once   sync.Once
}

func newLearning(path string, layers []trace.StartLayer, log *slog.Logger) *learning {
	l := &learning{path: path, layers: layers, r: trace.NewRecorder(), log: log}
	l.timer = time.AfterFunc(LearnWindow, l.finish)
	return l
}

// observe records a read of layer i.
func (l *learning) observe(i int, off, n int64) {
	if !l.over.Load() && l.reads.Add(1) <= maxLearnedReads {
		l.r.Read(i, off, n)
	}
}

// finish ends the recording and writes what it saw (nothing when the image read nothing).
func (l *learning) finish() {
	l.once.Do(func() {
		l.over.Store(true)
		l.timer.Stop()
		s, err := l.start()
		if errors.Is(err, errNoReads) {
			return
		}
		var b []byte
		if err == nil {
			b, err = json.Marshal(s)
		}
		if err == nil {
			if err = os.MkdirAll(filepath.Dir(l.path), 0o755); err == nil {
				err = atomicfile.Write(l.path, b, 0o644)
			}
		}
		if err != nil {
			l.log.Warn("cannot keep the image's start for its next attach", "path", l.path, "err", err)
			return
		}
		pruneStarts(filepath.Dir(l.path), l.log)
		l.log.Debug("learned the image's start", "path", l.path, "bytes", len(s.Trace))
	})
}

var errNoReads = errors.New("no reads")

// start returns the start recorded so far.
func (l *learning) start() (trace.Start, error) {
	recs, _, _ := l.r.Records()
	if len(recs) == 0 {
		return trace.Start{}, errNoReads
	}
	var buf bytes.Buffer
	if err := trace.Encode(&buf, recs); err != nil {
		return trace.Start{}, err
	}
	return trace.Start{Layers: l.layers, Trace: buf.Bytes()}, nil
}

// predecoding decodes the blocks of an image's start ahead of its reads.
type predecoding struct {
	pool     *zfile.Predecoded
	cancel   context.CancelFunc
	finished chan struct{} // closed when the blocks are decoded (or the decoding stopped)
	loaded   chan struct{} // closed when the blocks kept on disk are loaded (or there were none)
	// progress is the number of records of the start decoded (or skipped); step receives after each.
	progress atomic.Int64
	step     chan struct{}
	done     chan struct{} // closed when the pool is no longer used
	stopping atomic.Bool   // stop was called: the pool's blocks stay, for the next start
	dropped  atomic.Bool   // the start was over before a next one: its pool is empty, its blocks kept on disk
	complete atomic.Bool   // its file of decoded blocks was loaded and its start decoded, without being stopped
	// prevUnsaved counts the blocks taken from the start before that its own start decoded (see unsaved).
	prevUnsaved int64
}

var _ snapshotter.Starter = (*Mounter)(nil)

// Starting tells the Mounter that a container is about to start over image id (see snapshotter.Starter).
func (m *Mounter) Starting(id string) {
	defer m.locks.Lock(id)()
	if img := m.image(id); img != nil {
		m.beginStart(id, img)
		m.track.attached(id, img)
	}
}

// beginStart begins a start of img: the start before it ends (its reads are kept as the image's learned start),
// the blocks of the recorded start, else of the learned one, are decoded ahead, and this start's reads are
// learned. The caller holds the image's lock.
func (m *Mounter) beginStart(id string, img *mounted) {
	if img.rec != nil || (img.learnPath == "" && len(img.replay) == 0) {
		return
	}
	prev := img.predecode // the start before: its pool's blocks, unless it was dropped
	if prev != nil {
		prev.stop()
		img.predecode = nil
	}
	ahead := img.replay
	if img.learnPath != "" {
		ahead = nil
		if l := img.learn.Load(); l != nil {
			l.finish()
			ahead, _, _ = l.r.Records() // what finish kept, without reading it back
		}
		if len(ahead) == 0 {
			ahead = m.learnedStart(id, img.learnPath) // the first start since the attach: a file of an earlier one
		}
		img.learn.Store(newLearning(img.learnPath, img.startLayers, m.opts.Logger.With("image", id)))
	}
	if m.opts.PredecodeBytes > 0 && (len(ahead) > 0 || m.opts.StartsDir != "") {
		// Without a start to follow, the pool only collects the blocks the start's reads decode, to be kept.
		img.predecode = m.startPredecode(id, img, img.opened, ahead, prev, m.predecodeSlots)
	}
	if img.priming != nil {
		img.priming.stop()
	}
	img.priming = m.startPriming(id, img, ahead, img.predecode, false)
}

// decodeOnAttach decodes the blocks of the image's recorded or learned start as soon as the image is attached (a
// pull attaches it: see the snapshotter's WithAttachOnPull), before a container starts over it: a start that
// begins while they are held takes them, and when none does, they are kept on disk for the next one (see
// decoded.go). One image is decoded so at a time (attachSlots); the image's memory bound is the same as a start's.
// The caller holds the image's lock.
func (m *Mounter) decodeOnAttach(id string, img *mounted) {
	if img.rec != nil || img.predecode != nil || m.opts.PredecodeBytes <= 0 {
		return
	}
	ahead := img.replay
	if img.learnPath != "" {
		ahead = m.learnedStart(id, img.learnPath)
	}
	if len(ahead) > 0 {
		img.predecode = m.startPredecode(id, img, img.opened, ahead, nil, m.attachSlots)
		if img.predecode != nil {
			img.planning = m.startPriming(id, img, ahead, img.predecode, true)
		}
	}
}

// startPredecode decodes the blocks of recs whose bytes are local into a new pool that the layers of img read
// from, and drops the pool LearnWindow later. The pool starts with the blocks of prev (the pool of the start
// before, nil when none), else with those kept on disk.
func (m *Mounter) startPredecode(id string, img *mounted, opened []*image.Layer, recs []trace.Record, prev *predecoding, slots chan struct{}) *predecoding {
	select {
	case slots <- struct{}{}:
	default:
		m.opts.Logger.Debug("no decoding ahead: other starts are being decoded ahead", "image", id, "at_once", cap(slots))
		return nil
	}
	pool := zfile.NewPredecoded(m.opts.PredecodeBytes)
	var prevUnsaved int64
	tookAll := false // the blocks of a start before that loaded and decoded all it had to
	if prev != nil && !prev.dropped.Load() {
		pool.Take(prev.pool)
		prevUnsaved = prev.unsaved()
		tookAll = prev.complete.Load()
	}
	for _, l := range opened {
		l.UsePredecoded(pool)
	}
	ctx, cancel := context.WithTimeout(context.Background(), LearnWindow)
	p := &predecoding{pool: pool, cancel: cancel, finished: make(chan struct{}), loaded: make(chan struct{}), step: make(chan struct{}, 1), done: make(chan struct{}), prevUnsaved: prevUnsaved}
	log := m.opts.Logger.With("image", id)
	// The blocks the image's last start held decoded, kept on disk (see decoded.go).
	var blocksPath string
	var digests []string
	if m.opts.StartsDir != "" && len(img.startLayers) == len(opened) {
		blocksPath = decodedPath(m.startFile(img.startLayers))
		for _, l := range img.startLayers {
			digests = append(digests, string(l.Digest))
		}
	}
	go func() {
		defer close(p.done)
		defer func() {
			for _, l := range opened {
				l.UsePredecoded(nil)
			}
			if !p.stopping.Load() {
				pool.Drop() // a next start that stops this one takes its blocks
				p.dropped.Store(true)
			}
			<-slots
			decoded, hits := pool.Stats()
			log.Debug("decoded blocks of the image's start dropped", "decoded", decoded, "reads_served", hits, "blocks_missed", pool.Missed())
		}()
		start := time.Now()
		var badBlocks bool
		if blocksPath != "" && !tookAll {
			// The blocks the pool took are skipped: a start stopped while it loaded the file is carried on.
			badBlocks = m.loadDecoded(ctx, blocksPath, digests, opened, pool)
		}
		close(p.loaded)
		var err error
		disk := diskAhead{caches: img.caches(), opened: opened, recs: recs}
		for i, rec := range recs {
			p.advance(i)
			if ctx.Err() != nil {
				break // stopped: a next start takes what is decoded
			}
			_, n, ok := disk.local(i)
			if !ok {
				continue
			}
			disk.issue(i)
			cctx, ccancel := context.WithTimeout(ctx, predecodeStall)
			err = opened[rec.Layer].Predecode(cctx, pool, rec.Offset, int64(rec.Count))
			ccancel()
			if err != nil {
				break
			}
			disk.decoded += n
		}
		if ctx.Err() == nil && err == nil {
			p.complete.Store(true)
		}
		decoded, hits := pool.Stats()
		switch {
		case len(recs) == 0 && pool.Loaded() == 0:
		case err == nil || ctx.Err() != nil:
			log.Info("decoded the blocks of the image's start ahead of its reads", "blocks", decoded, "loaded", pool.Loaded(),
				"reads_served", hits, "took", time.Since(start).Round(time.Millisecond))
		case errors.Is(err, context.DeadlineExceeded):
			log.Info("stopped decoding ahead: this start does not read what the last one did", "blocks", decoded, "reads_served", hits)
		default:
			log.Warn("stopped decoding ahead", "blocks", decoded, "err", err)
		}
		close(p.finished)
		// The pool is dropped once the start's reads stop taking blocks from it (or LearnWindow after it began).
		t := time.NewTicker(poolIdle / 4)
		defer t.Stop()
		last, idle := hits+pool.Offered(), time.Duration(0)
		for idle < poolIdle {
			select {
			case <-ctx.Done():
				if p.stopping.Load() {
					return // a next start takes the blocks, or the image is detached
				}
				idle = poolIdle // LearnWindow after the start began
				continue
			case <-t.C:
			}
			if _, h := pool.Stats(); h+pool.Offered() != last {
				last, idle = h+pool.Offered(), 0
			} else {
				idle += poolIdle / 4
			}
		}
		if blocksPath != "" {
			m.keepDecoded(img, p, blocksPath, badBlocks, digests, opened)
		}
	}()
	return p
}

// advance records that the first n records of the start are decoded.
func (p *predecoding) advance(n int) {
	p.progress.Store(int64(n))
	select {
	case p.step <- struct{}{}:
	default:
	}
}

// decoded waits until record i of the start is decoded or the decoding is over; false when ctx ends first.
func (p *predecoding) decoded(ctx context.Context, i int) bool {
	for p.progress.Load() <= int64(i) {
		select {
		case <-p.step:
		case <-p.finished:
			return true
		case <-ctx.Done():
			return false
		}
	}
	return true
}

// caches returns the block cache reader of each layer of img (nil for a layer without one).
func (img *mounted) caches() []*cache.Reader {
	cs := make([]*cache.Reader, len(img.layers))
	for i, l := range img.layers {
		cs[i] = l.cache
	}
	return cs
}

// diskReadAhead bounds the bytes of a start's blocks whose disk reads are issued ahead of their decoding.
const diskReadAhead = 16 << 20

// diskAhead issues the disk reads of the cached blocks of a start ahead of their decoding, up to diskReadAhead
// bytes ahead: the disk serves them together, in parallel, instead of one at a time as the decoding reaches them.
type diskAhead struct {
	caches  []*cache.Reader // by layer; nil for a layer without a cache
	opened  []*image.Layer
	recs    []trace.Record
	next    int   // the first record not issued
	issued  int64 // bytes issued
	decoded int64 // bytes of the records decoded
}

// local returns the range of the blob that record i reads when it is a read whose bytes are all local (cached,
// or a layer without a cache: a local file). It is asked again when the record is decoded: blocks fetched
// meanwhile (a recorded start's prefetch) are decoded too.
func (d *diskAhead) local(i int) (off, n int64, ok bool) {
	rec := d.recs[i]
	if rec.Op != trace.Read || int(rec.Layer) >= len(d.opened) || rec.Count == 0 {
		return 0, 0, false
	}
	return localRange(d.caches[rec.Layer], d.opened[rec.Layer], rec.Offset, int64(rec.Count))
}

// localRange returns the range of layer l's blob that holds the n bytes at off of the layer, when those bytes are
// all local: cached in c, or in a layer without a cache (c nil: a local file).
func localRange(c *cache.Reader, l *image.Layer, off, n int64) (boff, bn int64, ok bool) {
	boff, bn = l.BlobRange(off, n)
	if c != nil && (bn == 0 || !c.Cached(boff, bn)) {
		return 0, 0, false
	}
	return boff, bn, true
}

// issue issues the disk reads of the records from i on, while fewer than diskReadAhead bytes are issued and not
// decoded.
func (d *diskAhead) issue(i int) {
	d.next = max(d.next, i)
	for ; d.next < len(d.recs) && d.issued-d.decoded < diskReadAhead; d.next++ {
		off, n, ok := d.local(d.next)
		if !ok {
			continue
		}
		if c := d.caches[d.recs[d.next].Layer]; c != nil {
			c.WillNeed(off, n)
		}
		d.issued += n
	}
}

func (p *predecoding) info() *PredecodeInfo {
	blocks, hits := p.pool.Stats()
	info := &PredecodeInfo{Blocks: blocks, BlocksLoaded: p.pool.Loaded(), ReadsServed: hits, BlocksMissed: p.pool.Missed(), Running: true, Held: true}
	select {
	case <-p.finished:
		info.Running = false
	default:
	}
	select {
	case <-p.done:
		info.Held = false
	default:
	}
	return info
}

// unsaved returns the number of blocks of the pool that no file of decoded blocks holds: those this start and the
// starts whose blocks it took decoded.
func (p *predecoding) unsaved() int64 {
	decoded, _ := p.pool.Stats()
	return p.prevUnsaved + decoded + p.pool.Offered()
}

// stop ends the decoding and its pool's use; the pool keeps its blocks, for the next start.
func (p *predecoding) stop() {
	p.stopping.Store(true)
	p.cancel()
	<-p.done
}
