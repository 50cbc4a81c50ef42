package main

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"time"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/convert"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/iocount"
	"github.com/obdproject/obd/lsmt"
	"github.com/obdproject/obd/zfile"
)

// bigFile is the path of the big file inside the image.
const bigFile = "data/big.bin"

// imageParams are what the built image depends on; a kept image directory is reused only when they match.
type imageParams struct {
	FileBytes   int64 `json:"file_bytes"`
	VirtualSize int64 `json:"virtual_size"`
	SmallFiles  int   `json:"small_files"`
	Generator   int   `json:"generator"` // bump when the content generator changes
}

const generatorVersion = 1

// builtImage is the converted image: its layer blobs on local disk and the raw export of its disk.
type builtImage struct {
	Params    imageParams    `json:"params"`
	BigSHA256 string         `json:"big_sha256"` // of the big file's content
	TarBytes  int64          `json:"tar_bytes"`
	Blobs     []builtBlob    `json:"blobs"` // bottom first
	Raw       string         `json:"raw"`   // sparse raw export of the disk
	RawData   int64          `json:"raw_data_bytes"`
	Seconds   map[string]any `json:"seconds"` // build, convert (per stage) and export times
}

type builtBlob struct {
	Digest digest.Digest `json:"digest"`
	Size   int64         `json:"size"`
	Path   string        `json:"path"`
}

// buildImage returns the image in dir, building it there unless dir already holds one built with params.
func buildImage(ctx context.Context, dir string, params imageParams, logf func(string, ...any)) (*builtImage, error) {
	meta := filepath.Join(dir, "image.json")
	if b, err := os.ReadFile(meta); err == nil {
		var img builtImage
		if json.Unmarshal(b, &img) == nil && img.Params == params && img.complete() {
			logf("reusing the image built in %s", dir)
			return &img, nil
		}
	}
	for _, sub := range []string{"layout", "converted", "disk.raw", "image.json", "work"} {
		if err := os.RemoveAll(filepath.Join(dir, sub)); err != nil {
			return nil, err
		}
	}
	img := &builtImage{Params: params, Seconds: map[string]any{}}

	start := time.Now()
	logf("building an OCI layout with a %d MiB file and %d small files", params.FileBytes>>20, params.SmallFiles)
	ref, err := writeSourceLayout(filepath.Join(dir, "layout"), params, img)
	if err != nil {
		return nil, fmt.Errorf("build source image: %w", err)
	}
	img.Seconds["build"] = time.Since(start).Seconds()

	start = time.Now()
	logf("converting it with convert.ConvertImage (virtual size %d GiB)", params.VirtualSize>>30)
	src, err := image.OpenLocalSource(ref, image.DefaultPlatform())
	if err != nil {
		return nil, err
	}
	defer src.Close()
	work := filepath.Join(dir, "work")
	if err := os.MkdirAll(work, 0o755); err != nil {
		return nil, err
	}
	res, err := convert.ConvertImage(ctx, src, convert.ImageOptions{
		VirtualSize: params.VirtualSize,
		OCI:         true,
		WorkDir:     work,
		ZFile:       zfile.Options{Workers: runtime.NumCPU()},
	})
	if err != nil {
		return nil, fmt.Errorf("convert: %w", err)
	}
	defer res.Cleanup()
	conv := map[string]float64{"total": time.Since(start).Seconds()}
	for stage, d := range res.Timings {
		conv[stage] = d.Seconds()
	}
	img.Seconds["convert"] = conv
	out := filepath.Join(dir, "converted")
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, err
	}
	for i, b := range res.Blobs {
		p := filepath.Join(out, fmt.Sprintf("layer%d-%s", i, b.Desc.Digest.Encoded()))
		if err := os.Rename(b.Path, p); err != nil {
			return nil, err
		}
		img.Blobs = append(img.Blobs, builtBlob{Digest: b.Desc.Digest, Size: b.Desc.Size, Path: p})
	}
	if err := os.RemoveAll(work); err != nil {
		return nil, err
	}

	start = time.Now()
	logf("exporting the disk with image.ExportRaw")
	img.Raw = filepath.Join(dir, "disk.raw")
	if img.RawData, err = exportRaw(ctx, img.Blobs, img.Raw); err != nil {
		return nil, fmt.Errorf("export raw disk: %w", err)
	}
	img.Seconds["export_raw"] = time.Since(start).Seconds()
	b, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return nil, err
	}
	return img, os.WriteFile(meta, b, 0o644)
}

// complete reports whether the files of a reused image are all there.
func (img *builtImage) complete() bool {
	paths := []string{img.Raw}
	for _, b := range img.Blobs {
		paths = append(paths, b.Path)
	}
	for _, p := range paths {
		if _, err := os.Stat(p); err != nil {
			return false
		}
	}
	return len(img.Blobs) > 0
}

