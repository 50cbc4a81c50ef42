package convert

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	digest "github.com/opencontainers/go-digest"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/obdproject/obd/internal/erofs"
	"github.com/obdproject/obd/internal/ext4"
	"github.com/obdproject/obd/internal/image"
	"github.com/obdproject/obd/zfile"
)

// layerRevision names the bytes this converter writes for a given input. Bump it whenever a change to the applier,
// mkfs settings, LSMT commit, ZFile writer or tar wrapper makes obd write different bytes for the same source, so
// that conversion databases stop handing out layers made by the old code.
const layerRevision = 1

// DefaultDBMaxSize bounds the blobs a DB keeps locally unless told otherwise (10 GiB).
const DefaultDBMaxSize = 10 << 30

const (
	dbSchema  = "1"
	dbTimeout = time.Minute
	// maxRepos bounds the registry locations remembered per blob (most recent first).
	maxRepos = 16
	// orphanAge is how old a store file unknown to the database must be before Trim removes it (younger ones may
	// belong to a conversion that is about to record them).
	orphanAge = time.Hour
)

var (
	bucketMeta   = []byte("meta")
	bucketLayers = []byte("layers")
	bucketBlobs  = []byte("blobs")
)

// DB is a conversion database: it maps a source layer — its chain ID and every option that shapes the converted
// bytes — to the overlaybd layer blob made of it, so that converting an image that shares layers with one converted
// before reuses them instead of applying them again. Reuse gives the same bytes as converting again.
//
// On disk it is a bbolt file (bucket "layers": layer key → layer record; bucket "blobs": blob digest → blob record)
// and, next to it, a store of layer blobs (STORE/sha256/HEX) bounded in bytes and trimmed least recently used
// first. A stored blob is the committed LSMT layer, compressed and tar-wrapped: it is the output blob and, opened
// through its ZFile, the lower layer the next layer's conversion needs. A blob trimmed from the store stays usable
// while a registry is known to hold it (RecordPushed).
//
// The bbolt file is opened for each short transaction only, so several obd processes can share a DB.
type DB struct {
	path    string
	store   string
	maxSize int64
}

// layerRecord is the value of a layer key.
type layerRecord struct {
	Blob    digest.Digest `json:"blob"`
	Size    int64         `json:"size"`
	UUID    string        `json:"uuid"`
	Chain   digest.Digest `json:"chain"`
	Created time.Time     `json:"created"`
}

// blobRecord is what the DB knows about a layer blob.
type blobRecord struct {
	Size     int64     `json:"size"`
	Local    bool      `json:"local"` // in the local store
	LastUsed time.Time `json:"lastUsed"`
	Repos    []string  `json:"repos,omitempty"` // registry locations HOST/REPO known to hold it, most recent first
}

// DefaultDBPath is where obd keeps its conversion database: the user's cache directory/obd/convert.db.
func DefaultDBPath() (string, error) {
	dir, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("conversion database: no cache directory (%w): pass --db PATH or --no-db", err)
	}
	return filepath.Join(dir, "obd", "convert.db"), nil
}

// OpenDB opens (creating if needed) the conversion database at path, whose local blob store keeps at most maxSize
// bytes (0 keeps none: layers are then reused only from registries).
func OpenDB(path string, maxSize int64) (*DB, error) {
	if maxSize < 0 {
		return nil, fmt.Errorf("conversion database: negative maximum size %d", maxSize)
	}
	db := &DB{path: path, store: strings.TrimSuffix(path, ".db") + ".blobs", maxSize: maxSize}
	if err := os.MkdirAll(filepath.Join(db.store, "sha256"), 0o700); err != nil {
		return nil, fmt.Errorf("conversion database: %w", err)
	}
	err := db.update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		switch v := string(meta.Get([]byte("schema"))); v {
		case "":
			if err := meta.Put([]byte("schema"), []byte(dbSchema)); err != nil {
				return err
			}
		case dbSchema:
		default:
			return fmt.Errorf("schema %q, this obd reads %q: move the file away (it is only a cache) or pass --no-db", v, dbSchema)
		}
		for _, b := range [][]byte{bucketLayers, bucketBlobs} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return db, nil
}

