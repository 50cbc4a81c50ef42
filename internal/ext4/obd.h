// Small C layer between the Go package and libext2fs: an io_manager whose
// callbacks go to a Go Device, and helpers that do the inode, directory and
// extent bookkeeping for one filesystem operation per cgo call.

#ifndef OBD_EXT4_H
#define OBD_EXT4_H

#include <stdint.h>
#include <stdlib.h>
#include <ext2fs/ext2fs.h>

// Inode metadata as set by the Go side. mode holds the permission bits on
// writes and the full st_mode on reads.
typedef struct {
	uint32_t mode;
	uint32_t uid, gid;
	int64_t atime, mtime, ctime, crtime;
	uint32_t atime_ns, mtime_ns, ctime_ns, crtime_ns;
} obd_meta;

typedef struct {
	obd_meta meta;
	uint32_t nlink;
	uint32_t flags;
	uint64_t size;
	uint64_t blocks; // 512-byte units
	uint32_t rdev_major, rdev_minor;
} obd_stat;

// Open state of a regular file being written (opaque to Go).
typedef struct obd_wfile obd_wfile;

void obd_init(void);
const char *obd_strerror(errcode_t err);

errcode_t obd_fs_open(uintptr_t handle, int writable, ext2_filsys *ret);
errcode_t obd_fs_close(ext2_filsys fs);

errcode_t obd_stat_ino(ext2_filsys fs, ext2_ino_t ino, obd_stat *st);
errcode_t obd_set_meta(ext2_filsys fs, ext2_ino_t ino, const obd_meta *m);
errcode_t obd_nlink_add(ext2_filsys fs, ext2_ino_t ino, int delta,
			uint32_t *nlink);
errcode_t obd_release(ext2_filsys fs, ext2_ino_t ino);

errcode_t obd_mkdir(ext2_filsys fs, ext2_ino_t parent, const obd_meta *m,
		    ext2_ino_t *ret);
errcode_t obd_mknod(ext2_filsys fs, ext2_ino_t parent, uint32_t type,
		    const obd_meta *m, uint32_t major, uint32_t minor,
		    ext2_ino_t *ret);
errcode_t obd_symlink(ext2_filsys fs, ext2_ino_t parent, const obd_meta *m,
		      const char *target, size_t len, ext2_ino_t *ret);
errcode_t obd_readlink(ext2_filsys fs, ext2_ino_t ino, char *buf,
		       size_t bufsize, size_t *len);

errcode_t obd_wfile_new(ext2_filsys fs, ext2_ino_t parent, const obd_meta *m,
			obd_wfile **ret, ext2_ino_t *ino);
errcode_t obd_wfile_alloc(obd_wfile *f, uint64_t lblk, uint64_t count,
			  uint64_t *segs, int maxsegs, int *nsegs);
errcode_t obd_wfile_finish(obd_wfile *f, uint64_t size);
void obd_wfile_abort(obd_wfile *f);

errcode_t obd_dir_list(ext2_filsys fs, ext2_ino_t dir, char **buf,
		       size_t *len, int *indexed);
errcode_t obd_dir_add(ext2_filsys fs, ext2_ino_t dir, const char *name,
		      int namelen, ext2_ino_t ino, int ftype, uint32_t *lblk);
errcode_t obd_dir_del(ext2_filsys fs, ext2_ino_t dir, const char *name,
		      int namelen, uint32_t lblk);

errcode_t obd_xattr_set(ext2_filsys fs, ext2_ino_t ino, const char *name,
			const void *value, size_t len);
errcode_t obd_xattr_get(ext2_filsys fs, ext2_ino_t ino, const char *name,
			void **value, size_t *len);
errcode_t obd_xattr_list(ext2_filsys fs, ext2_ino_t ino, char **buf,
			 size_t *len);
errcode_t obd_xattr_remove(ext2_filsys fs, ext2_ino_t ino, const char *name);

#define OBD_NO_LBLK 0xffffffffu

#endif
