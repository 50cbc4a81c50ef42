package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/testenv"
	"github.com/obdproject/obd/zfile"
)

// convertWith converts src and returns the result and the stages it reported per layer ("reused" or "done").
func convertWith(t *testing.T, src image.Ref, opts ImageOptions) (*Result, []string) {
	t.Helper()
	var stages []string
	opts.Progress = func(p Progress) {
		switch p.Stage {
		case "reused", "done":
			// Layers are packed while the next one is applied: record by layer, not by arrival.
			for len(stages) <= p.Layer {
				stages = append(stages, "")
			}
			stages[p.Layer] = p.Stage
		case "warning":
			t.Logf("layer %d: warning: %s", p.Layer, p.Detail)
		}
	}
	res := convertLayout(t, src, opts)
	return res, stages
}

// blobBytes returns the bytes of every layer blob of res, in order.
func blobBytes(t *testing.T, res *Result) [][]byte {
	t.Helper()
	var out [][]byte
	for _, b := range res.Blobs {
		if b.Path == "" {
			t.Fatalf("layer %s has no local file", b.Desc.Digest)
		}
		out = append(out, readAll(t, b.Path))
	}
	return out
}

func readAll(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// sameResult fails the test unless got has the same manifest, config and layer bytes as want.
func sameResult(t *testing.T, what string, want, got *Result) {
	t.Helper()
	if !bytes.Equal(want.Manifest, got.Manifest) || !bytes.Equal(want.Config, got.Config) {
		t.Fatalf("%s: manifest %s, want %s (the same as without the database)", what, got.ManifestDesc.Digest, want.ManifestDesc.Digest)
	}
	wb, gb := blobBytes(t, want), blobBytes(t, got)
	for i := range wb {
		if !bytes.Equal(wb[i], gb[i]) {
			t.Fatalf("%s: layer %d blob bytes differ", what, i)
		}
	}
}

func stagesString(s []string) string { return strings.Join(s, ",") }

// sharedImages returns two images whose first two layers are the same.
func sharedImages(t *testing.T) (a, b [][]byte) {
	a = everyCase(t)
	extra := layerTar(t, []tarEntry{
		{name: "app/", typ: tar.TypeDir, mode: 0o755},
		{name: "app/main", typ: tar.TypeReg, body: strings.Repeat("app code ", 5000), mode: 0o755},
		{name: "etc/.wh.old", typ: tar.TypeReg},
	})
	b = [][]byte{a[0], a[1], extra}
	return a, b
}

func TestConvertDBReuseIsByteIdentical(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	dir := t.TempDir()
	layersA, layersB := sharedImages(t)
	srcA := writeSourceLayout(t, filepath.Join(dir, "a"), layersA)
	srcB := writeSourceLayout(t, filepath.Join(dir, "b"), layersB)

	for _, c := range []struct {
		name string
		opts ImageOptions
	}{
		{"mkfs", ImageOptions{VirtualSize: 1 << 30}},
		{"base-layer zstd", ImageOptions{BaseLayer: extractBaseLayer(t), ZFile: zfile.Options{Algorithm: zfile.AlgoZSTD, BlockSize: 16 << 10}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			wantA, _ := convertWith(t, srcA, c.opts)
			wantB, _ := convertWith(t, srcB, c.opts)
			db, err := OpenDB(filepath.Join(t.TempDir(), "convert.db"), DefaultDBMaxSize)
			if err != nil {
				t.Fatal(err)
			}
			withDB := c.opts
			withDB.DB = db
			skip := 0
			if c.opts.BaseLayer != "" {
				skip = 1 // the base layer is copied, neither converted nor reused
			}

			cold, stages := convertWith(t, srcA, withDB)
			sameResult(t, "first conversion with the database", wantA, cold)
			if got := stagesString(stages); got != "done,done,done" {
				t.Errorf("first conversion: stages %s, want every layer converted", got)
			}
			warm, stages := convertWith(t, srcA, withDB)
			sameResult(t, "conversion from the database", wantA, warm)
			if got := stagesString(stages); got != "reused,reused,reused" {
				t.Errorf("second conversion: stages %s, want every layer reused", got)
			}
			for i, b := range warm.Blobs[skip:] {
				if !b.Reused {
					t.Errorf("layer %d not marked reused", i)
				}
			}
			// Image B shares the bottom two layers: they are reused, and the third is converted on top of them.
			shared, stages := convertWith(t, srcB, withDB)
			sameResult(t, "image sharing layers", wantB, shared)
			if got := stagesString(stages); got != "reused,reused,done" {
				t.Errorf("image sharing two layers: stages %s, want reused,reused,done", got)
			}
			// Other options make other layers: nothing is reused.
			other := withDB
			other.ZFile.BlockSize = 64 << 10
			if _, stages := convertWith(t, srcA, other); stagesString(stages) != "done,done,done" {
				t.Errorf("conversion with another block size: stages %s, want nothing reused", stagesString(stages))
			}
		})
	}
}

func TestConvertDBDamagedStore(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	layers, _ := sharedImages(t)
	src := writeSourceLayout(t, filepath.Join(t.TempDir(), "src"), layers)
	opts := ImageOptions{VirtualSize: 1 << 30}
	want, _ := convertWith(t, src, opts)
	db, err := OpenDB(filepath.Join(t.TempDir(), "convert.db"), DefaultDBMaxSize)
	if err != nil {
		t.Fatal(err)
	}
	opts.DB = db
	convertWith(t, src, opts)
	// Damage the stored blob of layer 0 and lose the one of layer 2.
	p0 := db.blobPath(want.Blobs[0].Desc.Digest)
	b := readAll(t, p0)
	b[len(b)/2] ^= 0xff
	if err := os.Remove(p0); err != nil { // break the hard link, as an editor would
		t.Fatal(err)
	}
	if err := os.WriteFile(p0, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(db.blobPath(want.Blobs[2].Desc.Digest)); err != nil {
		t.Fatal(err)
	}
	got, stages := convertWith(t, src, opts)
	sameResult(t, "conversion with a damaged store", want, got)
	if s := stagesString(stages); s != "done,reused,done" {
		t.Errorf("stages %s, want the damaged and the lost layer converted again (and layer 1 reused on layer 0)", s)
	}
	if _, err := os.Stat(p0); err != nil {
		t.Errorf("the layer converted again is not back in the store: %v", err)
	}
}

// fakeRemote serves blobs from a map, as a registry repository "obd/app" on host "reg.test".
type fakeRemote struct {
	blobs map[digest.Digest][]byte
	reads int
}

func (f *fakeRemote) remote() *RemoteBlobs {
	return &RemoteBlobs{Host: "reg.test", Open: func(ctx context.Context, repo string, desc ocispec.Descriptor) (io.ReaderAt, error) {
		b, ok := f.blobs[desc.Digest]
		if repo != "obd/app" || !ok {
			return nil, fmt.Errorf("no blob %s in %s", desc.Digest, repo)
		}
		f.reads++
		return bytes.NewReader(b), nil
	}}
}

// A layer that left the local store but is in the destination registry is reused from there: its blob is not
// needed locally, and a layer converted above it reads the filesystem from the registry copy.
func TestConvertDBRemoteLowers(t *testing.T) {
	testenv.Tools(t, "mke2fs")
	dir := t.TempDir()
	layersA, layersB := sharedImages(t)
	srcA := writeSourceLayout(t, filepath.Join(dir, "a"), layersA)
	srcB := writeSourceLayout(t, filepath.Join(dir, "b"), layersB)
	opts := ImageOptions{VirtualSize: 1 << 30}
	wantB, _ := convertWith(t, srcB, opts)

	db, err := OpenDB(filepath.Join(t.TempDir(), "convert.db"), 0) // keeps no blob locally
	if err != nil {
		t.Fatal(err)
	}
	opts.DB = db
	a, stages := convertWith(t, srcA, opts)
	if s := stagesString(stages); s != "done,done,done" {
		t.Fatalf("stages %s", s)
	}
	if ents, _ := os.ReadDir(filepath.Join(db.StoreDir(), "sha256")); len(ents) != 0 {
		t.Errorf("a database of maximum size 0 stored %d blobs", len(ents))
	}
	// "Push" A's blobs.
	remote := &fakeRemote{blobs: map[digest.Digest][]byte{}}
	var pushed []digest.Digest
	for _, b := range a.Blobs {
		remote.blobs[b.Desc.Digest] = readAll(t, b.Path)
		pushed = append(pushed, b.Desc.Digest)
	}
	if err := db.RecordPushed("reg.test", "obd/app", pushed); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Trim(); err != nil {
		t.Fatal(err)
	}
	// Without the registry, nothing can be reused.
	if _, stages := convertWith(t, srcB, opts); stagesString(stages) != "done,done,done" {
		t.Errorf("without a registry: stages %s, want all converted", stagesString(stages))
	}
	opts.Remote = remote.remote()
	got, stages := convertWith(t, srcB, opts)
	if s := stagesString(stages); s != "reused,reused,done" {
		t.Fatalf("stages %s, want the two shared layers reused from the registry", s)
	}
	if remote.reads != 2 {
		t.Errorf("%d registry blobs opened, want 2 (the lowers of layer 2)", remote.reads)
	}
	if !bytes.Equal(got.Manifest, wantB.Manifest) {
		t.Fatalf("manifest %s, want %s", got.ManifestDesc.Digest, wantB.ManifestDesc.Digest)
	}
	for i, b := range got.Blobs {
		switch {
		case i < 2 && (b.Path != "" || strings.Join(b.Repos, ",") != "obd/app"):
			t.Errorf("layer %d: path %q repos %v, want it only in registry repository obd/app", i, b.Path, b.Repos)
		case i == 2 && !bytes.Equal(readAll(t, b.Path), readAll(t, wantB.Blobs[2].Path)):
			t.Errorf("layer 2 converted on registry lowers differs from a conversion without the database")
		}
	}
	// A registry on another host does not count.
	opts.Remote.Host = "other.test"
	if _, stages := convertWith(t, srcB, opts); stagesString(stages) != "done,done,done" {
		t.Errorf("with another registry: stages %s, want all converted", stagesString(stages))
	}
}

func TestDBTrim(t *testing.T) {
	db, err := OpenDB(filepath.Join(t.TempDir(), "cache", "convert.db"), 250)
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	var digests []digest.Digest
	for i := range 4 {
		b := bytes.Repeat([]byte{byte(i)}, 100)
		p := filepath.Join(work, fmt.Sprint(i))
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		d := digest.FromBytes(b)
		digests = append(digests, d)
		key := []byte(fmt.Sprint("key", i))
		if err := db.add(key, layerRecord{Blob: d, Size: 100}, p); err != nil {
			t.Fatal(err)
		}
	}
	// Use blob 0 again: it becomes the most recently used.
	if err := db.take(digests[0], 100, filepath.Join(work, "taken")); err != nil {
		t.Fatal(err)
	}
	if err := db.RecordPushed("reg.test", "obd/app", digests[1:2]); err != nil {
		t.Fatal(err)
	}
	st, err := db.Trim()
	if err != nil {
		t.Fatal(err)
	}
	if st.Removed != 2 || st.Kept != 2 || st.KeptBytes != 200 {
		t.Errorf("trim: %+v, want 2 removed, 2 (200 bytes) kept", st)
	}
	for i, want := range []bool{true, false, false, true} {
		_, err := os.Stat(db.blobPath(digests[i]))
		if got := err == nil; got != want {
			t.Errorf("blob %d in the store: %t, want %t", i, got, want)
		}
	}
	hits, err := db.lookup([][]byte{[]byte("key0"), []byte("key1"), []byte("key2"), []byte("key3")})
	if err != nil {
		t.Fatal(err)
	}
	// key1 stays known through the registry; key2 is gone everywhere.
	for i, want := range []bool{true, true, false, true} {
		if got := hits[i] != nil; got != want {
			t.Errorf("layer %d known: %t, want %t", i, got, want)
		}
	}
	if hits[1] != nil && (hits[1].blob.Local || len(hits[1].blob.Repos) != 1) {
		t.Errorf("layer 1: %+v, want only in the registry", hits[1].blob)
	}
}

func TestCheckLayers(t *testing.T) {
	d := digest.FromString("x")
	for _, c := range []struct {
		mediaType   string
		annotations map[string]string
		want        string
	}{
		{mediaType: ocispec.MediaTypeImageLayerGzip},
		{mediaType: image.MediaTypeDockerLayerGzip},
		{mediaType: ocispec.MediaTypeImageLayerZstd},
		{mediaType: "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", want: "foreign"},
		{mediaType: "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", want: "foreign"},
		{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip+encrypted", want: "encrypted"},
		{mediaType: "application/x-garbage", want: `unsupported media type "application/x-garbage"`},
		{mediaType: ocispec.MediaTypeImageLayer, annotations: map[string]string{image.AnnotationBlobDigest: d.String()}, want: "already an overlaybd layer"},
	} {
		m := ocispec.Manifest{Layers: []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString("ok")}, {MediaType: c.mediaType, Digest: d, Annotations: c.annotations}}}
		err := CheckLayers(m)
		if c.want == "" {
			if err != nil {
				t.Errorf("%s: %v", c.mediaType, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "layer 1 ("+d.String()+")") {
			t.Errorf("%s: error %v, want it to name layer 1 (%s) and say %q", c.mediaType, err, d, c.want)
		}
	}
}