// Path is the database file.
func (db *DB) Path() string { return db.path }

// StoreDir is the directory of the local blob store.
func (db *DB) StoreDir() string { return db.store }

func (db *DB) blobPath(d digest.Digest) string {
	return filepath.Join(db.store, d.Algorithm().String(), d.Encoded())
}

// update runs fn in a read-write transaction, holding the file only for its duration.
func (db *DB) update(fn func(*bolt.Tx) error) error {
	b, err := bolt.Open(db.path, 0o600, &bolt.Options{Timeout: dbTimeout})
	if err != nil {
		if errors.Is(err, bolterrors.ErrTimeout) {
			return fmt.Errorf("conversion database %s: still locked by another process after %s (pass --no-db to convert without it)", db.path, dbTimeout)
		}
		return fmt.Errorf("conversion database %s: %w (it is only a cache: move it away, or pass --no-db)", db.path, err)
	}
	err = b.Update(fn)
	if cerr := b.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("conversion database %s: %w", db.path, err)
	}
	return nil
}

func getJSON(b *bolt.Bucket, key []byte, v any) bool {
	raw := b.Get(key)
	return raw != nil && json.Unmarshal(raw, v) == nil
}

func putJSON(b *bolt.Bucket, key []byte, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(key, raw)
}

// keyPrefix is the part of a layer key shared by all layers of one conversion: everything but the chain ID that
// shapes a converted layer's bytes. baseBlob is the digest of the base layer's blob, or "" to mkfs.
func keyPrefix(vsize int64, baseBlob digest.Digest, z zfile.Options, fsType string) string {
	fsys := fmt.Sprintf("mkfs vsize=%d", vsize)
	if fsType == FsErofs {
		fsys = fmt.Sprintf("erofs %d vsize=%d", erofs.Revision, vsize)
	}
	if baseBlob != "" {
		fsys = "base " + baseBlob.String()
	}
	algo, block := "lz4", z.BlockSize
	if z.Algorithm == zfile.AlgoZSTD {
		algo = "zstd"
	}
	if block == 0 {
		block = 4096
	}
	return fmt.Sprintf("obd convert layer\nrevision %d\nlibext2fs %s\nfs %s\nzfile %s block=%d crc=%t\nformat %s\n",
		layerRevision, ext4.LibraryVersion(), fsys, algo, block, !z.NoVerify, image.FormatVersion)
}

// layerKey is the DB key of the layer whose source chain ID is chain.
func layerKey(prefix string, chain digest.Digest) []byte {
	return []byte(digest.FromString(prefix + "chain " + chain.String() + "\n").Encoded())
}

// hit is a layer found in the DB.
type hit struct {
	layer layerRecord
	blob  blobRecord
}

// lookup finds the layers of keys; missing ones are nil.
func (db *DB) lookup(keys [][]byte) ([]*hit, error) {
	hits := make([]*hit, len(keys))
	err := db.update(func(tx *bolt.Tx) error {
		layers, blobs := tx.Bucket(bucketLayers), tx.Bucket(bucketBlobs)
		for i, k := range keys {
			var h hit
			if getJSON(layers, k, &h.layer) && h.layer.Blob.Validate() == nil && getJSON(blobs, []byte(h.layer.Blob), &h.blob) {
				hits[i] = &h
			}
		}
		return nil
	})
	return hits, err
}

