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

// shapedLink puts a router between this host and the registry. The host's clients (containerd, obd-snapshotter,
// the benchmark itself) reach the registry at Addr, an address in a "registry" network namespace whose only way
// to the host is through a "router" namespace. The router forwards with the kernel, each veth end it sends on
// carries a tbf qdisc at the link's rate, and an iptables NFQUEUE rule hands every forwarded packet, in both
// directions, to a delay line (a child process, see delayProcess) that holds it for RTT/2 and lets it go in order. In the registry
// namespace a front door listens on Addr and splices each connection to the sandbox's registry (its counting
// proxy) on the host's loopback. TCP runs end to end, from a client's socket to the front door's, so both see the
// path's round-trip time: the handshake, slow start on every new connection, and the restart from a small
// window after a connection has been idle.
//
//	host                           router namespace                      registry namespace
//	containerd, obd-snapshotter,   ip_forward; FORWARD -j NFQUEUE:
//	the benchmark                  each packet held RTT/2, in order
//	    HostIP ══════veth══════ RouterHostIP ───────────── RouterFarIP ══════veth══════ FarIP:5000 front door
//	             ◄── tbf at R                              tbf at R ──►                      │ splice
//	registry ◄── counting proxy ◄── host loopback ◄──────────────────────────────────────────┘
//
//	one TCP connection per client connection: client socket (host) ⇄ front door socket (registry namespace)
//
// The registry namespace's TCP, the sender of every download, uses the congestion control CC. Each tbf queues up
// to one round trip at the rate (at least 10 ms), the buffer of a bottleneck sized by the usual rule.
type shapedLink struct {
	Router, Far   string // network namespace names
	Subnet        string // 10.213.X: the host and the router on .0/30, the router and the registry side on .4/30
	HostIf, FarIf string // veth ends on the host and in the registry namespace
	RouterHostIf  string // router's end towards the host
	RouterFarIf   string // router's end towards the registry namespace
	HostIP, FarIP string
	RouterHostIP  string
	RouterFarIP   string
	RateBits      int64 // 0: unshaped
	RTT           time.Duration
	CC            string // TCP congestion control in the registry namespace
	Addr          string // the front door (FarIP:5000): the registry host clients use
	delay         *delayProcess
	door          *frontDoor
	created       []func() error // undo steps, last first
}

const (
	nsPrefix      = "obdbench-"
	vethPrefix    = "obdb"
	frontDoorPort = 5000
	delayQueue    = 0 // NFQUEUE number; queues are per network namespace
)

// newLink names the link's namespaces, interfaces and addresses (two /30 subnets of a free 10.213.X.0/24); start
// creates them.
func newLink(rateBits int64, rtt time.Duration, cc string) (*shapedLink, error) {
	pid := os.Getpid()
	subnet, err := freeSubnet(pid)
	if err != nil {
		return nil, err
	}
	p := nsPrefix + strconv.Itoa(pid)
	v := vethPrefix + strconv.Itoa(pid)
	l := &shapedLink{
		Router: p + "-router", Far: p + "-registry",
		HostIf: v + "h", RouterHostIf: v + "rh", RouterFarIf: v + "rg", FarIf: v + "g",
		HostIP: subnet + ".1", RouterHostIP: subnet + ".2", RouterFarIP: subnet + ".5", FarIP: subnet + ".6",
		Subnet: subnet, RateBits: rateBits, RTT: rtt, CC: cc,
	}
	l.Addr = net.JoinHostPort(l.FarIP, strconv.Itoa(frontDoorPort))
	return l, nil
}

// start builds the namespaces, veth pairs, qdiscs, the NFQUEUE rule with its delay line and the front door to
// upstream (host:port on loopback). On failure it removes what it made.
func (l *shapedLink) start(ctx context.Context, upstream string, logf func(string, ...any)) error {
	sweepStale(ctx, logf)
	if err := l.setup(ctx, upstream); err != nil {
		return errors.Join(err, l.Close())
	}
	return nil
}

