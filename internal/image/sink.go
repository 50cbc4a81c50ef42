package image

import (
	"context"
	"encoding/json"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Sink is where images are written, the counterpart of Source: a registry repository (RegistrySink) or an OCI
// layout (LayoutSink). Every image obd writes goes through one.
type Sink interface {
	// PutImage stores an image: its layer blobs, its config, then its manifest — last, so a failure never leaves a
	// partial image tagged — under tag, or by digest only when tag is "". A layout lists an untagged manifest in
	// its index.json (a referrer is found there through its subject) unless entry says the manifest is an index's
	// entry, found through the index.
	PutImage(ctx context.Context, img *Image, tag string, entry bool) error
	// PutIndex stores an index whose manifests the sink holds already, under tag ("" for by digest only).
	PutIndex(ctx context.Context, desc ocispec.Descriptor, b []byte, tag string) error
}

// Image is an image to write: manifest, config and layer blobs.
type Image struct {
	Manifest     []byte
	ManifestDesc ocispec.Descriptor
	Config       []byte
	ConfigDesc   ocispec.Descriptor
	Layers       []Blob
}

// Blob is a layer blob to write.
type Blob struct {
	Desc ocispec.Descriptor
	// Path is a file holding the blob, or "" when only Repos do. The file is the writer's to give away: a layout
	// sink moves it into the layout.
	Path string
	// Repos are repositories of the registry a RegistrySink writes to that hold the blob: it is mounted from them,
	// and read from them when there is no Path.
	Repos []string
}

// artifactType returns the artifactType field of a manifest or index.
func artifactType(b []byte) string {
	var probe struct {
		ArtifactType string `json:"artifactType"`
	}
	_ = json.Unmarshal(b, &probe)
	return probe.ArtifactType
}
