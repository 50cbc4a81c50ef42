package image

import (
	"errors"
	"fmt"
	"os"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/obdproject/obd/lsmt"
)

// Local is an overlaybd image opened from a local OCI layout, with its layers stacked into one virtual disk.
type Local struct {
	Ref      Ref
	Desc     ocispec.Descriptor // the manifest's descriptor
	Manifest ocispec.Manifest
	Layers   []BlockLayer
	Stack    *lsmt.Stack
	files    []*os.File
}

// OpenLocal opens an overlaybd image from an OCI layout reference (oci:DIR:TAG).
func OpenLocal(ref Ref, platform Platform) (*Local, error) {
	if ref.Transport != TransportOCI {
		return nil, fmt.Errorf("%s: only oci:DIR[:TAG] references can be opened locally", ref)
	}
	lay, err := OpenLayout(ref.Path)
	if err != nil {
		return nil, err
	}
	desc, err := lay.Resolve(ref)
	if err != nil {
		return nil, err
	}
	m, mdesc, err := lay.Manifest(desc, platform)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, err)
	}
	layers, err := BlockLayers(m)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, err)
	}
	img := &Local{Ref: ref, Desc: mdesc, Manifest: m, Layers: layers}
	files := make([]*lsmt.File, len(layers))
	for i, l := range layers {
		f, err := lay.OpenBlob(l.Descriptor)
		if err != nil {
			img.Close()
			return nil, fmt.Errorf("%s: layer %d: %w", ref, i, err)
		}
		img.files = append(img.files, f)
		if l.Target != "" {
			files[i], err = img.openTurbo(lay, f, l)
		} else {
			files[i], err = OpenLayerBlob(f, l.BlobSize, false)
		}
		if err != nil {
			img.Close()
			return nil, fmt.Errorf("%s: layer %d (%s): %w", ref, i, l.BlobDigest, err)
		}
	}
	img.Stack, err = lsmt.NewStack(files, nil)
	if err != nil {
		img.Close()
		return nil, fmt.Errorf("%s: %w", ref, err)
	}
	return img, nil
}

// openTurbo opens TurboOCI layer l, whose blob is f, over its original blob in the layout.
func (img *Local) openTurbo(lay *Layout, f *os.File, l BlockLayer) (*lsmt.File, error) {
	tm, err := ReadTurboMeta(f)
	if err != nil {
		return nil, err
	}
	t, err := os.Open(lay.BlobPath(l.Target))
	if err != nil {
		return nil, fmt.Errorf("TurboOCI target: %w", err)
	}
	img.files = append(img.files, t)
	st, err := t.Stat()
	if err != nil {
		return nil, err
	}
	return OpenTurbo(tm, t, st.Size())
}

// Close releases the image's blob files.
func (l *Local) Close() error {
	var errs []error
	for _, f := range l.files {
		errs = append(errs, f.Close())
	}
	l.files = nil
	return errors.Join(errs...)
}
