package mounter

import (
	"context"
	"fmt"

	"github.com/obdproject/obd/internal/fsmeta"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/prefetch"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/trace"
)

// maxMetadataScan bounds the metadata (inode table) bytes a metadata prefetch reads to find directories.
const maxMetadataScan = 1 << 30

// startMetadataPrefetch prefetches the filesystem metadata of an attached image that has no recorded start: the
// inode tables first, then — read from them — the directories, extent tree nodes, extended attribute blocks and long
// symlinks, so that the path lookups and stats of a start find their blocks in the cache instead of each waiting
// for a round trip. Each phase is skipped when its blob ranges exceed what is left of Options.MetadataBytes, or
// when they are larger than the metadata itself: then the metadata is scattered among file data in the layers (not
// laid out by obd's converter), and fetching it would mostly fetch file data.
func (m *Mounter) startMetadataPrefetch(id string, img *mounted, layers []snapshotter.Layer, opened []*image.Layer, stack *lsmt.Stack) *prefetch.Job {
	pl := m.prefetchLayers(img, opened)
	log := m.opts.Logger.With("image", id)
	budget := m.opts.MetadataBytes
	var layout *fsmeta.Layout
	phase := 0
	// ranges maps extents of the disk to the blob ranges of the layers holding them, and keeps them if they fit the
	// budget and are dense enough.
	ranges := func(what string, es []fsmeta.Extent) []prefetch.Range {
		var recs []trace.Record
		var raw int64
		for _, e := range es {
			raw += e.Len
			stack.Locate(e.Off, e.Len, func(p lsmt.Piece) {
				// A TurboOCI layer's filesystem metadata is its metadata blob, fetched whole when it was opened.
				if layers[p.Layer].Target == "" {
					recs = append(recs, trace.Record{Op: trace.Read, Layer: uint32(p.Layer), Offset: p.Offset, Count: uint64(p.Length)})
				}
			})
		}
		plan := prefetch.Plan(pl, recs)
		var fetch int64
		for _, r := range plan {
			fetch += r.Size
		}
		l := log.With("what", what, "metadata_bytes", raw, "fetch_bytes", fetch)
		switch {
		case fetch > budget:
			l.Info("filesystem metadata not prefetched: more than [prefetch] metadata_mb", "left_bytes", budget)
			return nil
		case fetch > raw:
			l.Info("filesystem metadata not prefetched: it is scattered among file data in the image's layers")
			return nil
		}
		budget -= fetch
		l.Debug("prefetching filesystem metadata")
		return plan
	}
	next := func(ctx context.Context) ([]prefetch.Range, error) {
		phase++
		switch phase {
		case 1:
			var err error
			if layout, err = fsmeta.ReadLayout(stack, stack.VirtualSize()); err != nil {
				log.Info("filesystem metadata not prefetched", "err", err)
				return nil, nil
			}
			// No ranges end the prefetch: without the tables in the cache, the scan would read them on demand.
			return ranges("inode tables", layout.Tables()), nil
		case 2:
			es, err := layout.Scan(stack, maxMetadataScan)
			if err != nil {
				return nil, fmt.Errorf("find directories: %w", err)
			}
			return ranges("directories", es), nil
		}
		return nil, nil
	}
	opts := prefetch.Options{Concurrency: m.opts.PrefetchConcurrency, What: prefetch.WhatMetadata, Logger: log}
	if m.opts.Cache != nil {
		opts.Demand = m.opts.Cache.DemandFetches
	}
	return prefetch.StartPhases(context.Background(), pl, next, opts)
}
