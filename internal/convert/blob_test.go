package convert

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/testenv"
	"github.com/obdproject/obd/lsmt"
)

// replaceLayerBlob stores a new blob for layer i (made by edit from the old one) and re-tags a manifest that
// points at it, so that the blob's digest is right and only its content is wrong.
func replaceLayerBlob(t *testing.T, dir string, ref image.Ref, i int, edit func([]byte) []byte) {
	t.Helper()
	lay, err := image.OpenLayout(dir)
	if err != nil {
		t.Fatal(err)
	}
	d, err := lay.Resolve(ref)
	if err != nil {
		t.Fatal(err)
	}
	m, _, err := lay.Manifest(d, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	old, err := lay.ReadBlob(m.Layers[i])
	if err != nil {
		t.Fatal(err)
	}
	desc, err := lay.PutBlobBytes(m.Layers[i].MediaType, edit(old))
	if err != nil {
		t.Fatal(err)
	}
	m.Layers[i] = desc
	mb, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	md, err := lay.PutBlobBytes(ocispec.MediaTypeImageManifest, mb)
	if err != nil {
		t.Fatal(err)
	}
	if err := lay.Tag(ref.Tag, md); err != nil {
		t.Fatal(err)
	}
}

// TestConvertTruncatedGzip: a gzip layer without its trailer (CRC-32 and size) holds a whole tar, whose digest
// matches the diff_id, but the blob is truncated and must not convert.
func TestConvertTruncatedGzip(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	dir := filepath.Join(t.TempDir(), "src")
	ref := writeSourceLayout(t, dir, [][]byte{layerTar(t, []tarEntry{{name: "etc/hostname", typ: tar.TypeReg, body: "obd\n"}})})
	replaceLayerBlob(t, dir, ref, 0, func(b []byte) []byte {
		if zr, err := gzip.NewReader(bytes.NewReader(b)); err != nil {
			t.Fatalf("the test layout's layer is not gzip: %v", err)
		} else if _, err := io.Copy(io.Discard, zr); err != nil {
			t.Fatal(err)
		}
		return b[:len(b)-8]
	})
	source, err := image.OpenLocalSource(ref, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer source.Close()
	_, err = ConvertImage(context.Background(), source, ImageOptions{VirtualSize: 64 << 20, WorkDir: t.TempDir()})
	if !errors.Is(err, io.ErrUnexpectedEOF) || !strings.Contains(err.Error(), "layer blob (compression: gzip) is truncated") {
		t.Fatalf("got %v, want an error saying the gzip blob is truncated", err)
	}
	t.Log(err)
}

// TestConvertBaseLayerWithoutDisk: a base layer whose virtual disk size is 0 is refused as such, not with a failed
// read of the superblock.
func TestConvertBaseLayerWithoutDisk(t *testing.T) {
	dir := t.TempDir()
	data, err := os.Create(filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	defer data.Close()
	index, err := os.Create(filepath.Join(dir, "index"))
	if err != nil {
		t.Fatal(err)
	}
	defer index.Close()
	rw, err := lsmt.CreateRW(data, index, 0, lsmt.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var base bytes.Buffer
	if _, err := lsmt.Commit(&base, rw, lsmt.CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	basePath := filepath.Join(dir, "base")
	if err := os.WriteFile(basePath, base.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	ref := writeSourceLayout(t, filepath.Join(dir, "src"), [][]byte{layerTar(t, []tarEntry{{name: "f", typ: tar.TypeReg, body: "f"}})})
	source, err := image.OpenLocalSource(ref, image.DefaultPlatform())
	if err != nil {
		t.Fatal(err)
	}
	defer source.Close()
	_, err = ConvertImage(context.Background(), source, ImageOptions{BaseLayer: basePath, WorkDir: t.TempDir()})
	if want := "base layer " + basePath + ": its virtual disk size is 0"; err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("got %v, want %q", err, want)
	}
}
