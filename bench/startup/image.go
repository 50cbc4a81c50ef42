package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/obdproject/obd/internal/units"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/testimage"
	"github.com/obdproject/obd/zfile"
)

// The app: Python starts, imports numpy and scipy (and the BLAS/LAPACK/Fortran libraries they load) and says so.
const appScript = "import numpy, scipy; print('ready')"

var appCmd = []string{"python3", "-c", appScript}

// layerRoots are the packages each layer is built from, bottom first; every layer holds the Debian dependency
// closure of its roots (Depends and Pre-Depends, no Recommends) minus what the layers below hold.
var layerRoots = [][]string{
	{"base-files", "busybox-static", "libc6"},
	{"python3"},
	{"python3-numpy", "python3-scipy"},
}

// Tags of the two images in the cached OCI layout.
const (
	tagPlain = "plain"
	tagOBD   = "obd"
	tagTurbo = "turbo"
	tagAccel = "obd-accel"
	// tagTurboAccel is the TurboOCI image with the acceleration layer of its recorded start.
	tagTurboAccel = "turbo-accel"
)

// builtImage is the benchmark image, plain and converted, in an OCI layout; info.json beside it keeps what was
// learned while building.
type builtImage struct {
	Dir  string    `json:"-"`
	Info imageInfo `json:"-"`
}

type imageInfo struct {
	Packages       [][]string        `json:"packages"` // per package layer
	Versions       map[string]string `json:"versions"`
	PlainLayers    []layerInfo       `json:"plainLayers"`
	OBDLayers      []layerInfo       `json:"obdLayers"`
	TarBytes       int64             `json:"tarBytes"`
	GzipBytes      int64             `json:"gzipBytes"`
	OBDBytes       int64             `json:"obdBytes"`
	ConvertSeconds float64           `json:"convertSeconds"`
	// TurboBytes is the size of the TurboOCI image's own layer blobs (metadata and gzip indexes), beside the
	// original layers it references; TurboSeconds the time its conversion took.
	TurboBytes        int64   `json:"turboBytes"`
	TurboSeconds      float64 `json:"turboConvertSeconds"`
	BuildSeconds      float64 `json:"buildSeconds"`
	LDLibraryPath     string  `json:"ldLibraryPath"`
	ZFile             string  `json:"zfileAlgorithm"`
	FsType            string  `json:"fsType,omitempty"` // of the overlaybd image
	ConvertedThisTime bool    `json:"convertedThisRun"`
}

type layerInfo struct {
	Digest   string `json:"digest"`
	Size     int64  `json:"size"`
	TarBytes int64  `json:"tarBytes,omitempty"`
	Packages int    `json:"packages,omitempty"`
}

