package device

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/obdproject/obd/internal/testenv"
)

// serveEnv names the environment variable that turns the test binary into a device server for TestCrashRecovery.
const serveEnv = "OBD_DEVICE_TEST_SERVE"

// serveRequest is what TestCrashRecovery asks the child process to serve.
type serveRequest struct {
	StateDir string
	Image    string
	IDs      []string
	Holder   string // the holder socket, if the devices are to outlive the child
}

func TestMain(m *testing.M) {
	RunHolderIfAsked()
	if req := os.Getenv(serveEnv); req != "" {
		os.Exit(serveForTest(req))
	}
	os.Exit(m.Run())
}

// serveForTest attaches the devices of req, prints "id<TAB>device" for each and "ready", and serves them until
// standard input closes (or the process is killed, which is the point).
func serveForTest(req string) int {
	var r serveRequest
	if err := json.Unmarshal([]byte(req), &r); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	img, err := os.Open(r.Image)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	st, err := img.Stat()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	var opts []FuseLoopOption
	if r.Holder != "" {
		opts = append(opts, WithHolder(NewHolder(r.Holder, nil)))
	}
	f := NewFuseLoop(nil, opts...)
	ctx := context.Background()
	for _, id := range r.IDs {
		dev, err := f.Attach(ctx, id, fileBackend{File: img, size: st.Size()}, AttachOptions{ReadOnly: true, StateDir: r.StateDir})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		defer f.Detach(ctx, id)
		fmt.Printf("%s\t%s\n", id, dev.Path)
	}
	fmt.Println("ready")
	bufio.NewReader(os.Stdin).ReadString('\n')
	return 0
}

// startServer starts the test binary as a process serving the devices of req (see serveForTest) and returns the
// loop device of each id and the process.
func startServer(t *testing.T, req serveRequest) (map[string]string, *exec.Cmd, <-chan struct{}) {
	t.Helper()
	b, _ := json.Marshal(req)
	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), serveEnv+"="+string(b))
	child.Stderr = os.Stderr
	stdin, err := child.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		child.Wait()
	}()
	t.Cleanup(func() {
		stdin.Close()
		child.Process.Kill()
		<-exited
	})
	paths := map[string]string{}
	sc := bufio.NewScanner(stdout)
	testenv.Within(t, 30*time.Second, "the serving child process", func() {
		for sc.Scan() && sc.Text() != "ready" {
			id, path, _ := strings.Cut(sc.Text(), "\t")
			paths[id] = path
		}
	})
	if len(paths) != len(req.IDs) {
		t.Fatalf("child attached %v, want %d devices", paths, len(req.IDs))
	}
	return paths, child, exited
}

// TestCrashRecovery kills the process serving two devices with SIGKILL, checks that reads fail with EIO instead
// of hanging, then lets a new FuseLoop attach one device again and reconcile the other away.
func TestCrashRecovery(t *testing.T) {
	mkfs := needSystem(t)
	files := testFiles(4)
	img := makeImage(t, mkfs, files, 32)
	state := t.TempDir()
	ids := []string{uniqueID(t, 0), uniqueID(t, 1)}
	recovered := NewFuseLoop(nil)
	// Registered before startServer's cleanup, so it runs after the child is gone: whatever the test reached, no
	// device is left behind.
	t.Cleanup(func() {
		if _, err := recovered.Reconcile(context.Background(), state); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		for _, id := range ids {
			if err := recovered.Detach(context.Background(), id); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	paths, child, exited := startServer(t, serveRequest{StateDir: state, Image: img, IDs: ids})
	devs := make([]*Device, len(ids))
	targets := make([]string, len(ids))
	for i, id := range ids {
		devs[i] = &Device{ID: id, Path: paths[id], ReadOnly: true}
		targets[i] = mountDev(t, devs[i])
	}
	if _, err := os.ReadFile(filepath.Join(targets[0], "dir0/file0")); err != nil {
		t.Fatal(err)
	}

	// A user of the second device keeps it busy across the crash, like a running container would.
	held, err := os.Open(filepath.Join(targets[1], "dir0/file0"))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()

	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-exited

	// The file has not been read before, so reading it needs the dead server.
	testenv.Within(t, 30*time.Second, "read after the server died", func() {
		_, err := os.ReadFile(filepath.Join(targets[0], "dir0/file6"))
		if !errors.Is(err, syscall.EIO) {
			t.Errorf("read after the server died: %v, want EIO", err)
		}
	})
	testenv.Within(t, 30*time.Second, "O_DIRECT device read after the server died", func() {
		fd, err := unix.Open(paths[ids[1]], unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Error(err)
			return
		}
		defer unix.Close(fd)
		if _, err := unix.Pread(fd, alignedBuffer(4096), 0); !errors.Is(err, syscall.EIO) {
			t.Errorf("device read after the server died: %v, want EIO", err)
		}
	})

	infos, err := ListAttached(state)
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 2 || infos[0].Served || infos[1].Served {
		t.Fatalf("ListAttached after the crash = %+v, want 2 stale devices", infos)
	}

	// The restarted daemon attaches the device it still wants: the stale device and its mount go, a new device
	// comes, and mounting it again gives the files back.
	dev, err := recovered.Attach(context.Background(), ids[0], openFileBackend(t, img), AttachOptions{ReadOnly: true, StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	if isMounted(t, targets[0]) {
		t.Fatal("the filesystem of the stale device is still mounted")
	}
	if err := dev.Mount(context.Background(), targets[0], "ext4", []string{"ro"}); err != nil {
		t.Fatal(err)
	}
	checkFiles(t, targets[0], files)

	// The other one is stale and goes, with its mount.
	remain, err := recovered.Reconcile(context.Background(), state)
	if err != nil {
		t.Fatal(err)
	}
	if len(remain) != 1 || remain[0].ID != ids[0] || !remain[0].Served {
		t.Fatalf("Reconcile left %+v, want only %s", remain, ids[0])
	}
	if isMounted(t, targets[1]) {
		t.Fatalf("filesystem of stale device %s still mounted after Reconcile", paths[ids[1]])
	}
	// The busy loop device goes when its last user does.
	held.Close()
	deadline := time.Now().Add(10 * time.Second)
	for !loopFree(t, paths[ids[1]]) {
		if time.Now().After(deadline) {
			t.Fatalf("stale %s still bound after its last user went", paths[ids[1]])
		}
		time.Sleep(10 * time.Millisecond)
	}
}
