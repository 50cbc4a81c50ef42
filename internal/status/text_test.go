package status

import (
	"strings"
	"testing"
)

func TestWriteText(t *testing.T) {
	hit := 0.5
	st := &Status{
		Version: "v1", PID: 9, UptimeSeconds: 90,
		Config: Config{File: "/etc/obd/obd.toml", Address: "/run/obd/s.sock", StatusAddress: "/run/obd/s.status.sock", SlowReadMS: 500},
		Cache:  Cache{Dir: "/cache", UsedBytes: 1 << 20, CapacityBytes: 4 << 20, Blobs: 1, Hits: 1, Misses: 1},
		Reads:  Reads{Total: 10, Slow: 1},
		Images: []Image{
			{ID: "5", ImageRef: "r/app:obd", Mode: ModeMixed, State: StateAttached, Reason: "why", CacheHitRatio: &hit, Reads: 3, HungReads: 1,
				Layers:    []Layer{{Source: "local"}, {Source: "remote"}},
				Prefetch:  &Prefetch{Ranges: 4, DoneRanges: 2, Bytes: 2 << 20, DoneBytes: 1 << 20, Running: true, Seconds: 1.25},
				Recording: "/tmp/trace",
				Writable: []Writable{
					{Snapshot: "c1", Mode: "dir", State: StateAttached, Device: "/dev/loop7", Mountpoint: "/m/7", DataBytes: 3 << 20, Quota: 1 << 30},
					{Snapshot: "vm", Mode: "dev", State: StateNotAttached, DataBytes: 0},
				}},
			{ID: "n", Mode: ModeOverlayfs, Reason: "plain", Error: "boom"},
			{ID: "m", Mode: ModeLazy, Reason: "lazy", Prefetch: &Prefetch{What: "filesystem metadata", Ranges: 7, DoneRanges: 7, Bytes: 3 << 19, DoneBytes: 3 << 19, Seconds: 0.08},
				Predecode: &Predecode{Blocks: 655, BlocksLoaded: 40, ReadsServed: 1200, BlocksMissed: 3, Held: true},
				Prime:     &Prime{Files: 177, FileBytes: 25 << 20, MetadataBytes: 3 << 19, Error: "open inode 12: permission denied"}},
		},
		Warnings: []string{"metadata unreadable"},
	}
	var b strings.Builder
	WriteText(&b, st)
	out := b.String()
	for _, want := range []string{
		"obd-snapshotter v1 (pid 9), up 1m30s, config /etc/obd/obd.toml\n",
		"metrics only on the status socket",
		"cache /cache: 1.0 MiB of 4.0 MiB (25%), 1 blobs, hit ratio 50.0%",
		"device reads 10: 0 failed, 1 slow (≥ 500 ms)",
		"  warning: metadata unreadable\n",
		"1 remote, 1 local", "3 (1 hung)",
		"5: why\n", "n: plain\n", "n: error: boom\n",
		"5: prefetch of its recorded start running: 2 of 4 ranges, 1.0 MiB of 2.0 MiB in 1.2 s",
		"5: recording its reads into /tmp/trace\n",
		"m: start decoded ahead (held): 695 blocks (655 decoded, 40 kept decoded from the last start), 1200 reads served from them, 3 blocks decoded by the reads\n",
		"m: page cache primed with its start (failed: open inode 12: permission denied): 25.0 MiB of 177 files, 1.5 MiB of metadata\n",
		"m: prefetch of its filesystem metadata done: 7 of 7 ranges, 1.5 MiB of 1.5 MiB in 0.1 s\n",
		"5: writable layer of c1 (dir), attached: 3.0 MiB written of a 1.0 GiB quota, device /dev/loop7 mounted at /m/7\n",
		"5: writable layer of vm (dev), not attached: 0 B written\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("WriteText wrote\n%s\nwithout %q", out, want)
		}
	}

	b.Reset()
	WriteText(&b, &Status{Version: "v1"})
	if !strings.HasSuffix(b.String(), "\nNo images in use.\n") {
		t.Errorf("no images: %q", b.String())
	}
}

func TestLayerSummary(t *testing.T) {
	for _, tc := range []struct {
		layers []Layer
		want   string
	}{
		{nil, "-"},
		{[]Layer{{Source: "remote"}, {Source: "remote"}}, "2 remote"},
		{[]Layer{{Source: "local"}}, "1 local"},
		{[]Layer{{Source: "local"}, {Source: "remote"}, {Source: "remote"}}, "2 remote, 1 local"},
	} {
		if got := layerSummary(tc.layers); got != tc.want {
			t.Errorf("layerSummary(%v) = %q, want %q", tc.layers, got, tc.want)
		}
	}
}
