package ext4

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
)

// MkfsOptions are the parameters of Mkfs. Equal options on equally sized
// devices give identical filesystems.
type MkfsOptions struct {
	// UUID of the filesystem; empty derives one from the other options
	// and the device size.
	UUID string
	// HashSeed is the directory hash seed (a UUID); empty uses UUID.
	HashSeed string
	// Timestamp (Unix seconds) is used for every time mke2fs records.
	// e2fsprogs reads 0 as "now", so 0 means 1.
	Timestamp int64
	// Label is the volume label (at most 16 bytes).
	Label string
	// InodeRatio is the number of bytes per inode; 0 means 16384.
	InodeRatio int
	// InodeSize is the inode size in bytes; 0 means 256.
	InodeSize int
	// Mke2fs is the mke2fs program; empty looks it up in PATH and in
	// /sbin and /usr/sbin.
	Mke2fs string
	// TempDir holds the sparse scratch image; empty means os.TempDir().
	// It must allow files as large as the device (sparse).
	TempDir string
}

// mke2fsConf pins every default mke2fs would otherwise take from the
// system's mke2fs.conf. No journal: images are mounted read-only.
//
// resize_inode reserves group descriptor blocks after the primary ones
// (1,024 on a 64 GiB disk, as on upstream's base layer), which puts the
// block and inode bitmaps and the inode tables after block 1,032: the
// first 128 KiB hold only the superblock and the group descriptors.
// Upstream's userspace overlaybd-apply caches aligned 4 KiB writes in
// 128 KiB blocks and writes the superblock and the descriptors directly;
// with bitmaps in blocks 9-40 (no resize_inode), it later wrote a stale
// cached copy of the first 128 KiB over the superblock and descriptors it
// had just written, and e2fsck found wrong group counts and checksums.
const mke2fsConf = `[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	lazy_itable_init = true

[fs_types]
	ext4 = {
		features = ^has_journal
	}
`

var uuidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

const mkfsBlockSize = 4096

// Mkfs writes a new, empty ext4 filesystem (4 KiB blocks, no journal) to
// dev. The device must read as zeros where it was never written: inode
// tables are not zeroed, only metadata blocks are written. mke2fs builds
// the filesystem on a sparse scratch file whose data is then copied.
func Mkfs(ctx context.Context, dev Device, opts MkfsOptions) error {
	size := dev.Size() / mkfsBlockSize * mkfsBlockSize
	if size <= 0 {
		return fmt.Errorf("mkfs: device too small (%d bytes)", dev.Size())
	}
	inodeSize, ratio := opts.InodeSize, opts.InodeRatio
	if inodeSize == 0 {
		inodeSize = 256
	}
	if ratio == 0 {
		ratio = 16384
	}
	ts := opts.Timestamp
	if ts <= 0 {
		ts = 1
	}
	if len(opts.Label) > 16 {
		return fmt.Errorf("mkfs: label %q longer than 16 bytes", opts.Label)
	}
	uuid := opts.UUID
	if uuid == "" {
		sum := sha256.Sum256(fmt.Appendf(nil, "obd-ext4\x00%d\x00%d\x00%s\x00%d\x00%d\x00%s",
			size, ts, opts.Label, inodeSize, ratio, opts.HashSeed))
		sum[6] = sum[6]&0x0f | 0x50 // version 5 style, RFC 4122 variant
		sum[8] = sum[8]&0x3f | 0x80
		uuid = fmt.Sprintf("%x-%x-%x-%x-%x", sum[0:4], sum[4:6], sum[6:8], sum[8:10], sum[10:16])
	}
	seed := opts.HashSeed
	if seed == "" {
		seed = uuid
	}
	for _, u := range []string{uuid, seed} {
		if !uuidRE.MatchString(u) {
			return fmt.Errorf("mkfs: %q is not a UUID", u)
		}
	}
	prog, err := findMke2fs(opts.Mke2fs)
	if err != nil {
		return err
	}

	dir, err := os.MkdirTemp(opts.TempDir, "obd-mkfs-")
	if err != nil {
		return fmt.Errorf("mkfs: %w", err)
	}
	defer os.RemoveAll(dir)
	conf := filepath.Join(dir, "mke2fs.conf")
	if err := os.WriteFile(conf, []byte(mke2fsConf), 0o600); err != nil {
		return fmt.Errorf("mkfs: %w", err)
	}
	img := filepath.Join(dir, "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		return fmt.Errorf("mkfs: %w", err)
	}
	if err := os.Truncate(img, size); err != nil {
		return fmt.Errorf("mkfs: sparse scratch image: %w", err)
	}
	args := []string{"-q", "-F", "-t", "ext4", "-b", strconv.Itoa(mkfsBlockSize),
		"-I", strconv.Itoa(inodeSize), "-i", strconv.Itoa(ratio), "-m", "0",
		"-U", uuid,
		"-E", "hash_seed=" + seed + ",root_owner=0:0,lazy_itable_init=1,assume_storage_prezeroed=1,nodiscard",
	}
	if opts.Label != "" {
		args = append(args, "-L", opts.Label)
	}
	args = append(args, img)
	cmd := exec.CommandContext(ctx, prog, args...)
	cmd.Env = []string{
		"MKE2FS_CONFIG=" + conf,
		"E2FSPROGS_FAKE_TIME=" + strconv.FormatInt(ts, 10),
		"LC_ALL=C",
		"PATH=" + os.Getenv("PATH"),
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs: %s: %w: %s", prog, err, strings.TrimSpace(string(out)))
	}
	return copyData(img, dev)
}

