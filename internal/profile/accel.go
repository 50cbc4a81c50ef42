package profile

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/trace"
)

// TraceName is the trace's file name in an acceleration layer: the snapshotter finds it in the layer's unpacked
// directory.
const TraceName = "trace"

// historyAccel is the history entry of an acceleration layer in the image config, as upstream writes it.
const historyAccel = "Acceleration Layer"

// AccelerationLayer returns the acceleration layer holding traceFile (a trace in upstream's format) and its
// descriptor: an uncompressed OCI tar with the one file TraceName, the same bytes for the same trace, annotated as
// an acceleration layer. Its diffID is its digest.
func AccelerationLayer(traceFile []byte) ([]byte, ocispec.Descriptor, error) {
	if _, err := trace.Decode(traceFile); err != nil {
		return nil, ocispec.Descriptor{}, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	hdr := &tar.Header{Name: TraceName, Mode: 0o444, Size: int64(len(traceFile)), Typeflag: tar.TypeReg,
		ModTime: time.Unix(0, 0), Format: tar.FormatUSTAR}
	if err := tw.WriteHeader(hdr); err != nil {
		return nil, ocispec.Descriptor{}, err
	}
	if _, err := tw.Write(traceFile); err != nil {
		return nil, ocispec.Descriptor{}, err
	}
	if err := tw.Close(); err != nil {
		return nil, ocispec.Descriptor{}, err
	}
	b := buf.Bytes()
	return b, ocispec.Descriptor{
		MediaType:   ocispec.MediaTypeImageLayer,
		Digest:      digest.FromBytes(b),
		Size:        int64(len(b)),
		Annotations: map[string]string{image.AnnotationAccelerationLayer: "yes"},
	}, nil
}

// Accelerate returns the manifest and config of an overlaybd image with layer appended as its acceleration layer,
// replacing any it had. manifest and config are the image's bytes; fields this package does not know are kept.
func Accelerate(manifest, config []byte, layer ocispec.Descriptor) (newManifest, newConfig []byte, err error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(manifest, &m); err != nil {
		return nil, nil, fmt.Errorf("image manifest: %w", err)
	}
	var layers []ocispec.Descriptor
	if err := json.Unmarshal(m["layers"], &layers); err != nil {
		return nil, nil, fmt.Errorf("image manifest layers: %w", err)
	}
	var cfgDesc ocispec.Descriptor
	if err := json.Unmarshal(m["config"], &cfgDesc); err != nil {
		return nil, nil, fmt.Errorf("image manifest config: %w", err)
	}
	if _, err := image.BlockLayers(ocispec.Manifest{Layers: layers}); err != nil {
		return nil, nil, err
	}
	var c map[string]json.RawMessage
	if err := json.Unmarshal(config, &c); err != nil {
		return nil, nil, fmt.Errorf("image config: %w", err)
	}
	var rootfs ocispec.RootFS
	if err := json.Unmarshal(c["rootfs"], &rootfs); err != nil {
		return nil, nil, fmt.Errorf("image config rootfs: %w", err)
	}
	if len(rootfs.DiffIDs) != len(layers) {
		return nil, nil, fmt.Errorf("image config has %d diff_ids for %d layers", len(rootfs.DiffIDs), len(layers))
	}
	var history []map[string]json.RawMessage
	if h, ok := c["history"]; ok {
		if err := json.Unmarshal(h, &history); err != nil {
			return nil, nil, fmt.Errorf("image config history: %w", err)
		}
	}

	// Drop an acceleration layer made earlier, with its diff_id and history entry.
	keptLayers, keptDiffs := layers[:0:0], rootfs.DiffIDs[:0:0]
	for i, l := range layers {
		if l.Annotations[image.AnnotationAccelerationLayer] != "yes" {
			keptLayers = append(keptLayers, l)
			keptDiffs = append(keptDiffs, rootfs.DiffIDs[i])
		}
	}
	keptHistory := history[:0:0]
	for _, h := range history {
		var by string
		if json.Unmarshal(h["created_by"], &by) == nil && by == historyAccel {
			continue
		}
		keptHistory = append(keptHistory, h)
	}
	rootfs.DiffIDs = append(keptDiffs, layer.Digest)
	createdBy, _ := json.Marshal(historyAccel)
	keptHistory = append(keptHistory, map[string]json.RawMessage{"created_by": createdBy})

	if c["rootfs"], err = json.Marshal(rootfs); err != nil {
		return nil, nil, err
	}
	if c["history"], err = json.Marshal(keptHistory); err != nil {
		return nil, nil, err
	}
	if newConfig, err = json.Marshal(c); err != nil {
		return nil, nil, err
	}
	cfgDesc.Digest, cfgDesc.Size = digest.FromBytes(newConfig), int64(len(newConfig))
	if m["config"], err = json.Marshal(cfgDesc); err != nil {
		return nil, nil, err
	}
	if m["layers"], err = json.Marshal(append(keptLayers, layer)); err != nil {
		return nil, nil, err
	}
	if newManifest, err = json.Marshal(m); err != nil {
		return nil, nil, err
	}
	return newManifest, newConfig, nil
}

// TraceOfLayer returns the trace file an acceleration layer (an uncompressed tar, obd's or upstream's) holds.
func TraceOfLayer(layer []byte) ([]byte, error) {
	tr := tar.NewReader(bytes.NewReader(layer))
	for {
		h, err := tr.Next()
		if err != nil {
			return nil, fmt.Errorf("acceleration layer: no %s file: %w", TraceName, err)
		}
		if h.Typeflag != tar.TypeReg || (h.Name != TraceName && h.Name != "./"+TraceName) {
			continue
		}
		if h.Size > 64<<20 {
			return nil, fmt.Errorf("acceleration layer: %s of %d bytes", TraceName, h.Size)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			return nil, fmt.Errorf("acceleration layer: %w", err)
		}
		if _, err := trace.Decode(b); err != nil {
			return nil, fmt.Errorf("acceleration layer: %w", err)
		}
		return b, nil
	}
}

// ErrNoTrace means a recording produced no trace: the container read nothing from the image's layers.
var ErrNoTrace = errors.New("the start read nothing from the image's overlaybd layers")
