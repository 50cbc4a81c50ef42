package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// delayLine holds every packet an iptables NFQUEUE rule hands it for a fixed delay, then accepts it: packets go
// on in the order they came, each delay after its arrival, and nothing else about them changes. It is a
// listener on nfnetlink_queue (the netlink protocol behind NFQUEUE) in its process's network namespace; it asks
// for packet metadata only (no payload is copied to userspace) and lets GSO packets through whole, and one batch
// verdict accepts every packet that has fallen due. It runs in a process of its own (see delayProcess).
type delayLine struct {
	f     *os.File // the netlink socket
	queue uint16
	delay time.Duration
	held  chan heldPacket // in arrival order; no longer than the kernel's queue
	wg    sync.WaitGroup
	mu    sync.Mutex
	err   error // the first failure of the reader or releaser
	// how late the releases were (the oldest packet of each): a descheduled releaser lengthens the round trip
	releases, over1ms int64
	lateSum, lateMax  time.Duration
}

type heldPacket struct {
	id  uint32
	due time.Time
}

// nfnetlink_queue's message types, attributes and values (linux/netfilter/nfnetlink_queue.h).
const (
	nfqnlMsgPacket       = 0
	nfqnlMsgConfig       = 2
	nfqnlMsgVerdictBatch = 3

	nfqaPacketHdr  = 1
	nfqaVerdictHdr = 2

	nfqaCfgCmd      = 1
	nfqaCfgParams   = 2
	nfqaCfgQueueLen = 3
	nfqaCfgMask     = 4
	nfqaCfgFlags    = 5

	nfqnlCfgCmdBind = 1
	nfqnlCopyMeta   = 1
	nfqaCfgFGSO     = 4
	nfAccept        = 1

	// delayQueueLen bounds the packets held at once (the kernel drops beyond it): at 1 Gbit/s and 10 ms each way
	// a few hundred GSO packets are held.
	delayQueueLen = 8192
	// delaySocketBuffer holds the kernel's messages while the reader is descheduled.
	delaySocketBuffer = 8 << 20
)

// startDelayLine binds NFQUEUE queue number queue of this process's network namespace.
func startDelayLine(queue uint16, delay time.Duration) (*delayLine, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind netlink socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, delaySocketBuffer); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink socket buffer: %w", err)
	}
	d := &delayLine{f: os.NewFile(uintptr(fd), "nfqueue"), queue: queue, delay: delay, held: make(chan heldPacket, delayQueueLen)}
	if err := d.configure(); err != nil {
		d.f.Close()
		return nil, fmt.Errorf("NFQUEUE %d: %w", queue, err)
	}
	d.wg.Add(2)
	go d.read()
	go d.release()
	return d, nil
}

// configure binds the queue, asks for metadata only, whole GSO packets and a queue of delayQueueLen, and waits
// for the kernel's acknowledgement.
func (d *delayLine) configure() error {
	params := binary.BigEndian.AppendUint32(nil, 0) // copy range
	params = append(params, nfqnlCopyMeta)
	msg := d.message(nfqnlMsgConfig, unix.NLM_F_REQUEST|unix.NLM_F_ACK, 1,
		nlAttr(nfqaCfgCmd, []byte{nfqnlCfgCmdBind, 0, 0, unix.AF_INET}),
		nlAttr(nfqaCfgParams, params),
		nlAttr(nfqaCfgQueueLen, binary.BigEndian.AppendUint32(nil, delayQueueLen)),
		nlAttr(nfqaCfgMask, binary.BigEndian.AppendUint32(nil, nfqaCfgFGSO)),
		nlAttr(nfqaCfgFlags, binary.BigEndian.AppendUint32(nil, nfqaCfgFGSO)))
	if _, err := d.f.Write(msg); err != nil {
		return err
	}
	if err := d.f.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return err
	}
	defer d.f.SetReadDeadline(time.Time{})
	buf := make([]byte, 4096)
	for {
		n, err := d.f.Read(buf)
		if err != nil {
			return err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.Header.Type == unix.NLMSG_ERROR && m.Header.Seq == 1 {
				return netlinkError(m.Data)
			}
		}
	}
}

// message builds an nfnetlink_queue message for d's queue.
func (d *delayLine) message(typ, flags uint16, seq uint32, attrs ...[]byte) []byte {
	b := make([]byte, unix.NLMSG_HDRLEN, 64)
	b = append(b, unix.AF_UNSPEC, unix.NFNETLINK_V0)
	b = binary.BigEndian.AppendUint16(b, d.queue)
	for _, a := range attrs {
		b = append(b, a...)
	}
	binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:], unix.NFNL_SUBSYS_QUEUE<<8|typ)
	binary.NativeEndian.PutUint16(b[6:], flags)
	binary.NativeEndian.PutUint32(b[8:], seq)
	return b
}

