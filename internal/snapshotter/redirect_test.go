package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/image"
)

// fakeRedirector stands an overlaybd image in for the manifest it knows, layer by chain ID.
type fakeRedirector struct {
	manifest digest.Digest
	layers   map[string]*StandinLayer
	err      error
	calls    int
}

func (f *fakeRedirector) Redirect(_ context.Context, ref string, manifest digest.Digest, chainID string) (*StandinLayer, error) {
	f.calls++
	if f.err != nil {
		return nil, f.err
	}
	if manifest != f.manifest {
		return nil, nil
	}
	return f.layers[chainID], nil
}

// criLabels are the labels of the CRI plugin's pull of a normal layer.
func criLabels(target string, manifest digest.Digest) map[string]string {
	return map[string]string{
		LabelTargetRef:                            target,
		LabelCRIImageRef:                          "registry.test/app:v1",
		LabelCRIManifestDigest:                    manifest.String(),
		"containerd.io/snapshot/cri.layer-digest": digest.FromString("gzip " + target).String(),
		"containerd.io/snapshot/cri.image-layers": digest.FromString("gzip " + target).String(),
	}
}

func TestRedirect(t *testing.T) {
	standin := digest.FromString("standin manifest")
	plain := digest.FromString("plain manifest")
	r := &fakeRedirector{manifest: plain, layers: map[string]*StandinLayer{}}
	var lowers []digest.Digest
	for _, l := range []string{"C0", "C1", "C2"} {
		blob := digest.FromString("obd " + l)
		r.layers[l] = &StandinLayer{Lowers: lowers, Labels: map[string]string{
			image.AnnotationBlobDigest: blob.String(),
			image.AnnotationBlobSize:   "4096",
			image.AnnotationVersion:    image.FormatVersion,
			LabelImageRef:              "registry.test/app@" + standin.String(),
		}}
		lowers = append(lowers, blob)
	}
	sn, _ := openSnapshotter(t, &fakeMounter{}, WithRedirect(r))
	ctx := context.Background()
	parent := ""
	for _, l := range []string{"C0", "C1"} {
		_, err := sn.Prepare(ctx, "extract-"+l, parent, snapshots.WithLabels(criLabels(l, plain)))
		if !errdefs.IsAlreadyExists(err) {
			t.Fatalf("Prepare of redirected layer %s: %v, want AlreadyExists (a lazy pull)", l, err)
		}
		info, err := sn.Stat(ctx, l)
		if err != nil {
			t.Fatal(err)
		}
		if info.Labels[LabelRemote] != LabelRemoteValue || info.Labels[image.AnnotationBlobDigest] != r.layers[l].Labels[image.AnnotationBlobDigest] ||
			imageRef(info.Labels) != "registry.test/app@"+standin.String() {
			t.Errorf("snapshot %s: labels %v, want the stand-in's layer", l, info.Labels)
		}
		parent = l
	}
	plan, err := sn.planChain(ctx, "C1")
	if err != nil || plan == nil || len(plan.layers) != 2 || plan.layers[1].Digest != digest.FromString("obd C1") {
		t.Fatalf("chain of the redirected layers: %+v, %v", plan, err)
	}

	// A stand-in layer goes only over its own lowers: not over a normal layer unpacked before (a base layer shared
	// with an image pulled earlier), nor over another chain of overlaybd layers.
	if _, err := sn.Prepare(ctx, "extract-N0", "", snapshots.WithLabels(map[string]string{LabelTargetRef: "N0"})); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(ctx, "N0", "extract-N0"); err != nil {
		t.Fatal(err)
	}
	for _, parent := range []string{"N0", "C0"} { // C2 stands on C0 and C1
		key := "extract-C2-over-" + parent
		if _, err := sn.Prepare(ctx, key, parent, snapshots.WithLabels(criLabels("C2", plain))); err != nil {
			t.Errorf("Prepare of a stand-in layer over %s: %v, want a normal unpack", parent, err)
		}
		if err := sn.Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}

	// No stand-in (another manifest), a failed lookup, a layer the stand-in lacks, or a pull without the CRI's
	// manifest label: the layer is unpacked as it is.
	other := criLabels("D0", digest.FromString("other manifest"))
	noManifest := criLabels("D1", plain)
	delete(noManifest, LabelCRIManifestDigest)
	for i, labels := range []map[string]string{other, criLabels("D2", plain), noManifest} {
		if _, err := sn.Prepare(ctx, fmt.Sprint("extract-plain-", i), "", snapshots.WithLabels(labels)); err != nil {
			t.Errorf("Prepare of a layer without a stand-in (%d): %v", i, err)
		}
	}
	r.err = errors.New("registry down")
	calls := r.calls
	if _, err := sn.Prepare(ctx, "extract-failed", "", snapshots.WithLabels(criLabels("C0x", plain))); err != nil {
		t.Errorf("Prepare when the lookup fails: %v", err)
	}
	if r.calls != calls+1 {
		t.Errorf("the redirector was asked %d times, want once", r.calls-calls)
	}
}

// The blob-fs-type label of a pulled layer reaches the mounter with the layer.
func TestFsTypeLabel(t *testing.T) {
	ctx, sn, _, _ := newTestSnapshotter(t)
	l := remoteLabels("E0", digest.FromString("E0"), 4096, "registry.test/app:erofs")
	l[image.AnnotationFsType] = "erofs;user_xattr"
	if _, err := sn.Prepare(ctx, "extract-E0", "", snapshots.WithLabels(l)); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of a remote layer: %v", err)
	}
	plan, err := sn.planChain(ctx, "E0")
	if err != nil || plan == nil || len(plan.layers) != 1 || plan.layers[0].FsType != "erofs;user_xattr" {
		t.Fatalf("chain %+v, %v: want the layer's blob-fs-type", plan, err)
	}
}
