package e2e

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/sandbox"
	"github.com/obdproject/obd/internal/testenv"
)

// blobRequest is a blob GET the registry answered.
type blobRequest struct {
	digest     string
	rng        string
	authorized bool // the request carried an Authorization header
	status     int
	bytes      int64
}

// recordingRegistry is a reverse proxy in front of a registry that records every blob GET.
type recordingRegistry struct {
	mu   sync.Mutex
	reqs []blobRequest
}

func (rr *recordingRegistry) start(t *testing.T, upstream string) string {
	rp := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: upstream})
	rp.ModifyResponse = func(resp *http.Response) error {
		r := resp.Request
		if i := strings.Index(r.URL.Path, "/blobs/"); i >= 0 && r.Method == http.MethodGet {
			br := blobRequest{digest: r.URL.Path[i+len("/blobs/"):], rng: r.Header.Get("Range"), authorized: r.Header.Get("Authorization") != "", status: resp.StatusCode}
			resp.Body = &recordedBody{ReadCloser: resp.Body, done: func(n int64) {
				br.bytes = n
				rr.mu.Lock()
				rr.reqs = append(rr.reqs, br)
				rr.mu.Unlock()
			}}
		}
		return nil
	}
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// take returns the recorded requests and forgets them.
func (rr *recordingRegistry) take() []blobRequest {
	rr.mu.Lock()
	defer rr.mu.Unlock()
	out := rr.reqs
	rr.reqs = nil
	return out
}

type recordedBody struct {
	io.ReadCloser
	n    int64
	once sync.Once
	done func(int64)
}

func (b *recordedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n += int64(n)
	return n, err
}

func (b *recordedBody) Close() error {
	b.once.Do(func() { b.done(b.n) })
	return b.ReadCloser.Close()
}

