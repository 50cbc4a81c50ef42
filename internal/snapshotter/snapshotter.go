// Package snapshotter is obd's containerd snapshotter ("overlaybd"): containerd's overlayfs snapshotter for
// normal images, plus lazily read overlaybd images whose layer stack is mounted as one read-only device
// filesystem beneath each container's overlayfs upper directory.
//
// Pulls: a Prepare that unpacks an overlaybd layer with an image reference (labels containerd.io/snapshot.ref,
// …/overlaybd/blob-digest, …/overlaybd/blob-size and …/image-ref or …/cri.image-ref) is committed at once as a
// remote snapshot and answered with ErrAlreadyExists, so containerd skips downloading it. A layer that containerd
// downloads and unpacks (fs/overlaybd.commit holds a ZFile or LSMT file) is an overlaybd layer read locally.
//
// Containers: Prepare, View and Mounts of a snapshot whose parent chain is overlaybd ask the ImageMounter to
// mount the chain's layers at snapshots/<id>/block/mountpoint of the chain's topmost overlaybd snapshot <id> —
// one mount per image, shared by its containers — and return an overlay mount with that mountpoint as the lowest
// lowerdir. Normal layers above the overlaybd layers (an image built FROM an overlaybd image) are stacked above it
// as further lowerdirs; overlaybd layers above normal layers are an error. Acceleration (trace) layers are
// skipped. The mount stays until the snapshot that owns it is removed, which containerd allows only once no
// snapshot depends on it; New's caller runs Reconcile at start-up to re-mount what running containers use.
package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	digest "github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/internal/keylock"
)

// Name is the snapshotter's name in containerd (proxy_plugins.overlaybd), the same as upstream's.
const Name = "overlaybd"

// Snapshotter implements snapshots.Snapshotter; see the package documentation.
type Snapshotter struct {
	root    string
	ms      *storage.MetaStore
	inner   overlaySnapshotter // containerd's overlayfs snapshotter on the same metadata store and directories
	mounter ImageMounter
	locks   keylock.Locks // per image mount id: a mount never races its removal
	lock    *os.File      // root/lock, held while open
	log     *slog.Logger
	// profiles is the directory of registered startup profiles ("": none); see WithProfiles.
	profiles string
	// rwMode and quota are the node's writable mode and quota for containers; see WithWritable.
	rwMode string
	quota  int64
	// redirect finds the overlaybd images that stand in for normal images being pulled, or is nil; see WithRedirect.
	redirect Redirector
	// attachOnPull: see WithAttachOnPull; pulled counts the attaches it started, closing ends them (Close), and
	// pullAttaches holds the cancel of each running one by mount id (a removal of the image ends it).
	attachOnPull bool
	pulled       sync.WaitGroup
	closing      context.Context
	close        context.CancelFunc
	attachMu     sync.Mutex
	pullAttaches map[string]context.CancelFunc
}

// Redirector finds the overlaybd image that stands in for a normal image when the CRI plugin pulls it: an OCI
// referrer of the image ('obd convert --referrer'), whose layers are then read lazily instead of the normal layers
// being downloaded and unpacked.
type Redirector interface {
	// Redirect returns the overlaybd layer standing in for the normal layer whose snapshot is chainID, of the
	// image ref whose manifest for this node is manifest; nil when the image has no stand-in. It is called for
	// each layer of a pull: answers are expected to be remembered.
	Redirect(ctx context.Context, ref string, manifest digest.Digest, chainID string) (*StandinLayer, error)
}

// StandinLayer is an overlaybd layer standing in for a normal layer being pulled.
type StandinLayer struct {
	// Labels make the pull a lazy pull of the layer: its annotations and LabelImageRef naming its image.
	Labels map[string]string
	// Lowers are the blobs of the overlaybd layers below it in its image, bottom first: a block layer is a diff
	// of exactly those, so it stands in only over a chain of them.
	Lowers []digest.Digest
}

