package node

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/profile"
	"github.com/obdproject/obd/internal/pull"
	"github.com/obdproject/obd/internal/registry"
	"github.com/obdproject/obd/internal/snapshotter"
)

// standins is the snapshotter's Redirector: it finds the overlaybd image attached as an OCI referrer to a normal
// image the CRI plugin pulls, once per image (a pull asks for each layer), and remembers the answer for a while.
type standins struct {
	clients func(host string) (*registry.Client, error)
	// profiles is the snapshotter's directory of registered profiles: a stand-in's acceleration layer is registered
	// there for the normal image's chain ("": not at all).
	profiles string
	log      *slog.Logger

	mu    sync.Mutex
	found map[digest.Digest]*standin // by manifest digest
}

// standin is what standins found for one manifest; done is closed when the lookup is over.
type standin struct {
	done   chan struct{}
	at     time.Time
	layers map[string]*snapshotter.StandinLayer // by chain ID; nil when the image has no stand-in
	err    error
}

const (
	// standinTTL is how long a lookup's answer is used: the pulls of one image, not the next deployment's.
	standinTTL = 2 * time.Minute
	// standinFailTTL is how long a failed lookup is not tried again (the other layers of the same pull).
	standinFailTTL = 20 * time.Second
	// standinTimeout bounds a lookup: a few registry round trips.
	standinTimeout = 30 * time.Second
)

var _ snapshotter.Redirector = (*standins)(nil)

func newStandins(clients func(string) (*registry.Client, error), profiles string, log *slog.Logger) *standins {
	return &standins{clients: clients, profiles: profiles, log: log, found: map[digest.Digest]*standin{}}
}

// Redirect implements snapshotter.Redirector.
func (s *standins) Redirect(ctx context.Context, ref string, manifest digest.Digest, chainID string) (*snapshotter.StandinLayer, error) {
	s.mu.Lock()
	e := s.found[manifest]
	if e != nil {
		select {
		case <-e.done:
			ttl := standinTTL
			if e.err != nil {
				ttl = standinFailTTL
			}
			if time.Since(e.at) > ttl {
				e = nil
			}
		default: // a lookup in progress
		}
	}
	if e == nil {
		e = &standin{done: make(chan struct{})}
		s.found[manifest] = e
		for m, old := range s.found { // forget stale answers
			if old != e && !old.at.IsZero() && time.Since(old.at) > standinTTL {
				delete(s.found, m)
			}
		}
		go s.lookup(e, ref, manifest)
	}
	s.mu.Unlock()
	select {
	case <-e.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if e.err != nil {
		return nil, e.err
	}
	l := e.layers[chainID]
	if l == nil {
		return nil, nil
	}
	return &snapshotter.StandinLayer{Labels: maps.Clone(l.Labels), Lowers: slices.Clone(l.Lowers)}, nil
}

// lookup fills e; it runs apart from the Prepare that started it, whose cancellation must not spoil the answer
// for the other layers.
func (s *standins) lookup(e *standin, ref string, manifest digest.Digest) {
	defer func() {
		s.mu.Lock()
		e.at = time.Now()
		s.mu.Unlock()
		close(e.done)
	}()
	r, err := image.ParseRef(ref)
	if err != nil || r.Transport != image.TransportRegistry {
		return // not a registry image: nothing stands in for it
	}
	rc, err := s.clients(r.Host())
	if err != nil {
		e.err = err
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), standinTimeout)
	defer cancel()
	st, err := pull.FindStandin(ctx, rc, r, manifest)
	if err != nil || st == nil {
		e.err = err
		return
	}
	e.layers = map[string]*snapshotter.StandinLayer{}
	for i, chain := range st.Chain {
		bl := st.Layers[i]
		l := &snapshotter.StandinLayer{Labels: maps.Clone(bl.Descriptor.Annotations)}
		l.Labels[snapshotter.LabelImageRef] = st.Ref.String()
		for _, lower := range st.Layers[:i] {
			l.Lowers = append(l.Lowers, lower.BlobDigest)
		}
		e.layers[chain.String()] = l
	}
	s.log.Info("found an overlaybd image standing in for the image being pulled", "image", ref, "manifest", manifest, "standin", st.Ref.String())
	if st.Accel != nil && s.profiles != "" && len(st.Chain) > 0 {
		// The containers of the normal image prefetch the stand-in's recorded start: a profile registered for the
		// chain the pull commits (read when its device is attached, or when the pull preloads it).
		if err := s.installTrace(ctx, rc, r, st); err != nil {
			s.log.Warn("cannot register the recorded start of the stand-in: no prefetch", "standin", st.Ref.String(), "err", err)
		}
	}
}

// maxAccelLayer bounds the acceleration layer of a stand-in fetched to register its trace.
const maxAccelLayer = 64 << 20

func (s *standins) installTrace(ctx context.Context, rc *registry.Client, r image.Ref, st *pull.Standin) error {
	if st.Accel.Size > maxAccelLayer {
		return fmt.Errorf("acceleration layer of %d bytes", st.Accel.Size)
	}
	rd, err := rc.FetchBlob(ctx, r.Host(), r.Repository(), *st.Accel)
	if err != nil {
		return err
	}
	defer rd.Close()
	b, err := io.ReadAll(io.LimitReader(rd, maxAccelLayer))
	if err != nil {
		return err
	}
	tf, err := profile.TraceOfLayer(b)
	if err != nil {
		return err
	}
	path, err := profile.Install(s.profiles, st.Chain[len(st.Chain)-1], tf)
	if err == nil {
		s.log.Info("registered the recorded start of the stand-in", "standin", st.Ref.String(), "profile", path)
	}
	return err
}
