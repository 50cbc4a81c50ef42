package profile

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/containerd/containerd/v2/client"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/pull"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/units"
)

// Job is what 'obd profile' does: pull the image lazily unless containerd has it, record its start, then write
// the profile, register the trace on the node and push the accelerated image, as asked.
type Job struct {
	Options
	Ref, Push image.Ref      // the image, and where its accelerated image goes (Targets)
	Platform  image.Platform // of a multi-platform image: the manifest to push the accelerated one of
	Pull      pull.Options   // for a pull (PlainHTTP, Credentials; Snapshotter is Options.Snapshotter)
	// Out is a file for the profile (JSON); InstallDir the node's profiles directory to register the trace in.
	Out, InstallDir string
	// Registry gives a client for the push; nil pushes nothing.
	Registry func(host string) (*registry.Client, error)
}

// Run runs the job with containerd c (ctx names the namespace), and writes what it did to w.
func (j Job) Run(ctx context.Context, c *client.Client, w io.Writer) error {
	img, err := pull.Unpacked(ctx, c, j.Ref.String(), j.Snapshotter)
	if err != nil {
		return err
	}
	var pullTime time.Duration
	if img == nil {
		j.logf("pulling %s lazily", j.Ref)
		start := time.Now()
		opts := j.Pull
		opts.Snapshotter = j.Snapshotter
		res, err := pull.Pull(ctx, c, j.Ref.String(), opts)
		if err != nil {
			return err
		}
		img, pullTime = res.Image, time.Since(start)
	}
	p, tf, err := Record(ctx, c, img, j.Options)
	if err != nil {
		return err
	}
	p.Phases.Pull = pullTime.Seconds()
	p.WriteSummary(w, j.Ref)
	if j.Out != "" {
		if err := p.Save(j.Out); err != nil {
			return err
		}
		fmt.Fprintf(w, "profile written to %s\n", j.Out)
	}
	if j.InstallDir != "" {
		path, err := Install(j.InstallDir, p.ChainID, tf)
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "installed on this node as %s: starts of %s prefetch it when the image has no acceleration layer\n", path, j.Ref)
	}
	if j.Registry == nil {
		return nil
	}
	rc, err := j.Registry(j.Push.Host())
	if err != nil {
		return err
	}
	defer rc.Close()
	desc, err := Push(ctx, rc, j.Ref, j.Push, j.Platform, p.Layers, tf)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "pushed %s (%s) with the acceleration layer\n", j.Push, desc.Digest)
	return nil
}

func (j Job) logf(format string, a ...any) {
	if j.Logf != nil {
		j.Logf(format, a...)
	}
}

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
