package device

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A Holder keeps the /dev/fuse descriptor of every attached device open in a small process of its own, the holder
// process, so that the FUSE connections outlive the daemon that serves them. The kernel ends a FUSE connection
// (and fails every read of the device with EIO) when the last descriptor of it is closed; while the holder keeps
// one, a dead server only stalls the device: requests wait in the kernel until a new server takes the connection
// over (FuseLoop.Attach gets the descriptor back from the holder and resumes it, see fuseServer) and asks the kernel
// to send again those the dead server had read but not answered.
//
// The holder process is the daemon's own executable started with HolderEnv set (the program calls RunHolderIfAsked
// first thing in main), in a session of its own so that it survives the daemon being killed or replaced. It serves
// a unix socket for processes of its own user only, and exits when it holds nothing and nobody is connected. A
// Holder starts the process when it finds nobody serving the socket, and puts again what it had put if the holder
// process went away meanwhile.
type Holder struct {
	socket string
	log    *slog.Logger

	mu   sync.Mutex
	conn *net.UnixConn
	put  map[string]heldFD // by device id: what this process put, with its own duplicate of the descriptor
}

type heldFD struct {
	fd   int
	meta HeldDevice
}

// HeldDevice describes a held connection; a server resumes it only for a backend that matches.
type HeldDevice struct {
	Size     int64 `json:"size"`
	ReadOnly bool  `json:"read_only"`
}

// HolderEnv names the environment variable that makes RunHolderIfAsked run the holder process on the socket it
// names.
const HolderEnv = "OBD_DEVICE_HOLDER_SOCKET"

// NewHolder returns a Holder using the holder process that serves socket, started when first needed.
func NewHolder(socket string, logger *slog.Logger) *Holder {
	if logger == nil {
		logger = slog.Default()
	}
	return &Holder{socket: socket, log: logger, put: map[string]heldFD{}}
}

// holderRequest and holderReply are the messages of the holder protocol: one JSON object per SOCK_SEQPACKET
// message, a descriptor passed alongside (SCM_RIGHTS) with put requests and get replies.
type holderRequest struct {
	Op   string     `json:"op"` // put, get, delete, list, quit
	ID   string     `json:"id,omitempty"`
	Meta HeldDevice `json:"meta"`
}

type holderReply struct {
	Error string                `json:"error,omitempty"`
	Found bool                  `json:"found,omitempty"`
	Meta  HeldDevice            `json:"meta"`
	Held  map[string]HeldDevice `json:"held,omitempty"`
}

const holderMaxMessage = 64 << 10

// Put hands the holder a duplicate of fd, the /dev/fuse descriptor of device id, replacing what it held for id.
func (h *Holder) Put(id string, fd int, meta HeldDevice) error {
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("device holder: put %s: %w", id, err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, _, err := h.roundTrip(holderRequest{Op: "put", ID: id, Meta: meta}, dup, true); err != nil {
		unix.Close(dup)
		return fmt.Errorf("device holder: put %s: %w", id, err)
	}
	if old, ok := h.put[id]; ok {
		unix.Close(old.fd)
	}
	h.put[id] = heldFD{fd: dup, meta: meta}
	return nil
}

// Get returns a new descriptor of the connection held for id, or -1 if the holder holds none.
func (h *Holder) Get(id string) (fd int, meta HeldDevice, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	rep, fd, err := h.roundTrip(holderRequest{Op: "get", ID: id}, -1, false)
	if errors.Is(err, errNoHolder) {
		return -1, HeldDevice{}, nil
	}
	if err != nil {
		return -1, HeldDevice{}, fmt.Errorf("device holder: get %s: %w", id, err)
	}
	if !rep.Found {
		return -1, HeldDevice{}, nil
	}
	if fd < 0 {
		return -1, HeldDevice{}, fmt.Errorf("device holder: get %s: the reply carried no descriptor", id)
	}
	return fd, rep.Meta, nil
}

// Delete makes the holder close what it holds for id. Once no other process has it open, the kernel ends the
// connection.
func (h *Holder) Delete(id string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if old, ok := h.put[id]; ok {
		unix.Close(old.fd)
		delete(h.put, id)
	}
	if _, err := h.call(holderRequest{Op: "delete", ID: id}, -1); err != nil && !errors.Is(err, errNoHolder) {
		return fmt.Errorf("device holder: delete %s: %w", id, err)
	}
	return nil
}

// List returns the ids of the held connections.
func (h *Holder) List() (map[string]HeldDevice, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	rep, err := h.call(holderRequest{Op: "list"}, -1)
	if errors.Is(err, errNoHolder) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("device holder: list: %w", err)
	}
	return rep.Held, nil
}

// Close closes the connection to the holder process, which keeps what it holds.
func (h *Holder) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for id, p := range h.put {
		unix.Close(p.fd)
		delete(h.put, id)
	}
	if h.conn == nil {
		return nil
	}
	err := h.conn.Close()
	h.conn = nil
	return err
}

