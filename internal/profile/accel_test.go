package profile

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/trace"
)

func testTrace(t *testing.T, recs ...trace.Record) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := trace.Encode(&b, recs); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestAccelerationLayer(t *testing.T) {
	tf := testTrace(t, trace.Record{Op: trace.Read, Layer: 1, Count: 4096, Offset: 8192})
	layer, desc, err := AccelerationLayer(tf)
	if err != nil {
		t.Fatal(err)
	}
	again, desc2, _ := AccelerationLayer(tf)
	if !bytes.Equal(layer, again) || desc.Digest != desc2.Digest {
		t.Fatal("the same trace gave different layers")
	}
	if desc.Digest != digest.FromBytes(layer) || desc.Size != int64(len(layer)) || desc.MediaType != ocispec.MediaTypeImageLayer ||
		desc.Annotations[image.AnnotationAccelerationLayer] != "yes" {
		t.Fatalf("descriptor %+v", desc)
	}
	tr := tar.NewReader(bytes.NewReader(layer))
	h, err := tr.Next()
	if err != nil || h.Name != TraceName || h.Typeflag != tar.TypeReg {
		t.Fatalf("first member %+v, %v", h, err)
	}
	if b, _ := io.ReadAll(tr); !bytes.Equal(b, tf) {
		t.Fatal("the layer's trace differs from the recorded one")
	}
	if _, err := tr.Next(); err != io.EOF {
		t.Fatalf("a second member: %v", err)
	}
	if _, _, err := AccelerationLayer([]byte("not a trace")); !errors.Is(err, trace.ErrNotTrace) {
		t.Fatalf("a non-trace: %v", err)
	}
}

// blockLayer is a manifest layer of an overlaybd image.
func blockLayer(s string) ocispec.Descriptor {
	d := digest.FromString(s)
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: d, Size: 100, Annotations: map[string]string{
		image.AnnotationBlobDigest: d.String(), image.AnnotationBlobSize: "100"}}
}

func TestAccelerate(t *testing.T) {
	l0, l1 := blockLayer("l0"), blockLayer("l1")
	manifest := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",` +
		`"config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"` + digest.FromString("c").String() + `","size":1},` +
		`"layers":[` + mustJSON(t, l0) + `,` + mustJSON(t, l1) + `],"annotations":{"keep":"me"}}`)
	config := []byte(`{"architecture":"amd64","os":"linux","config":{"Env":["A=1"]},"unknown":{"x":1},` +
		`"rootfs":{"type":"layers","diff_ids":["` + l0.Digest.String() + `","` + l1.Digest.String() + `"]},` +
		`"history":[{"created_by":"a"},{"created_by":"b"}]}`)

	_, first, _ := AccelerationLayer(testTrace(t, trace.Record{Op: trace.Read, Count: 512}))
	m1, c1, err := Accelerate(manifest, config, first)
	if err != nil {
		t.Fatal(err)
	}
	// Again over the accelerated image, with another trace: the first acceleration layer is replaced.
	_, second, _ := AccelerationLayer(testTrace(t, trace.Record{Op: trace.Read, Count: 1024}))
	m2, c2, err := Accelerate(m1, c1, second)
	if err != nil {
		t.Fatal(err)
	}
	for i, mc := range [][2][]byte{{m1, c1}, {m2, c2}} {
		want := []ocispec.Descriptor{first, second}[i]
		m, err := image.ParseManifest(mc[0])
		if err != nil {
			t.Fatal(err)
		}
		if len(m.Layers) != 3 || m.Layers[0].Digest != l0.Digest || m.Layers[1].Digest != l1.Digest || m.Layers[2].Digest != want.Digest ||
			m.Annotations["keep"] != "me" || m.MediaType != image.MediaTypeDockerManifest {
			t.Fatalf("manifest %d: %s", i, mc[0])
		}
		if m.Config.Digest != digest.FromBytes(mc[1]) || m.Config.Size != int64(len(mc[1])) {
			t.Fatalf("manifest %d names config %s, config is %s", i, m.Config.Digest, digest.FromBytes(mc[1]))
		}
		blocks, err := image.BlockLayers(m)
		if err != nil || len(blocks) != 2 {
			t.Fatalf("block layers of the accelerated image: %v, %v", blocks, err)
		}
		var cfg struct {
			ocispec.Image
			Unknown json.RawMessage `json:"unknown"`
		}
		if err := json.Unmarshal(mc[1], &cfg); err != nil {
			t.Fatal(err)
		}
		d := cfg.RootFS.DiffIDs
		if len(d) != 3 || d[2] != want.Digest || len(cfg.History) != 3 || cfg.History[2].CreatedBy != historyAccel ||
			cfg.History[1].CreatedBy != "b" || string(cfg.Unknown) != `{"x":1}` || cfg.Config.Env[0] != "A=1" {
			t.Fatalf("config %d: %s", i, mc[1])
		}
	}

	if _, _, err := Accelerate(manifest, []byte(`{"rootfs":{"diff_ids":[]}}`), first); err == nil || !strings.Contains(err.Error(), "0 diff_ids for 2 layers") {
		t.Fatalf("config and manifest disagree: %v", err)
	}
	plain := []byte(`{"schemaVersion":2,"config":{},"layers":[{"mediaType":"x","digest":"` + digest.FromString("p").String() + `","size":1}]}`)
	if _, _, err := Accelerate(plain, config, first); !errors.Is(err, image.ErrNotOverlaybd) {
		t.Fatalf("a normal image: %v", err)
	}
	if _, _, err := Accelerate([]byte("{"), config, first); err == nil {
		t.Fatal("a broken manifest was accepted")
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestInstall(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "profiles")
	chain := digest.FromString("chain")
	tf := testTrace(t, trace.Record{Op: trace.Read, Count: 512})
	path, err := Install(dir, chain, tf)
	if err != nil {
		t.Fatal(err)
	}
	if path != snapshotter.ProfilePath(dir, chain.String()) {
		t.Fatalf("installed at %s", path)
	}
	if b, err := os.ReadFile(path); err != nil || !bytes.Equal(b, tf) {
		t.Fatalf("installed file: %v", err)
	}
	if _, err := Install(dir, chain, testTrace(t)); !errors.Is(err, ErrNoTrace) {
		t.Fatalf("empty trace: %v", err)
	}
	if _, err := Install(dir, "../x", tf); err == nil {
		t.Fatal("a chain ID that is a path was accepted")
	}
}

