package status

import (
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/obdproject/obd/internal/units"
)

// WriteText writes st for people, as 'obd status' prints it: a header and a table of images, then a line per
// image saying why it is served as it is.
func WriteText(w io.Writer, st *Status) {
	up := (time.Duration(st.UptimeSeconds) * time.Second).String()
	fmt.Fprintf(w, "obd-snapshotter %s (pid %d), up %s, config %s\n", st.Version, st.PID, up, st.Config.File)
	metrics := "metrics only on the status socket"
	if st.Config.MetricsAddress != "" {
		metrics = "metrics http://" + st.Config.MetricsAddress + "/metrics"
	}
	fmt.Fprintf(w, "  socket %s, status %s, %s\n", st.Config.Address, st.Config.StatusAddress, metrics)
	c := st.Cache
	fmt.Fprintf(w, "  cache %s: %s of %s (%.0f%%), %d blobs, hit ratio %s\n", c.Dir, units.Bytes(c.UsedBytes), units.Bytes(c.CapacityBytes),
		100*float64(c.UsedBytes)/float64(max(c.CapacityBytes, 1)), c.Blobs, ratio(HitRatio(c.Hits, c.Misses)))
	r := st.Reads
	fmt.Fprintf(w, "  device reads %d: %d failed, %d slow (≥ %d ms), %d in flight, %d hung\n", r.Total, r.Errors, r.Slow, st.Config.SlowReadMS, r.InFlight, r.Hung)
	for _, warning := range st.Warnings {
		fmt.Fprintf(w, "  warning: %s\n", warning)
	}
	fmt.Fprintln(w)
	if len(st.Images) == 0 {
		fmt.Fprintln(w, "No images in use.")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tIMAGE\tMODE\tSTATE\tLAYERS\tFETCHED\tCACHE HITS\tREADS\tSNAPSHOTS")
	for _, img := range st.Images {
		ref := img.ImageRef
		if ref == "" {
			ref = "-"
		}
		layers, fetched, hits, reads := "-", "-", "-", "-"
		if img.Mode != ModeOverlayfs && img.Mode != ModeInvalid {
			layers = layerSummary(img.Layers)
			fetched = units.Bytes(img.BytesFetched)
			hits = ratio(img.CacheHitRatio)
			reads = fmt.Sprint(img.Reads)
			if img.HungReads > 0 {
				reads += fmt.Sprintf(" (%d hung)", img.HungReads)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", img.ID, ref, img.Mode, img.State, layers, fetched, hits, reads, len(img.Snapshots))
	}
	tw.Flush()
	fmt.Fprintln(w)
	for _, img := range st.Images {
		fmt.Fprintf(w, "%s: %s\n", img.ID, img.Reason)
		if img.Error != "" {
			fmt.Fprintf(w, "%s: error: %s\n", img.ID, img.Error)
		}
		if p := img.Prefetch; p != nil {
			state := jobState(p.Running, p.Error, "stopped")
			what := p.What
			if what == "" {
				what = "recorded start"
			}
			fmt.Fprintf(w, "%s: prefetch of its %s %s: %d of %d ranges, %s of %s in %.1f s\n", img.ID, what, state,
				p.DoneRanges, p.Ranges, units.Bytes(p.DoneBytes), units.Bytes(p.Bytes), p.Seconds)
		}
		if p := img.Predecode; p != nil {
			state := "dropped"
			switch {
			case p.Running:
				state = "decoding"
			case p.Held:
				state = "held"
			}
			fmt.Fprintf(w, "%s: start decoded ahead (%s): %d blocks (%d decoded, %d kept decoded from the last start), %d reads served from them, %d blocks decoded by the reads\n",
				img.ID, state, p.Blocks+p.BlocksLoaded, p.Blocks, p.BlocksLoaded, p.ReadsServed, p.BlocksMissed)
		}
		if p := img.Prime; p != nil {
			state := jobState(p.Running, p.Error, "failed")
			fmt.Fprintf(w, "%s: page cache primed with its start (%s): %s of %d files, %s of metadata\n",
				img.ID, state, units.Bytes(p.FileBytes), p.Files, units.Bytes(p.MetadataBytes))
		}
		if img.Recording != "" {
			fmt.Fprintf(w, "%s: recording its reads into %s\n", img.ID, img.Recording)
		}
		for _, wl := range img.Writable {
			fmt.Fprintf(w, "%s: writable layer of %s (%s), %s: %s written", img.ID, wl.Snapshot, wl.Mode, wl.State, units.Bytes(wl.DataBytes))
			if wl.Quota > 0 {
				fmt.Fprintf(w, " of a %s quota", units.Bytes(wl.Quota))
			}
			if wl.Device != "" {
				fmt.Fprintf(w, ", device %s", wl.Device)
			}
			if wl.Mountpoint != "" {
				fmt.Fprintf(w, " mounted at %s", wl.Mountpoint)
			}
			fmt.Fprintln(w)
		}
	}
}

// layerSummary says how many layers an image has and where they are read from.
func layerSummary(layers []Layer) string {
	local := 0
	for _, l := range layers {
		if l.Source == "local" {
			local++
		}
	}
	switch {
	case len(layers) == 0:
		return "-"
	case local == 0:
		return fmt.Sprintf("%d remote", len(layers))
	case local == len(layers):
		return fmt.Sprintf("%d local", len(layers))
	}
	return fmt.Sprintf("%d remote, %d local", len(layers)-local, local)
}

// ratio formats a hit ratio as a percentage, "-" when there is none.
func ratio(r *float64) string {
	if r == nil {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", 100**r)
}

// jobState names the state of a background job of an image: running, done, or ended by err (ended: its verb).
func jobState(running bool, err, ended string) string {
	switch {
	case running:
		return "running"
	case err != "":
		return ended + ": " + err
	}
	return "done"
}