// StopHolder makes the holder process serving socket, if any, close every connection it holds and exit. Devices
// whose server is dead then fail their reads with EIO and can be removed.
func StopHolder(socket string) error {
	c, err := net.DialTimeout("unixpacket", socket, time.Second)
	if err != nil {
		return nil // nobody serves it
	}
	defer c.Close()
	if _, _, err := exchange(c.(*net.UnixConn), holderRequest{Op: "quit"}, -1); err != nil {
		return fmt.Errorf("device holder %s: quit: %w", socket, err)
	}
	return nil
}

// call is roundTrip for requests that need no holder process started and carry no descriptor back.
func (h *Holder) call(req holderRequest, fd int) (holderReply, error) {
	rep, rfd, err := h.roundTrip(req, fd, false)
	if rfd >= 0 {
		unix.Close(rfd)
	}
	return rep, err
}

// errNoHolder is returned for requests that find no holder process: it holds nothing.
var errNoHolder = errors.New("no device holder process")

// roundTrip sends req (with fd, if not negative) and returns the reply, connecting first if needed; with start,
// it starts the holder process if none serves the socket, else it returns errNoHolder. A connection that broke is
// made again once, after which what this process put is put again.
func (h *Holder) roundTrip(req holderRequest, fd int, start bool) (holderReply, int, error) {
	for attempt := 0; ; attempt++ {
		if h.conn == nil {
			if err := h.connect(start || len(h.put) > 0); err != nil {
				return holderReply{}, -1, err
			}
		}
		rep, rfd, err := exchange(h.conn, req, fd)
		if err == nil {
			if rep.Error != "" {
				return rep, rfd, errors.New(rep.Error)
			}
			return rep, rfd, nil
		}
		h.conn.Close()
		h.conn = nil
		if attempt > 0 {
			return holderReply{}, -1, err
		}
		h.log.Warn("lost the connection to the device holder process; connecting again", "socket", h.socket, "err", err)
	}
}

// connect connects to the holder process, starting it if nobody serves the socket, and puts again what this
// process had put (the holder process may be a new one).
func (h *Holder) connect(start bool) error {
	c, err := dialHolder(h.socket)
	if err != nil {
		if !start {
			return errNoHolder
		}
		if err := startHolder(h.socket); err != nil {
			return err
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			if c, err = dialHolder(h.socket); err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("the holder process started does not serve %s: %w", h.socket, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	h.conn = c
	for id, p := range h.put {
		if _, rfd, err := exchange(c, holderRequest{Op: "put", ID: id, Meta: p.meta}, p.fd); err != nil {
			c.Close()
			h.conn = nil
			return fmt.Errorf("put %s again: %w", id, err)
		} else if rfd >= 0 {
			unix.Close(rfd)
		}
	}
	return nil
}

func dialHolder(socket string) (*net.UnixConn, error) {
	c, err := net.DialTimeout("unixpacket", socket, time.Second)
	if err != nil {
		return nil, err
	}
	return c.(*net.UnixConn), nil
}

// startHolder starts the holder process for socket: this executable, in a new session, with HolderEnv set.
func startHolder(socket string) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("start the device holder process: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(socket), 0o700); err != nil {
		return fmt.Errorf("start the device holder process: %w", err)
	}
	// The argument is for programs that do not call RunHolderIfAsked (a test binary, say): they refuse it and exit,
	// instead of running as whatever they are.
	cmd := exec.Command(exe, "-obd-device-holder")
	cmd.Env = append(os.Environ(), HolderEnv+"="+socket)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start the device holder process %s: %w", exe, err)
	}
	go cmd.Wait() // reap it if it exits while this process runs
	return nil
}

// exchange sends one request and reads one reply on c.
func exchange(c *net.UnixConn, req holderRequest, fd int) (holderReply, int, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return holderReply{}, -1, err
	}
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, _, err := c.WriteMsgUnix(b, oob, nil); err != nil {
		return holderReply{}, -1, err
	}
	msg, rfd, err := readMessage(c)
	if err != nil {
		return holderReply{}, -1, err
	}
	var rep holderReply
	if err := json.Unmarshal(msg, &rep); err != nil {
		if rfd >= 0 {
			unix.Close(rfd)
		}
		return holderReply{}, -1, fmt.Errorf("malformed reply from the device holder: %w", err)
	}
	return rep, rfd, nil
}

// readMessage reads one message and the descriptor passed with it (-1 if none; extra descriptors are closed).
func readMessage(c *net.UnixConn) ([]byte, int, error) {
	buf := make([]byte, holderMaxMessage)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, -1, err
	}
	fd := -1
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err == nil {
			for _, m := range msgs {
				fds, err := unix.ParseUnixRights(&m)
				if err != nil {
					continue
				}
				for _, f := range fds {
					if fd < 0 {
						fd = f
						unix.CloseOnExec(f)
					} else {
						unix.Close(f)
					}
				}
			}
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, -1, errors.New("device holder message too long")
	}
	if n == 0 {
		return nil, fd, errors.New("device holder connection closed")
	}
	return buf[:n], fd, nil
}