// WithAttachOnPull makes the snapshotter attach an overlaybd image's device (and mount its filesystem) as soon as
// a pull has committed the image's top layer, in the background, instead of when the first container over it is
// prepared: the container's start then skips the attach, and the mounter meanwhile decodes the image's start
// (see the mounter's decodeOnAttach). The top layer is known by the LabelCRIImageLayers label, which the CRI plugin
// and obd pull set; pulls without it attach when the first container is prepared. An image stays attached until
// its snapshots are removed, as one does after its first container.
func WithAttachOnPull(on bool) Option {
	return func(s *Snapshotter) { s.attachOnPull = on }
}

// WithRedirect makes pulls of normal images through the CRI plugin (which labels them with the image's manifest
// digest) read the overlaybd image r finds for them instead, when there is one.
func WithRedirect(r Redirector) Option {
	return func(s *Snapshotter) { s.redirect = r }
}

var _ snapshots.Snapshotter = (*Snapshotter)(nil)

type overlaySnapshotter interface {
	snapshots.Snapshotter
	snapshots.Cleaner
}

// Option configures New.
type Option func(*Snapshotter)

// WithLogger sets the logger of image mounts, unmounts and remote layers (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(s *Snapshotter) { s.log = l }
}

// WithProfiles makes the snapshotter prefetch registered startup profiles: a trace file in dir named by
// ProfilePath after the chain ID of an image's overlaybd layers is prefetched when that image's device is attached,
// unless the image has an acceleration layer or the container asks to record a trace.
func WithProfiles(dir string) Option {
	return func(s *Snapshotter) { s.profiles = dir }
}

// ProfilePath returns the file of the registered profile of the image whose overlaybd layers have chain ID chainID
// (the name containerd gives the top layer's snapshot) in dir.
func ProfilePath(dir, chainID string) string {
	return filepath.Join(dir, strings.ReplaceAll(chainID, ":", "-")+".trace")
}

// New opens (or creates) the snapshotter state under root: metadata.db and snapshots/<id>/{fs,work,block}.
// mounter mounts overlaybd images; Close releases the metadata store but leaves image mounts in place. A root is
// used by one Snapshotter at a time: New fails at once with ErrRootInUse while another holds it.
func New(root string, mounter ImageMounter, opts ...Option) (*Snapshotter, error) {
	if mounter == nil {
		return nil, errors.New("overlaybd snapshotter: no image mounter")
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("overlaybd snapshotter: %w", err)
	}
	lock, err := lockRoot(root)
	if err != nil {
		return nil, fmt.Errorf("overlaybd snapshotter: %w", err)
	}
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("overlaybd snapshotter: open metadata under %s: %w", root, err)
	}
	sn, err := overlay.NewSnapshotter(root, overlay.WithMetaStore(ms))
	if err != nil {
		ms.Close()
		lock.Close()
		return nil, fmt.Errorf("overlaybd snapshotter: %w", err)
	}
	inner, ok := sn.(overlaySnapshotter)
	if !ok {
		sn.Close()
		lock.Close()
		return nil, errors.New("overlaybd snapshotter: containerd's overlay snapshotter has no Cleanup")
	}
	s := &Snapshotter{root: root, ms: ms, inner: inner, mounter: mounter, lock: lock, log: slog.Default()}
	s.closing, s.close = context.WithCancel(context.Background())
	s.pullAttaches = map[string]context.CancelFunc{}
	for _, opt := range opts {
		opt(s)
	}
	return s, nil
}

func (s *Snapshotter) upperPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "fs")
}

// blockPath is the directory of an image chain's mount state; its presence marks the snapshot id as the owner
// of an image mountpoint.
func (s *Snapshotter) blockPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "block")
}

func (s *Snapshotter) mountpoint(id string) string {
	return filepath.Join(s.blockPath(id), "mountpoint")
}

// Stat returns the info of the snapshot named key.
func (s *Snapshotter) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	return s.inner.Stat(ctx, key)
}

// Update updates the labels of the snapshot named info.Name.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	return s.inner.Update(ctx, info, fieldpaths...)
}

// Usage returns the disk usage of a snapshot; a remote snapshot's is its (empty) directory, a writable layer's
// (RWDir, RWDev) the space of its files.
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	u, err := s.inner.Usage(ctx, key)
	if err != nil {
		return u, err
	}
	if id, info, err := s.snapshotID(ctx, key); err == nil {
		if _, _, ok := writableInfo(info); ok {
			u.Add(s.writableUsage(id))
		}
	}
	return u, nil
}

