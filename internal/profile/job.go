package profile

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/units"
)

// Targets parses the image argument of 'obd profile' (a registry reference) and where to push the accelerated
// image: push, or DefaultTag when push is "".
func Targets(imageArg, push string) (ref, dst image.Ref, err error) {
	if ref, err = image.ParseRef(imageArg); err != nil {
		return ref, dst, err
	}
	if ref.Transport != image.TransportRegistry {
		return ref, dst, fmt.Errorf("%s: profile needs a registry reference (host[:port]/repo:tag)", imageArg)
	}
	if push == "" {
		return ref, DefaultTag(ref), nil
	}
	if dst, err = image.ParseRef(push); err != nil {
		return ref, dst, fmt.Errorf("--push: %w", err)
	}
	if dst.Transport != image.TransportRegistry {
		return ref, dst, fmt.Errorf("--push %s: want a registry reference", push)
	}
	return ref, dst, nil
}

// WriteSummary writes what the recording of the start of ref found: reads, phases and bytes fetched.
func (p *Profile) WriteSummary(w io.Writer, ref image.Ref) {
	fmt.Fprintf(w, "recorded the start of %s (%s): %d reads, %s of %d layers; attach %.2fs, first read %.3fs after it, %s %.2fs after the start\n",
		ref, p.End, len(p.Reads), units.Bytes(p.ReadBytes), len(p.Layers), p.Phases.Attach, p.Phases.FirstRead, p.End, p.Phases.Ready)
	if p.Fetched != nil {
		fmt.Fprintf(w, "fetched from the registry while recording: %s in %d requests\n", units.Bytes(p.Fetched.Bytes), p.Fetched.Requests)
	}
}

// Save writes the profile to path as indented JSON ('obd profile --out').
func (p *Profile) Save(path string) error {
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
