package convert

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"io"
	"path/filepath"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/testenv"
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