// nlAttr encodes one netlink attribute, padded to 4 bytes.
func nlAttr(typ uint16, data []byte) []byte {
	b := binary.NativeEndian.AppendUint16(nil, uint16(unix.SizeofNlAttr+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%unix.NLA_ALIGNTO != 0 {
		b = append(b, 0)
	}
	return b
}

// netlinkError reads the errno of an NLMSG_ERROR message (0: an acknowledgement).
func netlinkError(data []byte) error {
	if len(data) < 4 {
		return errors.New("short netlink error message")
	}
	if errno := -int32(binary.NativeEndian.Uint32(data)); errno != 0 {
		return unix.Errno(errno)
	}
	return nil
}

// read takes the kernel's packet messages and queues each packet with its due time. A full socket buffer
// (ENOBUFS) means the kernel dropped packets; the reader goes on.
func (d *delayLine) read() {
	defer d.wg.Done()
	defer close(d.held)
	buf := make([]byte, 64<<10)
	for {
		n, err := d.f.Read(buf)
		now := time.Now()
		if errors.Is(err, unix.ENOBUFS) {
			continue
		}
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				d.fail(fmt.Errorf("read: %w", err))
			}
			return
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			d.fail(err)
			return
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NFNL_SUBSYS_QUEUE<<8 | nfqnlMsgPacket:
				id, ok := packetID(m.Data)
				if !ok {
					d.fail(errors.New("packet message without a packet header"))
					return
				}
				d.held <- heldPacket{id: id, due: now.Add(d.delay)}
			case unix.NLMSG_ERROR:
				if err := netlinkError(m.Data); err != nil {
					d.fail(fmt.Errorf("verdict: %w", err))
					return
				}
			}
		}
	}
}

