// Package demo runs obd's end-to-end demo in a private sandbox: a sample image built from a Debian package,
// converted to overlaybd, pulled lazily and run, with what was fetched and how long each step took.
package demo

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/pull"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/sandbox"
	"github.com/obdproject/obd/internal/testimage"
	"github.com/obdproject/obd/internal/units"
)

// Check checks that the demo can run here: as root, with the tools it needs and snapshotterBin (default: the
// obd-snapshotter next to the running binary), which it returns.
func Check(snapshotterBin string) (string, error) {
	if os.Geteuid() != 0 {
		return "", errors.New("the demo mounts filesystems and runs containers: run it as root")
	}
	if snapshotterBin == "" {
		exe, err := os.Executable()
		if err != nil {
			return "", err
		}
		snapshotterBin = filepath.Join(filepath.Dir(exe), "obd-snapshotter")
	}
	for _, tool := range append([]string{snapshotterBin, "apt-get", "dpkg-deb"}, sandbox.Required...) {
		if _, err := exec.LookPath(tool); err != nil {
			return "", fmt.Errorf("%s is missing: run 'make deps' (Debian packages) and 'make build' first", tool)
		}
	}
	return snapshotterBin, nil
}

// Run runs the demo, printing each step on w: it builds a sample image, starts a sandbox (registry, containerd,
// snapshotterBin), converts and pushes the image, pulls it lazily and runs a container from it, then cleans up.
func Run(ctx context.Context, w io.Writer, snapshotterBin string) error {
	step := func(format string, args ...any) { fmt.Fprintf(w, "\n== "+format+"\n", args...) }
	timed := func(start time.Time) string { return time.Since(start).Round(time.Millisecond).String() }
	work, err := os.MkdirTemp("", "obd-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)

	step("1. Build a sample image from Debian packages (busybox-static) plus 64 MiB of data the app never reads")
	start := time.Now()
	src := filepath.Join(work, "src")
	if err := buildDemoImage(ctx, w, src); err != nil {
		return fmt.Errorf("build sample image: %w", err)
	}
	fmt.Fprintf(w, "image written to an OCI layout in %s\n", timed(start))

	step("2. Start a private registry, containerd and obd-snapshotter")
	sb, err := sandbox.Start(ctx, sandbox.Options{Snapshotter: snapshotterBin, Logf: func(f string, a ...any) { fmt.Fprintf(w, f+"\n", a...) }})
	if err != nil {
		return err
	}
	defer func() {
		if err := sb.Close(); err != nil {
			fmt.Fprintf(w, "cleanup: %v\n", err)
		}
	}()
	plain, err := image.ParseRef(sb.Registry + "/demo/app:v1")
	if err != nil {
		return err
	}
	lazy, err := image.ParseRef(sb.Registry + "/demo/app:v1-obd")
	if err != nil {
		return err
	}
	rc, err := registry.New(registry.Options{PlainHTTP: true, UserAgent: "obd-demo"})
	if err != nil {
		return err
	}
	defer rc.Close()
	lay, err := image.OpenLayout(src)
	if err != nil {
		return err
	}
	if err := image.PushLayout(ctx, rc, lay, "v1", plain); err != nil {
		return err
	}
	fmt.Fprintf(w, "pushed %s\n", plain)

	step("3. Convert %s to overlaybd → %s", plain, lazy)
	start = time.Now()
	source, err := image.OpenRegistrySource(ctx, rc, plain, image.DefaultPlatform())
	if err != nil {
		return err
	}
	res, err := convert.ConvertImage(ctx, source, convert.ImageOptions{VirtualSize: 8 << 30, WorkDir: work, ZFile: convert.DefaultZFile,
		Progress: func(p convert.Progress) { fmt.Fprintln(w, p) }})
	if err != nil {
		return err
	}
	defer res.Cleanup()
	var total int64
	for _, b := range res.Blobs {
		total += b.Desc.Size
	}
	if err := image.NewRegistrySink(rc, lazy).PutImage(ctx, res.Image(), lazy.Tag, false); err != nil {
		return err
	}
	fmt.Fprintf(w, "converted and pushed in %s: %d layers, %s of layer blobs\n", timed(start), len(res.Blobs), units.Bytes(total))

	step("4. Pull it lazily into containerd (obd pull)")
	c, err := client.New(sb.Containerd)
	if err != nil {
		return err
	}
	defer c.Close()
	cctx := namespaces.WithNamespace(ctx, sb.Namespace)
	sb.ResetCounters()
	start = time.Now()
	pr, err := pull.Pull(cctx, c, lazy.String(), pull.Options{})
	if err != nil {
		return err
	}
	pulled := timed(start)
	time.Sleep(500 * time.Millisecond) // obd-snapshotter opens the layers in the background of the pull
	fmt.Fprintf(w, "pulled in %s: %d of %d layers lazy; fetched from the registry: %s (the config, and the header and index of each layer,\n"+
		"which obd-snapshotter reads as the pull commits the layers)\n", pulled, pr.Lazy, pr.Layers, units.Bytes(sumBytes(sb.BlobBytes())))

	step("5. Run a container from it (ctr run --snapshotter overlaybd)")
	sb.ResetCounters()
	start = time.Now()
	out, err := sb.Ctr(ctx, "run", "--rm", "--snapshotter", "overlaybd", lazy.String(), "demo1", "/bin/sh", "/app/run.sh").CombinedOutput()
	fmt.Fprintf(w, "%s", out)
	if err != nil {
		return fmt.Errorf("ctr run: %w", err)
	}
	fetched := sumBytes(sb.BlobBytes())
	fmt.Fprintf(w, "container ran in %s, reading files from all 3 layers; it fetched %s of %s (%.1f%%) of the image's layers\n",
		timed(start), units.Bytes(fetched), units.Bytes(total), 100*float64(fetched)/float64(total))

	step("done: everything is cleaned up")
	return nil
}

func sumBytes(m map[string]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}

// buildDemoImage writes a three-layer image (tag v1) to an OCI layout: busybox from its Debian package, the
// shell's applet links and a config file, and an app with a large data file.
func buildDemoImage(ctx context.Context, w io.Writer, dir string) error {
	debs, err := testimage.Fetch(ctx, []string{"busybox-static"}, testimage.DefaultCacheDir(), func(f string, a ...any) { fmt.Fprintf(w, f+"\n", a...) })
	if err != nil {
		return err
	}
	base, err := exec.CommandContext(ctx, "dpkg-deb", "--fsys-tarfile", debs[0].Path).Output()
	if err != nil {
		return fmt.Errorf("dpkg-deb --fsys-tarfile %s: %w", debs[0].Path, err)
	}
	var links []tarEntry
	for _, n := range []string{"sh", "cat", "ls", "echo", "wc", "head"} {
		links = append(links, tarEntry{name: "bin/" + n, link: "busybox", mode: 0o777})
	}
	links = append(links, tarEntry{name: "etc/motd", mode: 0o644, body: []byte("hello from layer 2 (the busybox package is layer 1)\n")})
	data := make([]byte, 64<<20)
	if _, err := rand.NewChaCha8([32]byte{'o', 'b', 'd'}).Read(data); err != nil {
		return err
	}
	app := []tarEntry{
		{name: "app/run.sh", mode: 0o755, body: []byte("cat /etc/motd\necho \"layer 3: /app holds $(ls /app | wc -l) files; the app reads only this script\"\nbusybox | head -1\n")},
		{name: "app/data.bin", mode: 0o644, body: data},
	}
	layers := [][]byte{base}
	for _, ents := range [][]tarEntry{links, app} {
		b, err := tarOf(ents)
		if err != nil {
			return err
		}
		layers = append(layers, b)
	}
	lay, err := image.CreateLayout(dir)
	if err != nil {
		return err
	}
	var cfg ocispec.Image
	cfg.Config.Env = []string{"PATH=/bin"}
	_, err = lay.WriteImage("v1", layers, "", cfg)
	return err
}

// tarEntry is a regular file (body) or a symbolic link (link) of a demo layer.
type tarEntry struct {
	name, link string
	mode       int64
	body       []byte
}

// tarOf writes entries into an uncompressed tar with fixed timestamps.
func tarOf(entries []tarEntry) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Typeflag: tar.TypeReg, Mode: e.mode, Size: int64(len(e.body)), ModTime: time.Unix(1700000000, 0)}
		if e.link != "" {
			h.Typeflag, h.Linkname = tar.TypeSymlink, e.link
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.body); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