// take links (or copies) the locally stored blob d to dst and checks its digest. It fails when the store no longer
// holds a good copy, and then forgets the local copy.
func (db *DB) take(d digest.Digest, size int64, dst string) error {
	var src *os.File
	err := db.update(func(tx *bolt.Tx) error {
		blobs := tx.Bucket(bucketBlobs)
		var rec blobRecord
		if !getJSON(blobs, []byte(d), &rec) || !rec.Local {
			return fmt.Errorf("blob %s is not in the local store", d)
		}
		err := os.Link(db.blobPath(d), dst)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			// Another filesystem: copy from an open file, outside the transaction (a trim may unlink the name).
			src, err = os.Open(db.blobPath(d))
		}
		if errors.Is(err, fs.ErrNotExist) {
			rec.Local = false
			return errors.Join(fmt.Errorf("blob %s is missing from the local store", d), putJSON(blobs, []byte(d), rec))
		}
		if err != nil {
			return err
		}
		rec.LastUsed = time.Now()
		return putJSON(blobs, []byte(d), rec)
	})
	if err != nil {
		return err
	}
	if src != nil {
		defer src.Close()
		err = copyFile(dst, src)
	}
	if err == nil {
		err = checkFile(dst, d, size)
	}
	if err != nil {
		os.Remove(dst)
		db.dropLocal(d)
		return err
	}
	return nil
}

// dropLocal removes a bad or unusable local copy of d.
func (db *DB) dropLocal(d digest.Digest) {
	_ = db.update(func(tx *bolt.Tx) error {
		blobs := tx.Bucket(bucketBlobs)
		var rec blobRecord
		if getJSON(blobs, []byte(d), &rec) {
			rec.Local = false
			os.Remove(db.blobPath(d))
			return putJSON(blobs, []byte(d), rec)
		}
		return nil
	})
}

// checkFile verifies that the file at path has the digest d and size bytes.
func checkFile(path string, d digest.Digest, size int64) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return err
	}
	if got := digest.NewDigest(digest.SHA256, h); got != d || n != size {
		return fmt.Errorf("stored blob %s has %d bytes with digest %s (damaged): converting the layer again", d, n, got)
	}
	return nil
}

func copyFile(dst string, src *os.File) error {
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(out, src)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

// add records a converted layer and keeps its blob (the file at path) in the local store when the store has room
// for any blob at all.
func (db *DB) add(key []byte, rec layerRecord, path string) error {
	var tmp string
	if db.maxSize > 0 && path != "" {
		f, err := os.CreateTemp(filepath.Join(db.store, "sha256"), ".tmp-")
		if err != nil {
			return err
		}
		tmp = f.Name()
		f.Close()
		os.Remove(tmp)
		if err := os.Link(path, tmp); err != nil {
			src, err := os.Open(path)
			if err != nil {
				return err
			}
			err = copyFile(tmp, src)
			src.Close()
			if err != nil {
				os.Remove(tmp)
				return err
			}
		}
		defer os.Remove(tmp) // a no-op once renamed
	}
	return db.update(func(tx *bolt.Tx) error {
		blobs := tx.Bucket(bucketBlobs)
		var b blobRecord
		getJSON(blobs, []byte(rec.Blob), &b)
		b.Size, b.LastUsed = rec.Size, time.Now()
		if tmp != "" {
			if err := os.Rename(tmp, db.blobPath(rec.Blob)); err != nil {
				return err
			}
			b.Local = true
		}
		if err := putJSON(blobs, []byte(rec.Blob), b); err != nil {
			return err
		}
		return putJSON(tx.Bucket(bucketLayers), key, rec)
	})
}

// RecordPushed notes that the registry location HOST/REPO holds the blobs, so that later conversions pushing to
// that registry can reuse them even when the local store no longer has them. Blobs the DB does not know are
// ignored.
func (db *DB) RecordPushed(host, repo string, blobs []digest.Digest) error {
	loc := host + "/" + repo
	return db.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketBlobs)
		for _, d := range blobs {
			var rec blobRecord
			if !getJSON(b, []byte(d), &rec) {
				continue
			}
			rec.Repos = slices.DeleteFunc(rec.Repos, func(r string) bool { return r == loc })
			rec.Repos = append([]string{loc}, rec.Repos...)
			if len(rec.Repos) > maxRepos {
				rec.Repos = rec.Repos[:maxRepos]
			}
			if err := putJSON(b, []byte(d), rec); err != nil {
				return err
			}
		}
		return nil
	})
}