// Walk calls fn for the snapshots matching filters.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.inner.Walk(ctx, fn, filters...)
}

// Commit commits the active snapshot key as name. A writable layer (RWDir, RWDev) is sealed into an overlaybd
// layer file first.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	labels, err := optLabels(opts)
	if err != nil {
		return err
	}
	if id, info, err := s.snapshotID(ctx, key); err == nil {
		if _, quota, ok := writableInfo(info); ok {
			return s.commitWritable(ctx, id, info, name, key, quota, opts)
		}
		labels = mergeLabels(info.Labels, labels)
	}
	if err := s.inner.Commit(ctx, name, key, opts...); err != nil {
		return err
	}
	s.committed(ctx, name, labels)
	return nil
}

// mergeLabels returns the labels of a and b, b's where both have one.
func mergeLabels(a, b map[string]string) map[string]string {
	out := maps.Clone(a)
	if out == nil {
		out = map[string]string{}
	}
	maps.Copy(out, b)
	return out
}

// committed follows the commit of snapshot name by a pull (labels are the layer's): the image whose chain ends
// there is preloaded, and attached when this is the image's top layer (see WithAttachOnPull).
func (s *Snapshotter) committed(ctx context.Context, name string, labels map[string]string) {
	s.preload(ctx, name)
	if !s.attachOnPull || !isPulledTop(labels) || s.closing.Err() != nil {
		return
	}
	s.pulled.Add(1)
	go func() {
		defer s.pulled.Done()
		ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		defer cancel()
		defer context.AfterFunc(s.closing, cancel)()
		plan, err := s.planChain(ctx, name)
		if err != nil || plan == nil {
			return // not an overlaybd image (or no longer there)
		}
		s.attachMu.Lock()
		s.pullAttaches[plan.id] = cancel
		s.attachMu.Unlock()
		defer func() {
			s.attachMu.Lock()
			delete(s.pullAttaches, plan.id)
			s.attachMu.Unlock()
		}()
		defer s.locks.Lock(plan.id)()
		start := time.Now()
		if _, err := s.attach(ctx, plan); err != nil {
			if ctx.Err() != nil {
				s.log.Info("attach of the pulled image stopped: the image is removed, or the snapshotter stops", "image", plan.imageRef)
				return
			}
			s.log.Warn("cannot attach the pulled image: its first container attaches it", "image", plan.imageRef, "err", err)
			return
		}
		s.log.Info("attached the pulled image", "image", plan.imageRef, "mount-id", plan.id, "took", time.Since(start).Round(time.Millisecond))
	}()
}

// isPulledTop reports whether labels are those of a pull's top layer of its image (see LabelCRIImageLayers).
func isPulledTop(labels map[string]string) bool {
	d := labels[LabelCRILayerDigest]
	return d != "" && labels[LabelCRIImageLayers] == d
}

// preload lets the mounter start, in the background, what attaching the image whose chain ends at the committed
// snapshot name will need (see Preloader): during a pull, the image's layers are committed one after another and
// its acceleration layer last.
func (s *Snapshotter) preload(ctx context.Context, name string) {
	pl, ok := s.mounter.(Preloader)
	if !ok {
		return
	}
	plan, err := s.planChain(ctx, name)
	if err != nil || plan == nil {
		return
	}
	pl.Preload(plan.id, plan.layers, plan.trace)
}

// Cleanup removes the directories of removed snapshots.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	return s.inner.Cleanup(ctx)
}

// Close closes the metadata store. Image mounts stay: running containers use them.
func (s *Snapshotter) Close() error {
	s.close()
	s.pulled.Wait()
	err := s.inner.Close()
	if lerr := s.lock.Close(); lerr != nil && !errors.Is(lerr, os.ErrClosed) {
		err = errors.Join(err, lerr)
	}
	return err
}

