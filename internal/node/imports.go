package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/obdproject/obd/internal/atomicfile"
	"github.com/obdproject/obd/internal/snapshotter"
	"github.com/obdproject/obd/internal/status"
)

// importsFile, in the cache directory, lists the cache snapshots imported on the node.
const importsFile = "imports.json"

// maxImports bounds the import log: the newest imports are kept.
const maxImports = 64

// importLog records the last import of each snapshot source, so that status and 'obd health' can tell whether the
// imported blocks are still cached and still belong to images on the node.
type importLog struct {
	mu   sync.Mutex
	path string
}

func (l *importLog) load() ([]status.CacheImport, error) {
	b, err := os.ReadFile(l.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("import log: %w", err)
	}
	var out []status.CacheImport
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("import log %s: %w", l.path, err)
	}
	return out, nil
}

// add records an import, replacing an earlier one of the same source.
func (l *importLog) add(ci status.CacheImport) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	all, err := l.load()
	if err != nil {
		all = nil // a damaged log is replaced
	}
	kept := []status.CacheImport{ci}
	for _, old := range all {
		if old.Source != ci.Source && len(kept) < maxImports {
			kept = append(kept, old)
		}
	}
	sort.SliceStable(kept, func(i, j int) bool { return kept[i].Time.Before(kept[j].Time) })
	b, err := json.MarshalIndent(kept, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(l.path, b, 0o600); err != nil {
		return fmt.Errorf("import log: %w", err)
	}
	return nil
}

// record adds an import's answer to the log.
func (l *importLog) record(source string, at time.Time, res []status.ImportedBlob) error {
	ci := status.CacheImport{Source: source, Time: at.UTC(), Blobs: []string{}}
	for _, b := range res {
		ci.Blobs = append(ci.Blobs, b.Digest)
		ci.Blocks += b.Imported + b.Present
		ci.Dropped += b.Dropped
	}
	return l.add(ci)
}

// importsStatus returns the import log with, for each import, how many of its blobs are cached and how many are
// layers of the images pulled on the node.
func (o *ops) importsStatus(ctx context.Context, sn *snapshotter.Snapshotter) ([]status.CacheImport, error) {
	imports, err := o.imports.load()
	if err != nil || len(imports) == 0 || o.cache == nil {
		return imports, err
	}
	cached := map[digest.Digest]bool{}
	for _, b := range o.cache.Blobs() {
		cached[b.Digest] = b.Blocks > 0
	}
	layers, err := sn.LayerBlobs(ctx)
	if err != nil {
		return imports, err
	}
	for i := range imports {
		for _, b := range imports[i].Blobs {
			if cached[digest.Digest(b)] {
				imports[i].CachedBlobs++
			}
			if layers[digest.Digest(b)] {
				imports[i].ImageBlobs++
			}
		}
	}
	return imports, nil
}