// packetID finds the packet id in a packet message's attributes (after the 4-byte nfgenmsg).
func packetID(data []byte) (uint32, bool) {
	if len(data) < 4 {
		return 0, false
	}
	for b := data[4:]; len(b) >= unix.SizeofNlAttr; {
		l := int(binary.NativeEndian.Uint16(b))
		typ := binary.NativeEndian.Uint16(b[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		if l < unix.SizeofNlAttr || l > len(b) {
			return 0, false
		}
		if typ == nfqaPacketHdr && l >= unix.SizeofNlAttr+4 {
			return binary.BigEndian.Uint32(b[unix.SizeofNlAttr:]), true
		}
		b = b[min((l+unix.NLA_ALIGNTO-1)&^(unix.NLA_ALIGNTO-1), len(b)):]
	}
	return 0, false
}

// release waits for the oldest held packet to fall due, then accepts it and every later one already due with one
// batch verdict (which covers all packets up to an id).
//
// It sleeps in the kernel on a thread of its own with the least timer slack: the runtime's timers can fire up to a
// millisecond late. The thread ends with the goroutine.
func (d *delayLine) release() {
	defer d.wg.Done()
	runtime.LockOSThread()
	unix.Prctl(unix.PR_SET_TIMERSLACK, 1, 0, 0, 0)
	var next heldPacket
	have := false
	for {
		if !have {
			p, ok := <-d.held
			if !ok {
				return
			}
			next = p
		}
		have = false
		sleepUntil(next.due)
		d.record(time.Since(next.due))
		last := next.id
	due:
		for {
			select {
			case p, ok := <-d.held:
				if !ok {
					break due
				}
				if time.Until(p.due) > 0 {
					next, have = p, true
					break due
				}
				last = p.id
			default:
				break due
			}
		}
		verdict := binary.BigEndian.AppendUint32(nil, nfAccept)
		verdict = binary.BigEndian.AppendUint32(verdict, last)
		if _, err := d.f.Write(d.message(nfqnlMsgVerdictBatch, unix.NLM_F_REQUEST, 0, nlAttr(nfqaVerdictHdr, verdict))); err != nil {
			if !errors.Is(err, os.ErrClosed) {
				d.fail(fmt.Errorf("verdict: %w", err))
			}
			return
		}
	}
}

func sleepUntil(t time.Time) {
	for left := time.Until(t); left > 0; left = time.Until(t) {
		ts := unix.NsecToTimespec(int64(left))
		unix.Nanosleep(&ts, nil) // EINTR (the runtime's signals): sleep what is left
	}
}

func (d *delayLine) record(late time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.releases++
	d.lateSum += late
	d.lateMax = max(d.lateMax, late)
	if late > time.Millisecond {
		d.over1ms++
	}
}

// stats describes the work so far: packets held (the kernel's NFQUEUE counters), packets the kernel dropped
// because the queue was full or the socket buffer overflowed, and how late the releases were.
func (d *delayLine) stats() (string, error) {
	b, err := os.ReadFile("/proc/net/netfilter/nfnetlink_queue")
	if err != nil {
		return "", err
	}
	// queue number, peer port id, queue total, copy mode, copy range, queue dropped, user dropped, id sequence, 1
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 8 || f[0] != strconv.Itoa(int(d.queue)) {
			continue
		}
		var v [3]int64
		for i, col := range []int{5, 6, 7} {
			if v[i], err = strconv.ParseInt(f[col], 10, 64); err != nil {
				return "", fmt.Errorf("nfnetlink_queue counters %q: %w", line, err)
			}
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		mean := time.Duration(0)
		if d.releases > 0 {
			mean = d.lateSum / time.Duration(d.releases)
		}
		return fmt.Sprintf("%d packets held, %d dropped by the kernel (queue full or not taken in time); %d releases, late by %s on average, %s at most, %d of them over 1 ms",
			v[2], v[0]+v[1], d.releases, mean.Round(time.Microsecond), d.lateMax.Round(time.Microsecond), d.over1ms), nil
	}
	return "", fmt.Errorf("queue %d not in nfnetlink_queue", d.queue)
}

func (d *delayLine) fail(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err == nil {
		d.err = err
	}
}

// Close unbinds the queue (the kernel drops what it still holds) and returns the first failure, if any.
func (d *delayLine) Close() error {
	cerr := d.f.Close()
	d.wg.Wait()
	d.mu.Lock()
	defer d.mu.Unlock()
	return errors.Join(d.err, cerr)
}

// delayLineEnv, set to "QUEUE DELAY" (e.g. "0 10ms"), makes the benchmark's binary run as a delay line instead:
// see runDelayLine.
const delayLineEnv = "OBD_BENCH_DELAY_LINE"

// delayProcess is the delay line run as a child process: the benchmark's binary again, started in the router's
// network namespace at nice -10, so that the benchmark's own work (the overlayfs pull runs in its process) and the
// rest of the machine hold packets up as little as possible. It talks over its stdin and stdout: it prints
// "ready" once the queue is bound, answers each "stats" line with a line of counters, and exits at the end of its
// stdin, which also comes when the benchmark dies.
type delayProcess struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Reader
}

func startDelayProcess(ns string, queue uint16, delay time.Duration) (*delayProcess, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("ip", "netns", "exec", ns, "nice", "-n", "-10", exe)
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d %s", delayLineEnv, queue, delay))
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // Ctrl-C is for the benchmark, which then closes stdin
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &delayProcess{cmd: cmd, in: in, out: bufio.NewReader(out)}
	if line, err := p.out.ReadString('\n'); err != nil || line != "ready\n" {
		return nil, errors.Join(fmt.Errorf("delay line in %s did not start: %q", ns, strings.TrimSpace(line)), err, p.Close())
	}
	return p, nil
}

// Stats asks the delay line for its counters.
func (p *delayProcess) Stats() (string, error) {
	if _, err := io.WriteString(p.in, "stats\n"); err != nil {
		return "", err
	}
	line, err := p.out.ReadString('\n')
	return strings.TrimSpace(line), err
}

// Close ends the delay line (the kernel drops what it still holds) and reports how it ended.
func (p *delayProcess) Close() error {
	p.in.Close()
	if err := p.cmd.Wait(); err != nil {
		return fmt.Errorf("delay line: %w", err)
	}
	return nil
}

// runDelayLine is the delay line's process (spec: delayLineEnv's value); it returns the exit status.
func runDelayLine(spec string) int {
	var queue uint16
	var delay time.Duration
	q, ds, _ := strings.Cut(spec, " ")
	n, err := strconv.ParseUint(q, 10, 16)
	if err == nil {
		queue = uint16(n)
		delay, err = time.ParseDuration(ds)
	}
	if err != nil {
		fmt.Printf("%s=%q: %v\n", delayLineEnv, spec, err)
		return 2
	}
	d, err := startDelayLine(queue, delay)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if in.Text() != "stats" {
			continue
		}
		s, err := d.stats()
		if err != nil {
			s = err.Error()
		}
		fmt.Println(s)
	}
	if err := d.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "delay line:", err)
		return 1
	}
	return 0
}
