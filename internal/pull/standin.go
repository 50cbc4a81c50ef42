package pull

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/registry"
)

// Standin is an overlaybd image that stands in for a normal image being pulled: an OCI referrer of it ('obd
// convert --referrer', native or TurboOCI), read lazily in its place.
type Standin struct {
	// Ref names the overlaybd image: the normal image's repository at the referrer's digest.
	Ref image.Ref
	// Layers are its overlaybd layers, bottom first, one per layer of the normal image.
	Layers []image.BlockLayer
	// Chain are the chain IDs of the normal image's layers — the names containerd gives their snapshots.
	Chain []digest.Digest
	// Accel is its acceleration layer (a recorded start), if it has one.
	Accel *ocispec.Descriptor
}

// maxConfig bounds the image config FindStandin reads.
const maxConfig = 4 << 20

// FindStandin looks for the overlaybd image attached to the normal image whose manifest (the one for this node's
// platform) is manifest, in ref's repository: a referrer of that manifest, or of the index ref names when the index
// lists it. It returns nil when there is none. A referrer is taken only when its subject is that manifest (or such an
// index) and its layers match the manifest's one to one: same number, and a TurboOCI layer's target is the layer
// it stands in for.
func FindStandin(ctx context.Context, rc *registry.Client, ref image.Ref, manifest digest.Digest) (*Standin, error) {
	host, repo := ref.Host(), ref.Repository()
	// Referrers first, manifests only when there is one: a normal image without a stand-in costs a listing (two
	// requests on a registry without the referrers API) and, for a tag, its resolution.
	mdesc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: manifest}
	d, err := referrerOf(ctx, rc, host, repo, []ocispec.Descriptor{mdesc})
	var index []byte // the index the referrer was found on, if it was
	sel := ref.Tag
	if sel == "" && ref.Digest != manifest {
		sel = ref.Digest.String()
	}
	if err == nil && d == nil && sel != "" {
		var idesc ocispec.Descriptor
		var ib []byte
		if idesc, ib, err = rc.Resolve(ctx, host, repo, sel); err == nil && image.IsIndex(idesc.MediaType) && indexLists(ib, manifest) {
			d, err = referrerOf(ctx, rc, host, repo, []ocispec.Descriptor{idesc})
			index = ib
		}
	}
	if err != nil || d == nil {
		return nil, err
	}
	_, mb, err := rc.Resolve(ctx, host, repo, manifest.String())
	if err != nil {
		return nil, err
	}
	m, err := image.ParseManifest(mb)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", manifest, err)
	}
	byDigest := ref
	byDigest.Tag, byDigest.Digest = "", manifest
	_, rb, err := rc.Resolve(ctx, host, repo, d.Digest.String())
	if err != nil {
		return nil, fmt.Errorf("referrer %s: %w", d.Digest, err)
	}
	rm, err := image.ParseManifest(rb)
	if err != nil {
		return nil, fmt.Errorf("referrer %s: %w", d.Digest, err)
	}
	if ok, err := subjectOf(ctx, rc, host, repo, rm.Subject, manifest, index); err != nil || !ok {
		return nil, err
	}
	bls, err := image.BlockLayers(rm)
	if err != nil {
		return nil, fmt.Errorf("referrer %s: %w", d.Digest, err)
	}
	if len(bls) != len(m.Layers) {
		return nil, nil // not a conversion of this manifest's layers
	}
	diffIDs, err := diffIDsOf(ctx, rc, host, repo, m)
	if err != nil {
		return nil, err
	}
	for i, bl := range bls {
		if bl.Target != "" && bl.Target != m.Layers[i].Digest {
			return nil, nil
		}
	}
	s := &Standin{Ref: byDigest, Layers: bls, Chain: identity.ChainIDs(diffIDs)}
	s.Ref.Digest = d.Digest
	for _, l := range rm.Layers {
		if l.Annotations[image.AnnotationAccelerationLayer] == "yes" {
			s.Accel = &l
		}
	}
	return s, nil
}

// subjectOf reports whether subject is the manifest, or an index that lists it; index, if set, is the bytes of an
// index already read (not read again when it is the subject).
func subjectOf(ctx context.Context, rc *registry.Client, host, repo string, subject *ocispec.Descriptor, manifest digest.Digest, index []byte) (bool, error) {
	switch {
	case subject == nil:
		return false, nil
	case subject.Digest == manifest:
		return true, nil
	case !image.IsIndex(subject.MediaType):
		return false, nil
	}
	if index != nil && digest.FromBytes(index) == subject.Digest {
		return indexLists(index, manifest), nil
	}
	_, b, err := rc.Resolve(ctx, host, repo, subject.Digest.String())
	if err != nil {
		return false, err
	}
	return indexLists(b, manifest), nil
}

// indexLists reports whether the index b lists the manifest.
func indexLists(b []byte, manifest digest.Digest) bool {
	idx, err := image.ParseIndex(b)
	return err == nil && slices.ContainsFunc(idx.Manifests, func(d ocispec.Descriptor) bool { return d.Digest == manifest })
}

// diffIDsOf reads the diff IDs of m's layers from its config.
func diffIDsOf(ctx context.Context, rc *registry.Client, host, repo string, m ocispec.Manifest) ([]digest.Digest, error) {
	if m.Config.Size > maxConfig {
		return nil, fmt.Errorf("config %s: %d bytes, more than %d", m.Config.Digest, m.Config.Size, maxConfig)
	}
	rd, err := rc.FetchBlob(ctx, host, repo, m.Config)
	if err != nil {
		return nil, err
	}
	defer rd.Close()
	b, err := io.ReadAll(io.LimitReader(rd, maxConfig))
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", m.Config.Digest, err)
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("config %s: %w", m.Config.Digest, err)
	}
	if len(cfg.RootFS.DiffIDs) != len(m.Layers) {
		return nil, fmt.Errorf("config %s: %d diff IDs for %d layers", m.Config.Digest, len(cfg.RootFS.DiffIDs), len(m.Layers))
	}
	return cfg.RootFS.DiffIDs, nil
}