func TestLineWatcher(t *testing.T) {
	var out bytes.Buffer
	ready := make(chan struct{})
	w := &lineWatcher{w: &out, needle: "ready", ready: ready}
	isReady := func() bool {
		select {
		case <-ready:
			return true
		default:
			return false
		}
	}
	// The needle split across writes, and in a line not ended yet (an app that prints it without a newline).
	for _, p := range []string{"loading\nre", "a"} {
		w.Write([]byte(p))
		if isReady() {
			t.Fatalf("ready after %q", p)
		}
	}
	w.Write([]byte("dy now"))
	if !isReady() {
		t.Fatal("not ready after the ready text")
	}
	w.Write([]byte("\nready again\n"))
	if out.String() != "loading\nready now\nready again\n" {
		t.Fatalf("output copied as %q", out.String())
	}
}

func TestTraceOfLayer(t *testing.T) {
	tf := testTrace(t, trace.Record{Op: trace.Read, Layer: 0, Count: 4096, Offset: 0})
	layer, _, err := AccelerationLayer(tf)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := TraceOfLayer(layer); err != nil || !bytes.Equal(got, tf) {
		t.Fatalf("trace of the layer: %v", err)
	}
	if _, err := TraceOfLayer([]byte("not a tar")); err == nil {
		t.Fatal("a non-tar was read")
	}
}

func FuzzTraceOfLayer(f *testing.F) {
	var b bytes.Buffer
	trace.Encode(&b, []trace.Record{{Op: trace.Read, Count: 512}})
	layer, _, _ := AccelerationLayer(b.Bytes())
	f.Add(layer)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		tf, err := TraceOfLayer(in)
		if err != nil {
			return
		}
		if _, err := trace.Decode(tf); err != nil {
			t.Fatalf("returned a trace that does not decode: %v", err)
		}
	})
}

func TestTraceFile(t *testing.T) {
	tf := testTrace(t, trace.Record{Op: trace.Read, Layer: 1, Offset: 4096, Count: 8192})
	if got, err := TraceFile(tf); err != nil || !bytes.Equal(got, tf) {
		t.Errorf("TraceFile of a trace file: %v", err)
	}
	p, err := json.Marshal(Profile{Reads: []Read{{Layer: 1, Offset: 4096, Length: 8192, AtMS: 3}}})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := TraceFile(p); err != nil || !bytes.Equal(got, tf) {
		t.Errorf("TraceFile of a profile = %x, %v; want %x", got, err, tf)
	}
	for _, bad := range []string{"", "not json", `{"reads": []}`} {
		if _, err := TraceFile([]byte(bad)); err == nil {
			t.Errorf("TraceFile(%q) succeeded", bad)
		}
	}
}