// Prepare creates an active snapshot key over parent. For a lazy pull of an overlaybd layer it commits the
// target snapshot at once and returns an error wrapping errdefs.ErrAlreadyExists.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	labels, err := optLabels(opts)
	if err != nil {
		return nil, err
	}
	if isRemoteLayer(labels) {
		return nil, s.commitRemote(ctx, key, parent, labels, opts)
	}
	if redirected := s.redirected(ctx, parent, labels); redirected != nil {
		return nil, s.commitRemote(ctx, key, parent, redirected, opts)
	}
	return s.create(ctx, snapshots.KindActive, key, parent, labels, opts)
}

// redirected returns the labels of a lazy pull of the overlaybd layer that stands in for the normal layer a
// Prepare over parent with labels unpacks (see Redirector), or nil: no stand-in, not a CRI pull, a parent chain that
// is not the stand-in's own layers below it (a layer shared with an image pulled before, unpacked or standing in
// from another conversion), or a failure to look (logged). The layer is then pulled as it is.
func (s *Snapshotter) redirected(ctx context.Context, parent string, labels map[string]string) map[string]string {
	target, ref, md := labels[LabelTargetRef], imageRef(labels), labels[LabelCRIManifestDigest]
	if s.redirect == nil || target == "" || ref == "" || md == "" || isLayerUnpack(labels) {
		return nil
	}
	manifest, err := digest.Parse(md)
	if err != nil {
		return nil
	}
	st, err := s.redirect.Redirect(ctx, ref, manifest, target)
	if err != nil {
		s.log.Warn("cannot look for an overlaybd image standing in for the image: its layers are pulled as they are", "image", ref, "manifest", manifest, "err", err)
		return nil
	}
	if st == nil {
		return nil
	}
	below := []digest.Digest{}
	if parent != "" {
		plan, err := s.planChain(ctx, parent)
		if err != nil || plan == nil || len(plan.uppers) > 0 {
			below = nil // unpacked layers below: no block layer stands on them
		} else {
			for _, l := range plan.layers {
				below = append(below, l.Digest)
			}
		}
	}
	if below == nil || !slices.Equal(below, st.Lowers) {
		s.log.Info("the layers below are not the overlaybd image's: the layer is pulled as it is", "image", ref, "target", target, "parent", parent)
		return nil
	}
	out := maps.Clone(labels)
	maps.Copy(out, st.Labels)
	if !isRemoteLayer(out) {
		return nil
	}
	s.log.Info("pulling the overlaybd image that stands in for the image", "image", ref, "standin", imageRef(out), "target", target,
		"blob", out[image.AnnotationBlobDigest])
	return out
}

// View creates a read-only snapshot key of parent.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	labels, err := optLabels(opts)
	if err != nil {
		return nil, err
	}
	return s.create(ctx, snapshots.KindView, key, parent, labels, opts)
}

func optLabels(opts []snapshots.Opt) (map[string]string, error) {
	var info snapshots.Info
	for _, o := range opts {
		if err := o(&info); err != nil {
			return nil, err
		}
	}
	return info.Labels, nil
}

