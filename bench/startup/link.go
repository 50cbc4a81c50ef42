package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// shapedLink is a network namespace ("router") joined to this host by a veth pair whose two ends each carry a tbf
// qdisc at the link's rate. A relay listening inside the namespace forwards to the registry on the host's
// loopback, holding the data of each direction for half the round-trip time, so a client on the host that talks
// to Addr sees the registry through a link of the given bandwidth and latency.
//
//	client (host) ──veth, tbf──► relay (router namespace, +RTT/2 each way) ──loopback──► counting proxy ─► registry
type shapedLink struct {
	NS           string // network namespace name
	HostIf, NSIf string // veth ends
	HostIP, NSIP string
	RateBits     int64 // 0: unshaped
	RTT          time.Duration
	Addr         string // relay address (NSIP:port): the registry host clients use
	relay        *relay
	created      []func() error // undo steps, last first
}

const (
	nsPrefix   = "obdbench-"
	vethPrefix = "obdb"
	relayPort  = 5000
)

// newLink names the link's namespace, interfaces and addresses; start creates them.
func newLink(rateBits int64, rtt time.Duration) (*shapedLink, error) {
	pid := os.Getpid()
	subnet, err := freeSubnet(pid)
	if err != nil {
		return nil, err
	}
	l := &shapedLink{
		NS: nsPrefix + strconv.Itoa(pid), HostIf: fmt.Sprintf("%s%dh", vethPrefix, pid), NSIf: fmt.Sprintf("%s%dn", vethPrefix, pid),
		HostIP: subnet + ".1", NSIP: subnet + ".2", RateBits: rateBits, RTT: rtt,
	}
	l.Addr = net.JoinHostPort(l.NSIP, strconv.Itoa(relayPort))
	return l, nil
}

// start builds the namespace, veth pair, qdiscs and the relay in front of upstream (host:port on loopback). On
// failure it removes what it made.
func (l *shapedLink) start(ctx context.Context, upstream string, logf func(string, ...any)) error {
	sweepStale(ctx, logf)
	if err := l.setup(ctx, upstream); err != nil {
		return errors.Join(err, l.Close())
	}
	return nil
}

func (l *shapedLink) setup(ctx context.Context, upstream string) error {
	steps := []struct {
		args []string
		undo []string
	}{
		{[]string{"ip", "netns", "add", l.NS}, []string{"ip", "netns", "del", l.NS}},
		{[]string{"ip", "link", "add", l.HostIf, "type", "veth", "peer", "name", l.NSIf, "netns", l.NS}, []string{"ip", "link", "del", l.HostIf}},
		{[]string{"ip", "addr", "add", l.HostIP + "/30", "dev", l.HostIf}, nil},
		{[]string{"ip", "link", "set", l.HostIf, "up"}, nil},
		{[]string{"ip", "-n", l.NS, "link", "set", "lo", "up"}, nil},
		{[]string{"ip", "-n", l.NS, "addr", "add", l.NSIP + "/30", "dev", l.NSIf}, nil},
		{[]string{"ip", "-n", l.NS, "link", "set", l.NSIf, "up"}, nil},
	}
	if l.RateBits > 0 {
		rate := strconv.FormatInt(l.RateBits, 10) + "bit"
		// Burst: 2 ms worth of bytes, at least a few full-size packets; queue limit: 100 ms.
		burst := strconv.FormatInt(max(l.RateBits/8/500, 16<<10), 10)
		tbf := []string{"root", "tbf", "rate", rate, "burst", burst, "latency", "100ms"}
		steps = append(steps,
			struct{ args, undo []string }{append([]string{"tc", "qdisc", "add", "dev", l.HostIf}, tbf...), nil},
			struct{ args, undo []string }{append([]string{"tc", "-n", l.NS, "qdisc", "add", "dev", l.NSIf}, tbf...), nil})
	}
	for _, s := range steps {
		if err := run(ctx, s.args...); err != nil {
			return err
		}
		if s.undo != nil {
			undo := s.undo
			l.created = append(l.created, func() error { return run(context.Background(), undo...) })
		}
	}
	r, err := startRelay(filepath.Join("/run/netns", l.NS), l.Addr, upstream, l.RTT/2)
	if err != nil {
		return fmt.Errorf("relay in namespace %s: %w", l.NS, err)
	}
	l.relay = r
	return nil
}

// Close stops the relay and removes the veth pair (with its qdiscs) and the namespace.
func (l *shapedLink) Close() error {
	var errs []error
	if l.relay != nil {
		errs = append(errs, l.relay.Close())
		l.relay = nil
	}
	for i := len(l.created) - 1; i >= 0; i-- {
		errs = append(errs, l.created[i]())
	}
	l.created = nil
	return errors.Join(errs...)
}

// Describe says what the link is, for tables.
func (l *shapedLink) Describe() string {
	bw := "unshaped"
	if l.RateBits > 0 {
		bw = formatRate(l.RateBits)
	}
	return fmt.Sprintf("%s + %s RTT", bw, l.RTT)
}

// freeSubnet picks a 10.213.X.0/30 no interface of this host uses.
func freeSubnet(pid int) (string, error) {
	out, err := exec.Command("ip", "-4", "-o", "addr", "show").Output()
	if err != nil {
		return "", fmt.Errorf("ip addr show: %w", err)
	}
	for i := range 250 {
		subnet := fmt.Sprintf("10.213.%d", (pid+i)%250)
		if !strings.Contains(string(out), " "+subnet+".") {
			return subnet, nil
		}
	}
	return "", errors.New("no free 10.213.X.0/30 subnet for the shaped link")
}

// sweepStale removes namespaces and veths left by a benchmark process that no longer exists (killed with SIGKILL).
func sweepStale(ctx context.Context, logf func(string, ...any)) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 || !strings.HasPrefix(fields[0], nsPrefix) {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimPrefix(fields[0], nsPrefix))
		if err != nil || processAlive(pid) {
			continue
		}
		logf("removing namespace %s left by an earlier run (process %d is gone)", fields[0], pid)
		run(ctx, "ip", "link", "del", fmt.Sprintf("%s%dh", vethPrefix, pid))
		run(ctx, "ip", "netns", "del", fields[0])
	}
}

func processAlive(pid int) bool {
	_, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid)))
	return err == nil
}

func run(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// parseRate reads a bandwidth such as 100mbit, 1gbit, 500kbit, 12500000 (bits/s) or 0/"none" (unshaped).
func parseRate(arg string) (int64, error) {
	s := strings.ToLower(strings.TrimSpace(arg))
	if s == "0" || s == "none" || s == "unlimited" {
		return 0, nil
	}
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"gbit", 1e9}, {"mbit", 1e6}, {"kbit", 1e3}, {"bit", 1}} {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSuffix(s, u.suffix), u.mult
			break
		}
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("bandwidth %q: want e.g. 100mbit, 1gbit or 0 for unshaped", arg)
	}
	bits := int64(v * float64(mult))
	if bits > 0 && bits < 1e6 {
		return 0, fmt.Errorf("bandwidth %q: below 1mbit the benchmark would take hours", arg)
	}
	return bits, nil
}

func formatRate(bits int64) string {
	switch {
	case bits >= 1e9 && bits%1e9 == 0:
		return fmt.Sprintf("%d Gbit/s", bits/1e9)
	case bits >= 1e6:
		return fmt.Sprintf("%g Mbit/s", float64(bits)/1e6)
	}
	return fmt.Sprintf("%d bit/s", bits)
}