// TrimStats says what Trim did.
type TrimStats struct {
	Removed      int   // blobs removed from the local store
	RemovedBytes int64 // their bytes
	Kept         int   // blobs left in the local store
	KeptBytes    int64 // their bytes
}

// Trim removes the least recently used blobs from the local store until it holds at most the DB's maximum size,
// forgets layers whose blob is neither stored nor known to be in a registry, and removes stray store files.
func (db *DB) Trim() (TrimStats, error) {
	var st TrimStats
	err := db.update(func(tx *bolt.Tx) error {
		blobs, layers := tx.Bucket(bucketBlobs), tx.Bucket(bucketLayers)
		type local struct {
			d   digest.Digest
			rec blobRecord
		}
		var locals []local
		known := map[string]bool{}
		err := blobs.ForEach(func(k, v []byte) error {
			var rec blobRecord
			if json.Unmarshal(v, &rec) != nil {
				return nil
			}
			d := digest.Digest(k)
			if rec.Local && d.Validate() == nil {
				locals = append(locals, local{d, rec})
				known[d.Encoded()] = true
				st.KeptBytes += rec.Size
			}
			return nil
		})
		if err != nil {
			return err
		}
		sort.Slice(locals, func(i, j int) bool { return locals[i].rec.LastUsed.Before(locals[j].rec.LastUsed) })
		var gone [][]byte
		for _, l := range locals {
			if st.KeptBytes <= db.maxSize {
				st.Kept++
				continue
			}
			if err := os.Remove(db.blobPath(l.d)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			delete(known, l.d.Encoded())
			st.KeptBytes -= l.rec.Size
			st.Removed++
			st.RemovedBytes += l.rec.Size
			l.rec.Local = false
			if len(l.rec.Repos) == 0 {
				gone = append(gone, []byte(l.d))
				if err := blobs.Delete([]byte(l.d)); err != nil {
					return err
				}
				continue
			}
			if err := putJSON(blobs, []byte(l.d), l.rec); err != nil {
				return err
			}
		}
		// Layers whose blob is gone everywhere cannot be reused any more.
		if err := blobs.ForEach(func(k, v []byte) error {
			var rec blobRecord
			if json.Unmarshal(v, &rec) == nil && !rec.Local && len(rec.Repos) == 0 {
				gone = append(gone, slices.Clone(k))
			}
			return nil
		}); err != nil {
			return err
		}
		for _, k := range gone {
			if err := blobs.Delete(k); err != nil {
				return err
			}
		}
		if len(gone) > 0 {
			isGone := map[digest.Digest]bool{}
			for _, k := range gone {
				isGone[digest.Digest(k)] = true
			}
			var dead [][]byte
			if err := layers.ForEach(func(k, v []byte) error {
				var rec layerRecord
				if json.Unmarshal(v, &rec) != nil || isGone[rec.Blob] {
					dead = append(dead, slices.Clone(k))
				}
				return nil
			}); err != nil {
				return err
			}
			for _, k := range dead {
				if err := layers.Delete(k); err != nil {
					return err
				}
			}
		}
		// Files the database does not list: left by a crash, or stored by a conversion that has not recorded them yet.
		ents, err := os.ReadDir(filepath.Join(db.store, "sha256"))
		if err != nil {
			return err
		}
		for _, e := range ents {
			if known[e.Name()] {
				continue
			}
			if info, err := e.Info(); err == nil && time.Since(info.ModTime()) > orphanAge {
				os.Remove(filepath.Join(db.store, "sha256", e.Name()))
			}
		}
		return nil
	})
	return st, err
}