// prepareImage returns the benchmark image from the cache under root, building and converting it when the
// cache has no image of the current package set (or rebuild is set).
func prepareImage(ctx context.Context, root string, rebuild bool, zopts zfile.Options, fsType string, logf func(string, ...any)) (*builtImage, error) {
	var layers [][]string
	have := map[string]bool{}
	for i, roots := range layerRoots {
		all, err := dependencyClosure(ctx, roots)
		if err != nil {
			return nil, fmt.Errorf("layer %d (%s): %w", i+1, strings.Join(roots, " "), err)
		}
		var l []string
		for _, p := range all {
			if !have[p] {
				have[p] = true
				l = append(l, p)
			}
		}
		layers = append(layers, l)
	}
	h := sha256.New()
	fmt.Fprintf(h, "obd bench/startup image v2\n%s\nzfile %d\n", appScript, zopts.Algorithm)
	if zopts.BlockSize != 4096 {
		fmt.Fprintf(h, "zfile block %d\n", zopts.BlockSize)
	}
	if fsType != convert.FsExt4 {
		fmt.Fprintf(h, "fstype %s\n", fsType)
	}
	for _, l := range layers {
		fmt.Fprintf(h, "%s\n", strings.Join(l, " "))
	}
	dir := filepath.Join(root, "image-"+hex.EncodeToString(h.Sum(nil))[:16])
	if !rebuild {
		if im, err := loadImage(dir); err == nil {
			logf("using the image built earlier in %s (--rebuild builds it again)", dir)
			return im, nil
		}
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(root, ".build-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	im, err := buildImage(ctx, tmp, layers, zopts, fsType, logf)
	if err != nil {
		return nil, err
	}
	os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		return nil, err
	}
	im.Dir = dir
	return im, nil
}

func loadImage(dir string) (*builtImage, error) {
	b, err := os.ReadFile(filepath.Join(dir, "info.json"))
	if err != nil {
		return nil, err
	}
	im := &builtImage{Dir: dir}
	if err := json.Unmarshal(b, &im.Info); err != nil {
		return nil, err
	}
	lay, err := image.OpenLayout(dir)
	if err != nil {
		return nil, err
	}
	for _, tag := range []string{tagPlain, tagOBD} {
		if _, err := lay.Resolve(image.Ref{Tag: tag}); err != nil {
			return nil, err
		}
	}
	im.Info.ConvertedThisTime = false
	if _, err := lay.Resolve(image.Ref{Tag: tagTurbo}); err != nil {
		// An image cached before the TurboOCI case: add its conversion.
		if err := convertTurbo(context.Background(), im, lay, func(string, ...any) {}); err != nil {
			return nil, err
		}
		if err := saveInfo(im); err != nil {
			return nil, err
		}
	}
	return im, nil
}

func buildImage(ctx context.Context, dir string, layers [][]string, zopts zfile.Options, fsType string, logf func(string, ...any)) (*builtImage, error) {
	start := time.Now()
	spec := testimage.Spec{Name: "startup", Layers: layers}
	n := 0
	for _, l := range layers {
		n += len(l)
	}
	logf("building the image from %d Debian packages (.debs cached in %s)", n, testimage.DefaultCacheDir())
	ti, err := testimage.Build(ctx, spec, dir, testimage.Options{Log: logf})
	if err != nil {
		return nil, err
	}
	im := &builtImage{Dir: dir, Info: imageInfo{Packages: layers, Versions: ti.Versions, ConvertedThisTime: true, ZFile: zfileName(zopts), FsType: fsType}}
	lay, err := image.OpenLayout(dir)
	if err != nil {
		return nil, err
	}
	// testimage adds a config layer on top whose hardlink to a file of a lower layer (bin/sh → bin/busybox)
	// containerd's overlayfs unpack cannot apply; the benchmark image is the package layers alone.
	pkgLayers := slices.DeleteFunc(slices.Clone(ti.Layers), func(l testimage.Layer) bool { return len(l.Packages) == 0 })
	ld, err := setAppConfig(lay, spec.Name, tagPlain, len(pkgLayers))
	if err != nil {
		return nil, err
	}
	im.Info.LDLibraryPath = ld
	for _, l := range pkgLayers {
		im.Info.PlainLayers = append(im.Info.PlainLayers, layerInfo{Digest: l.Desc.Digest.String(), Size: l.Desc.Size, TarBytes: l.TarBytes, Packages: len(l.Packages)})
		im.Info.TarBytes += l.TarBytes
		im.Info.GzipBytes += l.Desc.Size
	}
	im.Info.BuildSeconds = time.Since(start).Seconds()
	logf("image built in %s: %d layers, %s of tar, %s gzip", time.Since(start).Round(time.Second), len(pkgLayers),
		units.Bytes(im.Info.TarBytes), units.Bytes(im.Info.GzipBytes))

	start = time.Now()
	src, err := image.OpenLocalSource(image.Ref{Transport: image.TransportOCI, Path: dir, Tag: tagPlain}, image.DefaultPlatform())
	if err != nil {
		return nil, err
	}
	defer src.Close()
	zopts.Workers = runtime.NumCPU()
	res, err := convert.ConvertImage(ctx, src, convert.ImageOptions{WorkDir: filepath.Dir(dir), ZFile: zopts, FsType: fsType, Progress: func(p convert.Progress) {
		if p.Stage == "done" {
			logf("converted layer %d/%d: %s", p.Layer+1, p.Layers, units.Bytes(p.Bytes))
		}
	}})
	if err != nil {
		return nil, fmt.Errorf("convert: %w", err)
	}
	defer res.Cleanup()
	for _, b := range res.Blobs {
		if err := lay.PutBlobFile(b.Path, b.Desc.Digest, b.Desc.Size); err != nil {
			return nil, err
		}
		im.Info.OBDLayers = append(im.Info.OBDLayers, layerInfo{Digest: b.Desc.Digest.String(), Size: b.Desc.Size})
		im.Info.OBDBytes += b.Desc.Size
	}
	if _, err := lay.PutBlobBytes(res.ConfigDesc.MediaType, res.Config); err != nil {
		return nil, err
	}
	if _, err := lay.PutBlobBytes(res.ManifestDesc.MediaType, res.Manifest); err != nil {
		return nil, err
	}
	if err := lay.Tag(tagOBD, res.ManifestDesc); err != nil {
		return nil, err
	}
	im.Info.ConvertSeconds = time.Since(start).Seconds()
	logf("converted to overlaybd in %s: %s of layer blobs", time.Since(start).Round(time.Second), units.Bytes(im.Info.OBDBytes))
	if err := convertTurbo(ctx, im, lay, logf); err != nil {
		return nil, err
	}
	return im, saveInfo(im)
}

func saveInfo(im *builtImage) error {
	b, err := json.MarshalIndent(im.Info, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(im.Dir, "info.json"), b, 0o644)
}

// convertTurbo converts the plain image to TurboOCI, tagged tagTurbo in the same layout (its originals are there).
func convertTurbo(ctx context.Context, im *builtImage, lay *image.Layout, logf func(string, ...any)) error {
	start := time.Now()
	src, err := image.OpenLocalSource(image.Ref{Transport: image.TransportOCI, Path: im.Dir, Tag: tagPlain}, image.DefaultPlatform())
	if err != nil {
		return err
	}
	defer src.Close()
	res, err := convert.ConvertImage(ctx, src, convert.ImageOptions{WorkDir: filepath.Dir(im.Dir), Turbo: true})
	if err != nil {
		return fmt.Errorf("convert --turbo: %w", err)
	}
	defer res.Cleanup()
	im.Info.TurboBytes = 0
	for _, b := range append(res.Targets, res.Blobs...) {
		if err := lay.PutBlobFile(b.Path, b.Desc.Digest, b.Desc.Size); err != nil {
			return err
		}
	}
	for _, b := range res.Blobs {
		im.Info.TurboBytes += b.Desc.Size
	}
	if _, err := lay.PutBlobBytes(res.ConfigDesc.MediaType, res.Config); err != nil {
		return err
	}
	if _, err := lay.PutBlobBytes(res.ManifestDesc.MediaType, res.Manifest); err != nil {
		return err
	}
	if err := lay.Tag(tagTurbo, res.ManifestDesc); err != nil {
		return err
	}
	im.Info.TurboSeconds = time.Since(start).Seconds()
	logf("converted to TurboOCI in %s: %s of layer blobs beside the originals", time.Since(start).Round(time.Millisecond), units.Bytes(im.Info.TurboBytes))
	return nil
}

// setAppConfig rewrites the config of the image tagged from so that the app runs with no arguments (Cmd) and finds
// its libraries: Debian selects libblas.so.3/liblapack.so.3 with update-alternatives in maintainer scripts, which
// an image built from unpacked .debs never ran, so LD_LIBRARY_PATH names the directories instead (OpenBLAS first,
// as its alternative has the higher priority). It keeps the bottom keep layers, tags the result to and returns
// the LD_LIBRARY_PATH.
func setAppConfig(lay *image.Layout, from, to string, keep int) (string, error) {
	d, err := lay.Resolve(image.Ref{Tag: from})
	if err != nil {
		return "", err
	}
	m, _, err := lay.Manifest(d, image.DefaultPlatform())
	if err != nil {
		return "", err
	}
	cb, err := lay.ReadBlob(m.Config)
	if err != nil {
		return "", err
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(cb, &cfg); err != nil {
		return "", err
	}
	if keep > len(m.Layers) || len(cfg.RootFS.DiffIDs) != len(m.Layers) {
		return "", fmt.Errorf("image %s: %d layers, %d diff ids; want to keep %d", from, len(m.Layers), len(cfg.RootFS.DiffIDs), keep)
	}
	m.Layers, cfg.RootFS.DiffIDs = m.Layers[:keep], cfg.RootFS.DiffIDs[:keep]
	if len(cfg.History) > keep {
		cfg.History = cfg.History[:keep]
	}
	multiarch := map[string]string{"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}[runtime.GOARCH]
	if multiarch == "" {
		return "", fmt.Errorf("no Debian multiarch triplet known for %s", runtime.GOARCH)
	}
	var dirs []string
	for _, sub := range []string{"openblas-pthread", "blas", "lapack"} {
		dirs = append(dirs, "/usr/lib/"+multiarch+"/"+sub)
	}
	ld := strings.Join(dirs, ":")
	cfg.Config.Env = slices.DeleteFunc(cfg.Config.Env, func(kv string) bool { return strings.HasPrefix(kv, "LD_LIBRARY_PATH=") })
	cfg.Config.Env = append(cfg.Config.Env, "LD_LIBRARY_PATH="+ld)
	cfg.Config.Cmd = appCmd
	cfg.Config.WorkingDir = "/"
	nb, err := json.Marshal(cfg)
	if err != nil {
		return "", err
	}
	if m.Config, err = lay.PutBlobBytes(m.Config.MediaType, nb); err != nil {
		return "", err
	}
	mb, err := json.Marshal(m)
	if err != nil {
		return "", err
	}
	md, err := lay.PutBlobBytes(ocispec.MediaTypeImageManifest, mb)
	if err != nil {
		return "", err
	}
	return ld, lay.Tag(to, md)
}

// dependencyClosure lists the packages apt would install for roots on an empty system (Depends and Pre-Depends,
// first alternatives, no Recommends), in apt's install order.
func dependencyClosure(ctx context.Context, roots []string) ([]string, error) {
	tmp, err := os.MkdirTemp("", "obd-bench-apt-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	status := filepath.Join(tmp, "status")
	if err := os.WriteFile(status, nil, 0o644); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(tmp, "archives", "partial"), 0o755); err != nil {
		return nil, err
	}
	resolve := func() ([]byte, error) {
		args := []string{"-qq", "-o", "Dir::State::status=" + status, "-o", "Dir::Cache::archives=" + filepath.Join(tmp, "archives"),
			"-o", "APT::Install-Recommends=false", "-o", "Debug::NoLocking=1", "install", "--print-uris", "-y"}
		cmd := exec.CommandContext(ctx, "apt-get", append(args, roots...)...)
		cmd.Env = append(os.Environ(), "LC_ALL=C")
		return cmd.CombinedOutput()
	}
	out, err := resolve()
	if err != nil && os.Geteuid() == 0 {
		// Fresh machines have no package lists.
		if uout, uerr := exec.CommandContext(ctx, "apt-get", "-q", "update").CombinedOutput(); uerr != nil {
			return nil, fmt.Errorf("apt-get update: %v\n%s", uerr, uout)
		}
		out, err = resolve()
	}
	if err != nil {
		return nil, fmt.Errorf("apt-get install --print-uris %s: %v\n%s", strings.Join(roots, " "), err, out)
	}
	var pkgs []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || !strings.HasPrefix(f[0], "'") {
			continue
		}
		name, _, ok := strings.Cut(f[1], "_")
		if !ok {
			return nil, fmt.Errorf("apt-get printed an unexpected file name %q", f[1])
		}
		pkgs = append(pkgs, name)
	}
	if len(pkgs) == 0 {
		return nil, errors.New("apt-get resolved no packages")
	}
	return pkgs, nil
}

// zfileName names the ZFile options of the image: lz4 or zstd, with the block size when it is not 4 KiB.
func zfileName(o zfile.Options) string {
	name := "lz4"
	if o.Algorithm == zfile.AlgoZSTD {
		name = "zstd"
	}
	if o.BlockSize != 4096 {
		name += fmt.Sprintf(", %d KiB blocks", o.BlockSize>>10)
	}
	return name
}