// blobBytes is the total size of the layer blobs.
func (img *builtImage) blobBytes() int64 {
	var n int64
	for _, b := range img.Blobs {
		n += b.Size
	}
	return n
}

// writeSourceLayout writes a one-layer image (uncompressed tar: the converter's input speed is not measured here)
// into an OCI layout at dir and returns its reference.
func writeSourceLayout(dir string, params imageParams, img *builtImage) (image.Ref, error) {
	lay, err := image.CreateLayout(dir)
	if err != nil {
		return image.Ref{}, err
	}
	tmp, err := os.CreateTemp(dir, "layer-*.tar")
	if err != nil {
		return image.Ref{}, err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	h := sha256.New()
	cw := &iocount.Writer{W: io.MultiWriter(tmp, h)}
	if err := writeLayerTar(cw, params, img); err != nil {
		return image.Ref{}, err
	}
	if err := tmp.Close(); err != nil {
		return image.Ref{}, err
	}
	layerDigest := digest.NewDigest(digest.SHA256, h)
	img.TarBytes = cw.N
	if err := lay.PutBlobFile(tmp.Name(), layerDigest, cw.N); err != nil {
		return image.Ref{}, err
	}
	created := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	cfg := ocispec.Image{
		Created:  &created,
		Platform: ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH},
		Config:   ocispec.ImageConfig{Env: []string{"PATH=/usr/bin:/bin"}},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{layerDigest}},
	}
	cb, err := json.Marshal(cfg)
	if err != nil {
		return image.Ref{}, err
	}
	cd, err := lay.PutBlobBytes(ocispec.MediaTypeImageConfig, cb)
	if err != nil {
		return image.Ref{}, err
	}
	m := ocispec.Manifest{
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    cd,
		Layers:    []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageLayer, Digest: layerDigest, Size: cw.N}},
	}
	m.SchemaVersion = 2
	mb, err := json.Marshal(m)
	if err != nil {
		return image.Ref{}, err
	}
	md, err := lay.PutBlobBytes(ocispec.MediaTypeImageManifest, mb)
	if err != nil {
		return image.Ref{}, err
	}
	if err := lay.Tag("v1", md); err != nil {
		return image.Ref{}, err
	}
	return image.Ref{Transport: image.TransportOCI, Path: dir, Tag: "v1"}, nil
}

// writeLayerTar writes the layer: directories, the small text files and the big file.
func writeLayerTar(w io.Writer, params imageParams, img *builtImage) error {
	tw := tar.NewWriter(w)
	mtime := time.Unix(1700000000, 0)
	dir := func(name string) error {
		return tw.WriteHeader(&tar.Header{Name: name + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: mtime})
	}
	file := func(name string, size int64, r io.Reader) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: size, ModTime: mtime}); err != nil {
			return err
		}
		_, err := io.CopyN(tw, r, size)
		return err
	}
	for _, d := range []string{"etc", "usr", "usr/share", "usr/share/doc", "data"} {
		if err := dir(d); err != nil {
			return err
		}
	}
	for i := range params.SmallFiles {
		d := fmt.Sprintf("usr/share/doc/pkg%02d", i/8)
		if i%8 == 0 {
			if err := dir(d); err != nil {
				return err
			}
		}
		size := 512 + (i*7919)%(32<<10) // 0.5 to 32 KiB
		b := smallText(size, uint64(i)+100)
		if err := file(fmt.Sprintf("%s/file%03d.txt", d, i), int64(len(b)), bytes.NewReader(b)); err != nil {
			return err
		}
	}
	if err := file("etc/motd", 18, bytes.NewReader([]byte("obd I/O benchmark\n"))); err != nil {
		return err
	}
	h := sha256.New()
	if err := file(bigFile, params.FileBytes, io.TeeReader(newBigData(params.FileBytes, 1), h)); err != nil {
		return err
	}
	img.BigSHA256 = hex.EncodeToString(h.Sum(nil))
	return tw.Close()
}

// exportRaw writes the disk of the layer stack in blobs to path as a sparse file (image.ExportRaw) and returns the
// data bytes written.
func exportRaw(ctx context.Context, blobs []builtBlob, path string) (int64, error) {
	var files []*lsmt.File
	for _, b := range blobs {
		f, err := os.Open(b.Path)
		if err != nil {
			return 0, err
		}
		defer f.Close()
		lf, err := image.OpenLayerBlob(f, b.Size, false)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", b.Path, err)
		}
		files = append(files, lf)
	}
	stack, err := lsmt.NewStack(files, nil)
	if err != nil {
		return 0, err
	}
	out, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return 0, err
	}
	defer out.Close()
	if err := out.Truncate(stack.VirtualSize()); err != nil {
		return 0, err
	}
	n, err := image.ExportRaw(ctx, stack, out, nil)
	if err == nil {
		err = out.Sync()
	}
	if err == nil {
		err = out.Close()
	}
	if err != nil {
		return n, errors.Join(err, os.Remove(path))
	}
	return n, nil
}