func findMke2fs(prog string) (string, error) {
	if prog != "" {
		return prog, nil
	}
	if p, err := exec.LookPath("mke2fs"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/sbin/mke2fs", "/usr/sbin/mke2fs"} {
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			return p, nil
		}
	}
	return "", errors.New("mkfs: mke2fs (e2fsprogs) not found")
}

// lseek whence values for sparse files (Linux).
const (
	seekData = 3
	seekHole = 4
)

// copyData copies the non-zero blocks of the sparse file img to dev.
func copyData(img string, dev Device) error {
	f, err := os.Open(img)
	if err != nil {
		return fmt.Errorf("mkfs: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("mkfs: %w", err)
	}
	size := fi.Size()
	buf := make([]byte, 1<<20)
	zero := make([]byte, mkfsBlockSize)
	for off := int64(0); off < size; {
		start, err := f.Seek(off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			break
		}
		end := size
		if errors.Is(err, syscall.EINVAL) {
			start = off // no SEEK_DATA support: copy all, skipping zeros
		} else if err != nil {
			return fmt.Errorf("mkfs: seek scratch image: %w", err)
		} else if end, err = f.Seek(start, seekHole); err != nil {
			return fmt.Errorf("mkfs: seek scratch image: %w", err)
		}
		start = start / mkfsBlockSize * mkfsBlockSize
		for start < end {
			n := min(int64(len(buf)), end-start)
			if _, err := f.ReadAt(buf[:n], start); err != nil && err != io.EOF {
				return fmt.Errorf("mkfs: read scratch image: %w", err)
			}
			// Write runs of non-zero blocks; zero blocks already read as zero.
			for i := int64(0); i < n; {
				j := i
				for j < n && !bytes.Equal(buf[j:min(j+mkfsBlockSize, n)], zero[:min(mkfsBlockSize, n-j)]) {
					j += mkfsBlockSize
				}
				if j > i {
					if _, err := dev.WriteAt(buf[i:min(j, n)], start+i); err != nil {
						return fmt.Errorf("mkfs: write device: %w", err)
					}
				}
				i = j + mkfsBlockSize
			}
			start += n
		}
		off = end
	}
	return nil
}