// RunHolderIfAsked runs the holder process and exits if HolderEnv is set (see Holder); otherwise it returns at
// once. Call it first in main of every program that uses a Holder (and in TestMain of their tests).
func RunHolderIfAsked() {
	socket := os.Getenv(HolderEnv)
	if socket == "" {
		return
	}
	if err := runHolder(socket); err != nil {
		fmt.Fprintln(os.Stderr, "obd device holder:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// holderServer is the holder process's state.
type holderServer struct {
	mu    sync.Mutex
	held  map[string]heldFD
	conns int
	done  chan struct{}
	once  sync.Once
}

// holderIdleExit is how long a holder process that holds nothing waits for its first client.
const holderIdleExit = 10 * time.Second

func runHolder(socket string) error {
	if c, err := dialHolder(socket); err == nil {
		c.Close()
		return nil // another holder process serves it
	}
	os.Remove(socket)
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: socket, Net: "unixpacket"})
	if err != nil {
		return err
	}
	if err := os.Chmod(socket, 0o600); err != nil {
		l.Close()
		return err
	}
	s := &holderServer{held: map[string]heldFD{}, done: make(chan struct{})}
	go func() {
		<-s.done
		l.Close()
	}()
	time.AfterFunc(holderIdleExit, func() { s.maybeExit() })
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			select {
			case <-s.done:
				os.Remove(socket)
				return nil
			default:
				return err
			}
		}
		if !sameUser(c) {
			c.Close()
			continue
		}
		s.mu.Lock()
		s.conns++
		s.mu.Unlock()
		go s.serve(c)
	}
}

// sameUser reports whether the peer of c runs as this process's user.
func sameUser(c *net.UnixConn) bool {
	raw, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var cred *unix.Ucred
	raw.Control(func(fd uintptr) { cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	return err == nil && cred != nil && int(cred.Uid) == os.Getuid()
}

// maybeExit ends the holder process when it holds nothing and nobody is connected.
func (s *holderServer) maybeExit() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.held) == 0 && s.conns == 0 {
		s.once.Do(func() { close(s.done) })
	}
}

func (s *holderServer) serve(c *net.UnixConn) {
	defer func() {
		c.Close()
		s.mu.Lock()
		s.conns--
		s.mu.Unlock()
		s.maybeExit()
	}()
	for {
		msg, fd, err := readMessage(c)
		if err != nil {
			return
		}
		var req holderRequest
		rep := holderReply{}
		rfd := -1
		if err := json.Unmarshal(msg, &req); err != nil {
			rep.Error = "malformed request: " + err.Error()
		} else {
			rfd = s.do(req, fd, &rep)
			fd = -1
		}
		if fd >= 0 {
			unix.Close(fd)
		}
		b, _ := json.Marshal(rep)
		var oob []byte
		if rfd >= 0 {
			oob = unix.UnixRights(rfd)
		}
		_, _, err = c.WriteMsgUnix(b, oob, nil)
		if rfd >= 0 {
			unix.Close(rfd)
		}
		if err != nil {
			return
		}
		if req.Op == "quit" {
			s.mu.Lock()
			for id, h := range s.held {
				unix.Close(h.fd)
				delete(s.held, id)
			}
			s.once.Do(func() { close(s.done) })
			s.mu.Unlock()
			return
		}
	}
}

// do carries out one request; fd is the descriptor that came with it (owned by do). It returns a descriptor to
// send with the reply (closed by the caller), or -1.
func (s *holderServer) do(req holderRequest, fd int, rep *holderReply) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch req.Op {
	case "put":
		if fd < 0 {
			rep.Error = "put without a descriptor"
			return -1
		}
		if old, ok := s.held[req.ID]; ok {
			unix.Close(old.fd)
		}
		s.held[req.ID] = heldFD{fd: fd, meta: req.Meta}
		return -1
	case "get":
		if fd >= 0 {
			unix.Close(fd)
		}
		h, ok := s.held[req.ID]
		if !ok {
			return -1
		}
		dup, err := unix.FcntlInt(uintptr(h.fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			rep.Error = err.Error()
			return -1
		}
		rep.Found, rep.Meta = true, h.meta
		return dup
	case "delete":
		if fd >= 0 {
			unix.Close(fd)
		}
		if old, ok := s.held[req.ID]; ok {
			unix.Close(old.fd)
			delete(s.held, req.ID)
		}
	case "list":
		if fd >= 0 {
			unix.Close(fd)
		}
		rep.Held = map[string]HeldDevice{}
		for id, h := range s.held {
			rep.Held[id] = h.meta
		}
	case "quit":
		if fd >= 0 {
			unix.Close(fd)
		}
	default:
		if fd >= 0 {
			unix.Close(fd)
		}
		rep.Error = fmt.Sprintf("unknown request %q", req.Op)
	}
	return -1
}