func (s *Snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, labels map[string]string, opts []snapshots.Opt) ([]mount.Mount, error) {
	create := s.inner.Prepare
	if kind == snapshots.KindView {
		create = s.inner.View
	}
	if parent == "" || isLayerUnpack(labels) {
		return create(ctx, key, parent, opts...)
	}
	plan, err := s.planChain(ctx, parent)
	if err != nil {
		return nil, fmt.Errorf("%s snapshot %q over %q: %w", kindVerb(kind), key, parent, err)
	}
	if plan == nil {
		return create(ctx, key, parent, opts...)
	}
	if labels[LabelRecordTrace] == "yes" && labels[LabelRecordTracePath] != "" {
		plan.trace = labels[LabelRecordTracePath]
	}
	if kind == snapshots.KindActive {
		mode, quota, err := s.writableOf(labels)
		if err != nil {
			return nil, fmt.Errorf("prepare snapshot %q: %w", key, err)
		}
		if mode != RWOverlayfs && len(plan.uppers) > 0 {
			// Normal layers above the image's (an image built FROM it) have no place in a block device.
			s.log.Warn("image has normal layers above its overlaybd layers: the container gets an overlayfs upper directory, not a writable layer",
				"key", key, "image", plan.imageRef, "mode", mode)
			mode = RWOverlayfs
		}
		if mode != RWOverlayfs {
			wm, err := s.writableMounter()
			if err != nil {
				return nil, fmt.Errorf("prepare snapshot %q: %w", key, err)
			}
			return s.createWritable(ctx, wm, key, parent, plan, mode, quota, opts)
		}
	}

	unlock := s.locks.Lock(plan.id)
	defer unlock()
	if labels[LabelRecordTrace] == "yes" && labels[LabelRecordTracePath] != "" {
		s.releaseUnused(ctx, plan)
	}
	inner, err := create(ctx, key, parent, opts...)
	if err != nil {
		return nil, err
	}
	mp, err := s.attach(ctx, plan)
	var ms []mount.Mount
	if err == nil {
		ms, err = plan.mounts(key, kind, inner, mp)
	}
	if err != nil {
		if rerr := s.inner.Remove(ctx, key); rerr != nil {
			s.log.Warn("cannot roll back snapshot after failed image mount", "key", key, "error", rerr)
		}
		return nil, fmt.Errorf("%s snapshot %q: %w", kindVerb(kind), key, err)
	}
	if st, ok := s.mounter.(Starter); ok && kind == snapshots.KindActive {
		st.Starting(plan.id)
	}
	s.log.Info("snapshot over overlaybd image", "key", key, "image", plan.imageRef, "mount-id", plan.id)
	return ms, nil
}

// registeredProfile returns the registered profile of the image whose top overlaybd layer snapshot is name, or "".
func (s *Snapshotter) registeredProfile(name string) string {
	if s.profiles == "" || name == "" || strings.ContainsAny(name, "/\\") {
		return ""
	}
	p := ProfilePath(s.profiles, name)
	if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() || fi.Size() == 0 {
		return ""
	}
	return p
}

func kindVerb(k snapshots.Kind) string {
	if k == snapshots.KindView {
		return "view"
	}
	return "prepare"
}

// attach asks the mounter to mount plan's image at its mountpoint (idempotent) and returns the mountpoint. The
// caller holds the plan's lock.
func (s *Snapshotter) attach(ctx context.Context, plan *imagePlan) (string, error) {
	// The owner may have been removed since the plan was made (Reconcile); never recreate its directory.
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, _, _, err := storage.GetInfo(ctx, plan.name)
		if err == nil && id != plan.id {
			err = fmt.Errorf("snapshot id changed from %s to %s: %w", plan.id, id, errdefs.ErrNotFound)
		}
		return err
	}); err != nil {
		return "", fmt.Errorf("image %s: layer snapshot %q: %w", plan.imageRef, plan.name, err)
	}
	mp := s.mountpoint(plan.id)
	if err := os.MkdirAll(mp, 0o700); err != nil {
		return "", fmt.Errorf("image %s: %w", plan.imageRef, err)
	}
	mount := s.mounter.Mount
	if tm, ok := s.mounter.(TraceMounter); ok && plan.trace != "" {
		mount = func(ctx context.Context, id string, layers []Layer, target string) error {
			return tm.MountTrace(ctx, id, layers, target, plan.trace)
		}
	}
	if err := mount(ctx, plan.id, plan.layers, mp); err != nil {
		// The cause is kept as text only: it crosses gRPC, whose error encoder cannot walk every error chain
		// (a *net.DNSError unwraps to nil and makes it panic).
		return "", fmt.Errorf("mount image %s (layers up to snapshot %q) at %s: %s", plan.imageRef, plan.name, mp, err)
	}
	return mp, nil
}

