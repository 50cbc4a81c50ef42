package trace

import (
	"encoding/json"
	"fmt"

	"github.com/opencontainers/go-digest"
)

// Start is a start of an image that a node learned (obd's, not upstream's): the image's layers, bottom first, and
// the layer reads of the start as a trace file. Nodes keep one per image and cache snapshots carry them.
type Start struct {
	Layers []StartLayer `json:"layers"`
	Trace  []byte       `json:"trace"` // base64 in JSON
}

// StartLayer names a layer of a Start: its blob's digest and, for a TurboOCI layer, the digest of its original.
type StartLayer struct {
	Digest digest.Digest `json:"digest"`
	Target string        `json:"target,omitempty"`
}

// MaxStartLayers bounds the layers of a Start read from outside.
const MaxStartLayers = 256

// ParseStart parses a Start's JSON and checks it (see Start.Records).
func ParseStart(b []byte) (Start, []Record, error) {
	var s Start
	if err := json.Unmarshal(b, &s); err != nil {
		return s, nil, fmt.Errorf("learned start: %w", err)
	}
	recs, err := s.Records()
	return s, recs, err
}

// Records checks the Start (its layers' digests, its trace, records of its layers only) and returns its reads.
func (s Start) Records() ([]Record, error) {
	if len(s.Layers) == 0 || len(s.Layers) > MaxStartLayers {
		return nil, fmt.Errorf("learned start: %d layers, want 1 to %d", len(s.Layers), MaxStartLayers)
	}
	for i, l := range s.Layers {
		if err := l.Digest.Validate(); err != nil {
			return nil, fmt.Errorf("learned start: layer %d: %w", i, err)
		}
		if l.Target != "" {
			if err := digest.Digest(l.Target).Validate(); err != nil {
				return nil, fmt.Errorf("learned start: layer %d: target: %w", i, err)
			}
		}
	}
	recs, err := Decode(s.Trace)
	if err != nil {
		return nil, fmt.Errorf("learned start: %w", err)
	}
	for i, r := range recs {
		if int(r.Layer) >= len(s.Layers) {
			return nil, fmt.Errorf("learned start: record %d reads layer %d of %d", i, r.Layer, len(s.Layers))
		}
	}
	return recs, nil
}