func (l *shapedLink) setup(ctx context.Context, upstream string) error {
	type step struct{ args, undo []string }
	inRouter := []string{"ip", "netns", "exec", l.Router}
	steps := []step{
		{[]string{"ip", "netns", "add", l.Router}, []string{"ip", "netns", "del", l.Router}},
		{[]string{"ip", "netns", "add", l.Far}, []string{"ip", "netns", "del", l.Far}},
		{[]string{"ip", "link", "add", l.HostIf, "type", "veth", "peer", "name", l.RouterHostIf, "netns", l.Router}, []string{"ip", "link", "del", l.HostIf}},
		{[]string{"ip", "-n", l.Router, "link", "add", l.RouterFarIf, "type", "veth", "peer", "name", l.FarIf, "netns", l.Far}, nil},
		{[]string{"ip", "addr", "add", l.HostIP + "/30", "dev", l.HostIf}, nil},
		{[]string{"ip", "link", "set", l.HostIf, "up"}, nil},
		{[]string{"ip", "route", "add", l.Subnet + ".4/30", "via", l.RouterHostIP, "dev", l.HostIf}, nil},
		{[]string{"ip", "-n", l.Router, "addr", "add", l.RouterHostIP + "/30", "dev", l.RouterHostIf}, nil},
		{[]string{"ip", "-n", l.Router, "addr", "add", l.RouterFarIP + "/30", "dev", l.RouterFarIf}, nil},
		{[]string{"ip", "-n", l.Router, "link", "set", l.RouterHostIf, "up"}, nil},
		{[]string{"ip", "-n", l.Router, "link", "set", l.RouterFarIf, "up"}, nil},
		{append(inRouter, "sysctl", "-qw", "net.ipv4.ip_forward=1"), nil},
		{[]string{"ip", "-n", l.Far, "link", "set", "lo", "up"}, nil},
		{[]string{"ip", "-n", l.Far, "addr", "add", l.FarIP + "/30", "dev", l.FarIf}, nil},
		{[]string{"ip", "-n", l.Far, "link", "set", l.FarIf, "up"}, nil},
		{[]string{"ip", "netns", "exec", l.Far, "sysctl", "-qw", "net.ipv4.tcp_no_metrics_save=1"}, nil},
		// Per route: a namespace other than the host's may only default to the algorithms the host allows.
		{[]string{"ip", "-n", l.Far, "route", "add", "default", "via", l.RouterFarIP, "congctl", l.CC}, nil},
	}
	if l.RateBits > 0 {
		rate := strconv.FormatInt(l.RateBits, 10) + "bit"
		// Burst: 2 ms worth of bytes, at least a few full-size packets; queue: one round trip, at least 10 ms.
		burst := strconv.FormatInt(max(l.RateBits/8/500, 16<<10), 10)
		latency := strconv.FormatInt(max(l.RTT, 10*time.Millisecond).Microseconds(), 10) + "us"
		for _, dev := range []string{l.RouterHostIf, l.RouterFarIf} {
			steps = append(steps, step{[]string{"tc", "-n", l.Router, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst, "latency", latency}, nil})
		}
	}
	l.forgetPath()
	for _, s := range steps {
		if err := run(ctx, s.args...); err != nil {
			return err
		}
		if s.undo != nil {
			undo := s.undo
			l.created = append(l.created, func() error { return run(context.Background(), undo...) })
		}
	}
	if l.RTT > 0 {
		d, err := startDelayProcess(l.Router, delayQueue, l.RTT/2)
		if err != nil {
			return err
		}
		l.delay = d
		if err := run(ctx, append(inRouter, "iptables-legacy", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", strconv.Itoa(delayQueue))...); err != nil {
			return err
		}
	}
	d, err := openFrontDoor(l.Far, l.Addr, upstream)
	if err != nil {
		return fmt.Errorf("front door in namespace %s: %w", l.Far, err)
	}
	l.door = d
	return nil
}

// DelayStats describes the delay line's work so far; it is empty when the link has no delay.
func (l *shapedLink) DelayStats() (string, error) {
	if l.delay == nil {
		return "", nil
	}
	return l.delay.Stats()
}

// Close stops the front door and the delay line and removes the veth pairs (with their qdiscs), the namespaces
// and, with the router's, its iptables rule.
func (l *shapedLink) Close() error {
	var errs []error
	if l.door != nil {
		errs = append(errs, l.door.Close())
		l.door = nil
	}
	if l.delay != nil {
		errs = append(errs, l.delay.Close())
		l.delay = nil
	}
	for i := len(l.created) - 1; i >= 0; i-- {
		errs = append(errs, l.created[i]())
	}
	l.created = nil
	l.forgetPath()
	return errors.Join(errs...)
}

// forgetPath removes what the host's TCP remembers about the registry address (tcp_metrics: round-trip time,
// window), left by an earlier run that had the same subnet or by this one; having nothing to remove is no error.
func (l *shapedLink) forgetPath() {
	exec.Command("ip", "tcp_metrics", "delete", l.FarIP).Run()
}

// linkMethod says how the link is made, for the result file.
const linkMethod = "a router network namespace between the host's clients and a registry namespace: tbf at the rate on both of the router's veth ends " +
	"(queue: one RTT, at least 10 ms), and an iptables-legacy FORWARD rule that hands every forwarded packet to an NFQUEUE delay line which holds it RTT/2 " +
	"and releases it in order; TCP runs end to end from the clients to a front door in the registry namespace, which splices to the registry on the host's loopback"

// Describe says what the link is, for tables.
func (l *shapedLink) Describe() string {
	bw := "unshaped"
	if l.RateBits > 0 {
		bw = formatRate(l.RateBits)
	}
	return fmt.Sprintf("%s + %s RTT", bw, l.RTT)
}

// freeSubnet picks a 10.213.X.0/24 no interface of this host has an address in.
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
	return "", errors.New("no free 10.213.X.0/24 for the shaped link")
}

// sweepStale removes the namespaces and host veth left by a benchmark process that no longer exists (killed with
// SIGKILL).
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
		id, _, _ := strings.Cut(strings.TrimPrefix(fields[0], nsPrefix), "-")
		pid, err := strconv.Atoi(id)
		if err != nil || processAlive(pid) {
			continue
		}
		logf("removing namespace %s left by an earlier run (process %d is gone)", fields[0], pid)
		run(ctx, "ip", "link", "del", vethPrefix+id+"h")
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