// releaseUnused unmounts plan's image when it is mounted but no snapshot over it is (a pull attached it, or its
// containers are gone), so that the attach that follows takes the record-trace labels: they act when the image is
// attached. The caller holds the plan's lock.
func (s *Snapshotter) releaseUnused(ctx context.Context, plan *imagePlan) {
	mp := s.mountpoint(plan.id)
	if mounted, err := mountinfo.Mounted(mp); err != nil || !mounted {
		return
	}
	var parents []string
	if err := s.inner.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if info.Kind != snapshots.KindCommitted && info.Parent != "" && !isLayerUnpack(info.Labels) {
			parents = append(parents, info.Parent)
		}
		return nil
	}); err != nil {
		s.log.Warn("cannot tell whether the image is in use: its device stays attached and does not record", "image", plan.imageRef, "err", err)
		return
	}
	for _, p := range parents {
		if other, err := s.planChain(ctx, p); err != nil || (other != nil && other.id == plan.id) {
			return // in use (or unknown): the labels are not taken, as upstream
		}
	}
	if err := s.mounter.Unmount(ctx, plan.id, mp); err != nil {
		s.log.Warn("cannot detach the unused image to attach it for recording", "image", plan.imageRef, "err", err)
		return
	}
	s.log.Info("detached the unused image: it is attached again with the record-trace labels", "image", plan.imageRef, "mount-id", plan.id)
}

// Mounts returns the mounts of the active or view snapshot key. Over an overlaybd chain it first mounts the image
// again if needed (after a reboot or a crash of the device service).
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	id, info, err := s.snapshotID(ctx, key)
	if err != nil || info.Kind == snapshots.KindCommitted || info.Parent == "" || isLayerUnpack(info.Labels) {
		return s.inner.Mounts(ctx, key)
	}
	if mode, quota, ok := writableInfo(info); ok {
		return s.mountsWritable(ctx, id, info, mode, quota)
	}
	plan, err := s.planChain(ctx, info.Parent)
	if err != nil {
		return nil, fmt.Errorf("mounts of snapshot %q: %w", key, err)
	}
	if plan == nil {
		return s.inner.Mounts(ctx, key)
	}
	unlock := s.locks.Lock(plan.id)
	defer unlock()
	inner, err := s.inner.Mounts(ctx, key)
	if err != nil {
		return nil, err
	}
	mp, err := s.attach(ctx, plan)
	if err != nil {
		return nil, fmt.Errorf("mounts of snapshot %q: %w", key, err)
	}
	return plan.mounts(key, info.Kind, inner, mp)
}

// Remove removes the snapshot key. Removing the snapshot that owns an image mountpoint (the topmost overlaybd
// layer of a chain) unmounts the image first; containerd's metadata rules guarantee no snapshot uses it then.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	var (
		id   string
		info snapshots.Info
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) (err error) {
		id, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	if mode, _, ok := writableInfo(info); err == nil && ok {
		return s.removeWritable(ctx, id, key, mode)
	}
	if err != nil || info.Kind != snapshots.KindCommitted {
		return s.inner.Remove(ctx, key)
	}
	// An attach its pull started is of no use now: it stops instead of holding the image's lock.
	s.attachMu.Lock()
	if cancel := s.pullAttaches[id]; cancel != nil {
		cancel()
	}
	s.attachMu.Unlock()
	unlock := s.locks.Lock(id)
	defer unlock()
	if _, err := os.Stat(s.blockPath(id)); err != nil {
		return s.inner.Remove(ctx, key)
	}
	children := 0
	if err := s.inner.Walk(ctx, func(context.Context, snapshots.Info) error {
		children++
		return nil
	}, "parent=="+strconv.Quote(key)); err != nil {
		return fmt.Errorf("remove snapshot %q: %w", key, err)
	}
	if children > 0 {
		return s.inner.Remove(ctx, key) // fails with the overlay snapshotter's "has children" error
	}
	mp := s.mountpoint(id)
	if err := s.mounter.Unmount(ctx, id, mp); err != nil {
		return fmt.Errorf("remove snapshot %q: unmount image%s at %s: %w", key, imageSuffix(imageRef(info.Labels)), mp, err)
	}
	if mounted, err := mountinfo.Mounted(mp); err != nil || mounted {
		return fmt.Errorf("remove snapshot %q: image mountpoint %s is still mounted after unmount (%v): %w", key, mp, err, errdefs.ErrFailedPrecondition)
	}
	s.log.Info("unmounted overlaybd image", "key", key, "mount-id", id, "image", imageRef(info.Labels))
	return s.inner.Remove(ctx, key)
}