// TestCRIPullSecret plays kubelet against containerd's CRI plugin with obd's CRI proxy in between: an overlaybd
// image in a registry that requires authentication, with the credentials only in the CRI pull request (the node
// has none), is pulled lazily and its container reads uncached blocks with the pull's credentials.
func TestCRIPullSecret(t *testing.T) {
	testenv.Root(t)
	testenv.Tools(t, append([]string{"mke2fs", "busybox"}, sandbox.Required...)...)
	const user, password = "obd", "s3cret" // crHtpasswd
	rec := &recordingRegistry{}
	host := rec.start(t, testenv.Registry(t, crHtpasswd))

	// The images: app:v1 as it is, app:obd converted.
	src := filepath.Join(t.TempDir(), "src")
	appImage(t, src)
	plain, lazy := host+"/app:v1", host+"/app:obd"
	pushc, err := registry.New(registry.Options{PlainHTTP: true, Credentials: registry.StaticCredentials(user, password)})
	if err != nil {
		t.Fatal(err)
	}
	defer pushc.Close()
	lay, err := image.OpenLayout(src)
	if err != nil {
		t.Fatal(err)
	}
	pr, _ := image.ParseRef(plain)
	if err := image.PushLayout(context.Background(), pushc, lay, "v1", pr); err != nil {
		t.Fatal(err)
	}
	run(t, exec.Command(bins.obd, "convert", "--creds", user+":"+password, "--vsize", "8", plain, lazy))
	// Another image (no layer in common with app:v1), with an overlaybd image attached to it as an OCI referrer.
	withRef := host + "/withref:v1"
	refSrc := filepath.Join(t.TempDir(), "withref")
	bb, err := os.ReadFile(testenv.Tools(t, "busybox")[0])
	if err != nil {
		t.Fatal(err)
	}
	const refOutput = "motd of the image with a referrer\ndata of the image with a referrer\n"
	writeLayout(t, refSrc, "v1", [][]byte{
		tarOf(t, []tarEntry{{name: "bin/", mode: 0o755}, {name: "bin/busybox", body: bb, mode: 0o755}, {name: "bin/sh", link: "busybox"},
			{name: "bin/cat", link: "busybox"}, {name: "etc/motd", body: []byte("motd of the image with a referrer\n")}}),
		tarOf(t, []tarEntry{{name: "app/", mode: 0o755}, {name: "app/data.txt", body: []byte("data of the image with a referrer\n")},
			{name: "app/run.sh", body: []byte("cat /etc/motd /app/data.txt\n"), mode: 0o755}}),
	})
	refLay, err := image.OpenLayout(refSrc)
	if err != nil {
		t.Fatal(err)
	}
	wr, _ := image.ParseRef(withRef)
	if err := image.PushLayout(context.Background(), pushc, refLay, "v1", wr); err != nil {
		t.Fatal(err)
	}
	run(t, exec.Command(bins.obd, "convert", "--creds", user+":"+password, "--vsize", "8", "--referrer", withRef, host+"/withref"))
	layers := func(ref string) []ocispec.Descriptor {
		r, _ := image.ParseRef(ref)
		_, mb, err := pushc.Resolve(context.Background(), r.Host(), r.Repository(), r.Tag)
		if err != nil {
			t.Fatal(err)
		}
		var m ocispec.Manifest
		if err := json.Unmarshal(mb, &m); err != nil {
			t.Fatal(err)
		}
		return m.Layers
	}
	lazyLayers, plainLayers := layers(lazy), layers(plain)

	// The node has no credentials: an empty docker config, no token helpers.
	nodeCreds := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(nodeCreds, []byte(`{"auths": {}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	sb, err := sandbox.Start(context.Background(), sandbox.Options{
		Snapshotter: bins.snapshotter, CRI: true, Logf: t.Logf,
		RegistryTOML: "docker_config = " + quote(nodeCreds) + "\ncredential_helpers = " + quote(filepath.Join(t.TempDir(), "none.json")) + "\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("obd-snapshotter log:\n%s\ncontainerd log:\n%s", sb.Log("snapshotter"), sb.Log("containerd"))
		}
		if err := sb.Close(); err != nil {
			t.Errorf("sandbox cleanup: %v", err)
		}
	})
	images := runtimeapi.NewImageServiceClient(dialUnix(t, sb.CRISocket))
	runtime := runtimeapi.NewRuntimeServiceClient(dialUnix(t, sb.Containerd))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	secret := &runtimeapi.AuthConfig{Username: user, Password: password}
	pull := func(ref string, auth *runtimeapi.AuthConfig) error {
		_, err := images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}, Auth: auth})
		return err
	}

	t.Run("wrong secret", func(t *testing.T) {
		err := pull(lazy, &runtimeapi.AuthConfig{Username: user, Password: "wrong"})
		if err == nil || !strings.Contains(err.Error(), "401 Unauthorized") {
			t.Fatalf("pull with a wrong secret: %v, want an error saying 401 Unauthorized", err)
		}
		t.Logf("pull with a wrong secret: %v", err)
	})

	// One pod for the test's containers, on the host's network (no CNI).
	logDir := t.TempDir()
	podConfig := &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: "obd-cri", Namespace: "default", Uid: "obd-cri-uid"},
		LogDirectory: logDir,
		Linux:        &runtimeapi.LinuxPodSandboxConfig{SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{NamespaceOptions: &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE}}},
	}
	pod, err := runtime.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: podConfig})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		if _, err := runtime.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: pod.PodSandboxId}); err != nil {
			t.Errorf("stop pod: %v", err)
		}
		if _, err := runtime.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod.PodSandboxId}); err != nil {
			t.Errorf("remove pod: %v", err)
		}
	})
	runApp := func(t *testing.T, name, ref string) string {
		t.Helper()
		c, err := runtime.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{
			PodSandboxId: pod.PodSandboxId, SandboxConfig: podConfig,
			Config: &runtimeapi.ContainerConfig{
				Metadata: &runtimeapi.ContainerMetadata{Name: name},
				Image:    &runtimeapi.ImageSpec{Image: ref},
				Command:  []string{"/bin/sh", "/app/run.sh"},
				LogPath:  name + ".log",
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := runtime.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: c.ContainerId}); err != nil {
			t.Fatal(err)
		}
		for {
			st, err := runtime.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: c.ContainerId})
			if err != nil {
				t.Fatal(err)
			}
			if st.Status.State == runtimeapi.ContainerState_CONTAINER_EXITED {
				if st.Status.ExitCode != 0 {
					t.Errorf("container %s exited with %d: %s", name, st.Status.ExitCode, st.Status.Message)
				}
				break
			}
			select {
			case <-ctx.Done():
				t.Fatalf("container %s still %v", name, st.Status.State)
			case <-time.After(100 * time.Millisecond):
			}
		}
		if _, err := runtime.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: c.ContainerId}); err != nil {
			t.Errorf("remove container: %v", err)
		}
		return criLog(t, filepath.Join(logDir, name+".log"))
	}

	t.Run("lazy pull with the pod's secret", func(t *testing.T) {
		rec.take()
		if err := pull(lazy, secret); err != nil {
			t.Fatal(err)
		}
		// The snapshotter opens the layers in the background of the pull: wait for its first authorized read.
		var reqs []blobRequest
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			reqs = append(reqs, rec.take()...)
			if slices.ContainsFunc(reqs, func(r blobRequest) bool { return r.authorized && r.status < 300 && r.bytes > 0 }) {
				break
			}
		}
		time.Sleep(500 * time.Millisecond)
		reqs = append(reqs, rec.take()...)
		// The snapshotter opens each layer as the pull commits it ([prefetch] on_pull): its header and index,
		// read with the pull's credentials.
		authorized := 0
		for _, l := range lazyLayers {
			var n int64
			for _, r := range reqs {
				if r.digest != l.Digest.String() {
					continue
				}
				if r.status == http.StatusUnauthorized {
					continue // the challenge before the token
				}
				n += r.bytes
				if r.authorized && r.status < 300 {
					authorized++
				}
				if !r.authorized || r.status >= 300 {
					t.Errorf("a read of layer %s during the pull went without the pod's secret: %+v", l.Digest, r)
				}
			}
			if n > 768<<10 && n > l.Size/2 {
				t.Errorf("the pull fetched %d bytes of layer %s (%d bytes): want its header and index", n, l.Digest, l.Size)
			}
		}
		if authorized == 0 {
			t.Error("no layer was read with the pull's credentials during the pull")
		}

		out := runApp(t, "lazy", lazy)
		if out != appOutput {
			t.Fatalf("container printed %q, want %q", out, appOutput)
		}
		// The container's reads were ranges of the layers, authorized with the pod's secret (the node has no
		// credentials), and a fraction of the image.
		var total, fetched int64
		ranges := 0
		reqs = rec.take()
		for _, l := range lazyLayers {
			total += l.Size
			for _, r := range reqs {
				if r.digest != l.Digest.String() {
					continue
				}
				if r.status == http.StatusPartialContent {
					if !r.authorized || r.rng == "" {
						t.Errorf("range read %+v: want an authorized range request", r)
					}
					ranges++
					fetched += r.bytes
				}
			}
		}
		t.Logf("the container read %d ranges, %d of %d layer bytes", ranges, fetched, total)
		if ranges == 0 || fetched == 0 || fetched > total/2 {
			t.Errorf("%d range reads fetched %d of %d layer bytes: want authorized range reads of a fraction", ranges, fetched, total)
		}
	})

	// kubelet pulls the original tag; the snapshotter finds the overlaybd image attached to it and reads that
	// lazily: no layer of the original is downloaded. (Before the original itself is pulled: containerd would find
	// its layers unpacked under the same chain IDs.)
	t.Run("normal tag with an overlaybd referrer, lazily", func(t *testing.T) {
		rec.take()
		if err := pull(withRef, secret); err != nil {
			t.Fatal(err)
		}
		if out := runApp(t, "withref", withRef); out != refOutput {
			t.Fatalf("container printed %q, want %q", out, refOutput)
		}
		reqs := rec.take()
		for _, l := range layers(withRef) {
			for _, r := range reqs {
				if r.digest == l.Digest.String() && r.bytes > 0 {
					t.Errorf("layer %s of the original image was fetched: %+v", l.Digest, r)
				}
			}
		}
		ranges := 0
		for _, r := range reqs {
			if r.status == http.StatusPartialContent {
				ranges++
			}
		}
		if ranges == 0 {
			t.Error("no range read of the overlaybd layers: the image was not read lazily")
		}
		if log := sb.Log("snapshotter"); !strings.Contains(log, "pulling the overlaybd image that stands in for the image") {
			t.Errorf("the snapshotter's log does not show the stand-in:\n%s", log)
		}
	})

	t.Run("normal image as before", func(t *testing.T) {
		rec.take()
		if err := pull(plain, secret); err != nil {
			t.Fatal(err)
		}
		// containerd downloaded and unpacked every layer, as without obd.
		got := map[string]int64{}
		for _, r := range rec.take() {
			if r.status == http.StatusOK && r.authorized {
				got[r.digest] += r.bytes
			}
		}
		for _, l := range plainLayers {
			if got[l.Digest.String()] != l.Size {
				t.Errorf("layer %s: the pull fetched %d of %d bytes, want all of it", l.Digest, got[l.Digest.String()], l.Size)
			}
		}
		if out := runApp(t, "plain", plain); out != appOutput {
			t.Fatalf("container printed %q, want %q", out, appOutput)
		}
	})

	t.Run("credentials appear nowhere", func(t *testing.T) {
		secrets := []string{password, base64.StdEncoding.EncodeToString([]byte(user + ":" + password))}
		texts := map[string]string{"obd-snapshotter log": sb.Log("snapshotter")}
		texts["obd status --json"] = run(t, exec.Command(bins.obd, "status", "--json", "--socket", sb.StatusSocket))
		resp, err := http.Get("http://" + sb.Metrics + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		texts["metrics"] = string(body)
		if !strings.Contains(texts["obd-snapshotter log"], "CRI pull") || !strings.Contains(texts["metrics"], "obd_registry_requests_total") {
			t.Fatalf("the log or the metrics are not the daemon's:\n%s\n%s", texts["obd-snapshotter log"], texts["metrics"])
		}
		// The daemon's state: snapshots, devices, block cache (file systems mounted below are not walked).
		files := 0
		for _, dir := range []string{filepath.Join(sb.Dir, "snapshotter"), sb.CacheDir()} {
			files += grepTree(t, dir, secrets)
		}
		for name, text := range texts {
			for _, s := range secrets {
				if strings.Contains(text, s) {
					t.Errorf("the %s shows the credentials (%q)", name, s)
				}
			}
		}
		t.Logf("searched the log, status, metrics and %d files", files)
	})
}

// grepTree fails the test for every regular file under dir, on dir's file system, that holds one of needles,
// and returns how many files it read. Mounts below dir (the image devices, their file systems) are not read: they
// hold the image, and reading them would fetch all of it.
func grepTree(t *testing.T, dir string, needles []string) int {
	t.Helper()
	var root syscall.Stat_t
	if err := syscall.Stat(dir, &root); err != nil {
		t.Fatal(err)
	}
	n := 0
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // removed meanwhile (a stopped container's files)
		}
		if err != nil {
			return err
		}
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil || st.Dev != root.Dev {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		n++
		for _, s := range needles {
			if fileContains(t, path, s) {
				t.Errorf("%s holds the credentials (%q)", path, s)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// fileContains reports whether the file at path holds needle, reading it in pieces.
func fileContains(t *testing.T, path, needle string) bool {
	t.Helper()
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false // removed meanwhile (a stopped container's files)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	keep := 0 // bytes of the previous piece kept in front, so that a needle across two pieces is found
	for {
		m, err := f.Read(buf[keep:])
		if strings.Contains(string(buf[:keep+m]), needle) {
			return true
		}
		if err == io.EOF {
			return false
		}
		if err != nil {
			t.Fatal(err)
		}
		if k := min(len(needle)-1, keep+m); k > 0 {
			copy(buf, buf[keep+m-k:keep+m])
			keep = k
		} else {
			keep = 0
		}
	}
}

// criLog returns the messages of a container log in the CRI format ("<time> <stream> <P|F> <message>").
func criLog(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out strings.Builder
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.SplitN(sc.Text(), " ", 4)
		if len(fields) < 4 {
			t.Fatalf("container log line %q is not in the CRI format", sc.Text())
		}
		out.WriteString(fields[3])
		if fields[2] == "F" {
			out.WriteString("\n")
		}
	}
	return out.String()
}

func dialUnix(t *testing.T, path string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func quote(s string) string { b, _ := json.Marshal(s); return string(b) }
