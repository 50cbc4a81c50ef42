package main

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/obdproject/obd/bench/internal/measure"
	"github.com/obdproject/obd/internal/status"
)

// clockTicks is the unit of utime and stime in /proc/PID/stat (USER_HZ, 100 on Linux for every architecture Go
// supports).
const clockTicks = 100

// daemonUsage is obd-snapshotter's CPU time at one moment.
type daemonUsage struct {
	pid int
	cpu float64 // seconds of user + system time
}

// usageMark is what endUsage measures from: the daemon's CPU time and metrics (obd cases) and the disk's reads.
type usageMark struct {
	daemon  *daemonUsage
	metrics map[string]float64
	disk    measure.DiskReads
	diskErr error
}

// markUsage marks the start of what a case measures: the run, after any setup the case does first.
func (b *bench) markUsage(obd bool) {
	b.usage = usageMark{}
	if obd {
		d := b.daemonStart()
		b.usage.daemon = &d
		b.usage.metrics = b.scrape()
	}
	b.usage.disk, b.usage.diskErr = b.diskReads()
}

// endUsage records into smp the daemon's CPU time and peak RSS and the disk's reads since markUsage.
func (b *bench) endUsage(smp *sample) {
	if d := b.usage.daemon; d != nil {
		b.daemonEnd(*d, smp)
		if m0, m1 := b.usage.metrics, b.scrape(); m0 != nil && m1 != nil {
			smp.DeviceReads = int64(m1["obd_device_reads_total"] - m0["obd_device_reads_total"])
			smp.DeviceReadSeconds = m1["obd_device_read_duration_seconds_sum"] - m0["obd_device_read_duration_seconds_sum"]
			const api = `obd_grpc_request_duration_seconds_sum{method="`
			for k, v := range m1 {
				if method, ok := strings.CutPrefix(k, api); ok && v > m0[k] {
					if smp.SnapshotsAPISeconds == nil {
						smp.SnapshotsAPISeconds = map[string]float64{}
					}
					smp.SnapshotsAPISeconds[strings.TrimSuffix(method, `"}`)] = v - m0[k]
				}
			}
		}
		if st, err := status.NewClient(b.sb.StatusSocket, 10*time.Second).Status(b.ctx); err == nil {
			for _, im := range st.Images {
				if p := im.Predecode; p != nil {
					smp.Predecoded += p.Blocks
					smp.PredecodeLoaded += p.BlocksLoaded
					smp.PredecodeMissed += p.BlocksMissed
				}
				if p := im.Prime; p != nil {
					smp.PrimedFileBytes += p.FileBytes
					smp.PrimedMetadataBytes += p.MetadataBytes
				}
			}
		}
	}
	if after, err := b.diskReads(); err == nil && b.usage.diskErr == nil {
		smp.DiskReads, smp.DiskReadBytes = after.Reads-b.usage.disk.Reads, after.Bytes-b.usage.disk.Bytes
	}
}

// scrape returns obd-snapshotter's metrics by series (name and labels as exposed), nil when they cannot be read.
func (b *bench) scrape() map[string]float64 {
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+b.sb.Metrics+"/metrics", nil)
	if err != nil {
		return nil
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		logf("obd-snapshotter's metrics: %v", err)
		return nil
	}
	defer resp.Body.Close()
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		i := strings.LastIndexByte(line, ' ')
		if strings.HasPrefix(line, "#") || i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			m[line[:i]] = v
		}
	}
	if err := sc.Err(); err != nil || resp.StatusCode != http.StatusOK {
		logf("obd-snapshotter's metrics: %s, %v", resp.Status, err)
		return nil
	}
	return m
}

// diskReads reads the statistics of the disk holding the sandbox.
func (b *bench) diskReads() (measure.DiskReads, error) {
	f, err := measure.DiskOf(b.sb.Dir)
	if err != nil {
		return measure.DiskReads{}, err
	}
	return measure.ReadDisk(f)
}

// daemonStart reads obd-snapshotter's CPU time and resets its peak RSS (VmHWM), at the start of a case.
func (b *bench) daemonStart() daemonUsage {
	pid := b.sb.SnapshotterPID()
	if pid == 0 {
		return daemonUsage{}
	}
	// "5" resets the peak resident set size (proc(5), clear_refs).
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		logf("reset obd-snapshotter's peak RSS: %v", err)
	}
	cpu, err := procCPUSeconds(pid)
	if err != nil {
		logf("obd-snapshotter's CPU time: %v", err)
	}
	return daemonUsage{pid: pid, cpu: cpu}
}

// daemonEnd records into smp the CPU time obd-snapshotter used since before and its peak RSS.
func (b *bench) daemonEnd(before daemonUsage, smp *sample) {
	if before.pid == 0 || b.sb.SnapshotterPID() != before.pid {
		logf("obd-snapshotter was restarted during the case: no CPU or memory figures")
		return
	}
	cpu, err := procCPUSeconds(before.pid)
	if err != nil {
		logf("obd-snapshotter's CPU time: %v", err)
		return
	}
	smp.DaemonCPUSeconds = cpu - before.cpu
	if smp.DaemonPeakRSS, err = procHWM(before.pid); err != nil {
		logf("obd-snapshotter's peak RSS: %v", err)
	}
}

// procCPUSeconds returns the user + system time of a process (its threads included, its children not).
func procCPUSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces: count fields after its closing parenthesis.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// After the name: state (3), ..., utime (14), stime (15).
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f)+2)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: utime %q, stime %q", pid, f[11], f[12])
	}
	return float64(ut+st) / clockTicks, nil
}

// procHWM returns a process's peak resident set size (VmHWM) in bytes.
func procHWM(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmHWM", pid)
}