// commitRemote creates the remote snapshot of a lazily pulled overlaybd layer: it commits key over parent as
// labels' target at once and returns an error wrapping errdefs.ErrAlreadyExists, also when the target exists
// (two pulls of one image race).
func (s *Snapshotter) commitRemote(ctx context.Context, key, parent string, labels map[string]string, opts []snapshots.Opt) error {
	target := labels[LabelTargetRef]
	alreadyExists := fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
	snapshotDir := filepath.Join(s.root, "snapshots")
	var tmp, dir string
	existed := false
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) (err error) {
		if _, _, _, err := storage.GetInfo(ctx, target); err == nil {
			existed = true
			return nil
		} else if !errdefs.IsNotFound(err) {
			return err
		}
		// Like the overlay snapshotter, make the directory inside the write transaction: Remove and Cleanup
		// delete unknown directories, also under a write transaction.
		if tmp, err = os.MkdirTemp(snapshotDir, "new-"); err != nil {
			return err
		}
		if err := os.Mkdir(filepath.Join(tmp, "fs"), 0o755); err != nil {
			return err
		}
		sn, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent, opts...)
		if err != nil {
			return err
		}
		dir = filepath.Join(snapshotDir, sn.ID)
		if err := os.Rename(tmp, dir); err != nil {
			dir = ""
			return err
		}
		tmp = ""
		du, err := fs.DiskUsage(ctx, filepath.Join(dir, "fs"))
		if err != nil {
			return err
		}
		committed := maps.Clone(labels)
		committed[LabelRemote] = LabelRemoteValue
		_, err = storage.CommitActive(ctx, key, target, snapshots.Usage(du), snapshots.WithLabels(committed))
		return err
	})
	if err != nil {
		for _, d := range []string{tmp, dir} {
			if d != "" {
				if rerr := os.RemoveAll(d); rerr != nil {
					s.log.Warn("cannot remove directory of failed remote snapshot", "path", d, "error", rerr)
				}
			}
		}
		if errdefs.IsAlreadyExists(err) {
			return alreadyExists
		}
		return fmt.Errorf("commit remote snapshot %q (key %q, image %s): %w", target, key, imageRef(labels), err)
	}
	if !existed {
		s.log.Info("committed remote overlaybd layer", "target", target, "key", key, "image", imageRef(labels),
			"blob", labels[image.AnnotationBlobDigest])
		s.committed(ctx, target, labels)
	}
	return alreadyExists
}

// Reconcile mounts again the images of all active and view snapshots over overlaybd chains, so that after a
// reboot or a restart of the device service running containers get their lower filesystems back where possible.
// It logs each image and returns the errors of those it could not mount.
func (s *Snapshotter) Reconcile(ctx context.Context) error {
	var users []snapshots.Info
	if err := s.inner.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		if info.Kind != snapshots.KindCommitted && info.Parent != "" && !isLayerUnpack(info.Labels) {
			users = append(users, info)
		}
		return nil
	}); err != nil && !errdefs.IsNotFound(err) { // NotFound: no snapshot was ever made
		return fmt.Errorf("reconcile image mounts: %w", err)
	}
	plans := map[string]*imagePlan{}
	count := map[string]int{}
	var errs []error
	writable := 0
	for _, u := range users {
		if mode, quota, ok := writableInfo(u); ok {
			writable++
			if err := s.reconcileWritable(ctx, u, mode, quota); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		plan, err := s.planChain(ctx, u.Parent)
		if err != nil {
			errs = append(errs, fmt.Errorf("snapshot %q: %w", u.Name, err))
			continue
		}
		if plan != nil {
			plans[plan.id] = plan
			count[plan.id]++
		}
	}
	for id, plan := range plans {
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		unlock := s.locks.Lock(id)
		_, err := s.attach(ctx, plan)
		unlock()
		l := s.log.With("image", plan.imageRef, "mount-id", id, "mountpoint", s.mountpoint(id), "snapshots", count[id])
		if err != nil {
			l.Warn("cannot mount overlaybd image again for its snapshots", "error", err)
			errs = append(errs, err)
			continue
		}
		l.Info("overlaybd image mounted for its snapshots")
	}
	s.log.Info("reconciled overlaybd image mounts", "images", len(plans), "snapshots", len(users), "writable", writable, "errors", len(errs))
	return errors.Join(errs...)
}
