package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/testenv"
)

func TestSystemRegistry(t *testing.T) {
	host := testenv.Registry(t, "")
	c := testClient(t, func(o *Options) { o.RetryBudget = 10 * time.Second })
	ctx := context.Background()

	layer := make([]byte, 3<<20+17)
	for i := range layer {
		layer[i] = byte(i*7 + i>>11)
	}
	layerDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: digest.FromBytes(layer), Size: int64(len(layer))}
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["` + layerDesc.Digest.String() + `"]}}`)
	configDesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(config), Size: int64(len(config))}

	for _, d := range []struct {
		desc ocispec.Descriptor
		data []byte
	}{{layerDesc, layer}, {configDesc, config}} {
		if err := c.PushBlob(ctx, host, "obd/app", d.desc, bytes.NewReader(d.data)); err != nil {
			t.Fatal(err)
		}
	}
	// Pushing again finds the blob and reads nothing.
	if err := c.PushBlob(ctx, host, "obd/app", layerDesc, eofReader{t}); err != nil {
		t.Fatal(err)
	}
	// Another repository gets the layer by a cross-repository mount, without reading it.
	if err := c.PushBlob(ctx, host, "obd/other", layerDesc, eofReader{t}, "obd/app"); err != nil {
		t.Fatal(err)
	}

	manifest, err := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    configDesc,
		Layers:    []ocispec.Descriptor{layerDesc},
	})
	if err != nil {
		t.Fatal(err)
	}
	mdesc, err := c.PushManifest(ctx, host, "obd/app", "v1", ocispec.MediaTypeImageManifest, manifest)
	if err != nil {
		t.Fatal(err)
	}

	desc, got, err := c.Resolve(ctx, host, "obd/app", "v1")
	if err != nil {
		t.Fatal(err)
	}
	if desc.Digest != mdesc.Digest || desc.MediaType != ocispec.MediaTypeImageManifest || !bytes.Equal(got, manifest) {
		t.Fatalf("resolved %+v", desc)
	}
	if _, _, err := c.Resolve(ctx, host, "obd/app", mdesc.Digest.String()); err != nil {
		t.Fatal(err)
	}

	rc, err := c.FetchBlob(ctx, host, "obd/app", configDesc)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(b, config) {
		t.Fatalf("FetchBlob: %v", err)
	}

	for _, repo := range []string{"obd/app", "obd/other"} {
		blob := mustBlob(t, c, host, repo, layerDesc.Digest, -1)
		if blob.Size() != layerDesc.Size {
			t.Fatalf("%s: size %d, want %d", repo, blob.Size(), layerDesc.Size)
		}
		for _, r := range [][2]int64{{0, 1}, {4096, 4096}, {1 << 20, 300000}, {layerDesc.Size - 100, 100}} {
			p := make([]byte, r[1])
			if _, err := blob.ReadAt(p, r[0]); err != nil {
				t.Fatalf("%s: ReadAt(%d, %d): %v", repo, r[1], r[0], err)
			}
			if !bytes.Equal(p, layer[r[0]:r[0]+r[1]]) {
				t.Fatalf("%s: bytes at %d differ", repo, r[0])
			}
		}
	}
}

// eofReader fails the test if a push reads it: the push should have been skipped or mounted.
type eofReader struct{ t *testing.T }

func (r eofReader) Read([]byte) (int, error) {
	r.t.Error("the blob was uploaded although the registry had it")
	return 0, io.EOF
}
