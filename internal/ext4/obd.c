// See obd.h. Every function returns a libext2fs errcode_t (0 on success);
// errno values are valid errcode_t values too.

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <et/com_err.h>
#include <ext2fs/ext2_err.h>

#include "obd.h"
#include <ext2fs/ext3_extents.h>
#include "_cgo_export.h"

/* ---------- io_manager: block I/O goes to the Go Device ---------- */

struct obd_priv {
	uintptr_t handle;
	struct struct_io_stats stats;
};

static struct struct_io_manager obd_io_manager_struct;

static errcode_t obd_io_open(const char *name, int flags, io_channel *channel)
{
	io_channel io;
	struct obd_priv *priv;
	char *end;
	unsigned long long h;

	(void)flags;
	if (!name || strncmp(name, "obd:", 4) != 0)
		return EXT2_ET_BAD_DEVICE_NAME;
	h = strtoull(name + 4, &end, 10);
	if (*end != '\0' || end == name + 4)
		return EXT2_ET_BAD_DEVICE_NAME;
	io = calloc(1, sizeof(*io));
	priv = calloc(1, sizeof(*priv));
	if (io)
		io->name = strdup(name);
	if (!io || !priv || !io->name) {
		if (io)
			free(io->name);
		free(io);
		free(priv);
		return EXT2_ET_NO_MEMORY;
	}
	io->magic = EXT2_ET_MAGIC_IO_CHANNEL;
	io->manager = &obd_io_manager_struct;
	io->block_size = 1024;
	io->refcount = 1;
	io->private_data = priv;
	priv->handle = (uintptr_t)h;
	priv->stats.num_fields = 2;
	*channel = io;
	return 0;
}

static errcode_t obd_io_close(io_channel io)
{
	if (--io->refcount > 0)
		return 0;
	free(io->private_data);
	free(io->name);
	free(io);
	return 0;
}

static errcode_t obd_io_set_blksize(io_channel io, int blksize)
{
	if (blksize <= 0)
		return EXT2_ET_INVALID_ARGUMENT;
	io->block_size = blksize;
	return 0;
}

static int64_t io_size(io_channel io, int count)
{
	return count < 0 ? -(int64_t)count : (int64_t)count * io->block_size;
}

static errcode_t obd_io_read64(io_channel io, unsigned long long block,
			       int count, void *data)
{
	struct obd_priv *p = io->private_data;
	int64_t n = io_size(io, count);

	if (obdGoRead(p->handle, block * io->block_size, data, n))
		return EXT2_ET_SHORT_READ;
	p->stats.bytes_read += n;
	return 0;
}

static errcode_t obd_io_read(io_channel io, unsigned long block, int count,
			     void *data)
{
	return obd_io_read64(io, block, count, data);
}

static errcode_t write_at(io_channel io, uint64_t off, int64_t n,
			  const void *data)
{
	struct obd_priv *p = io->private_data;

	if (obdGoWrite(p->handle, off, (void *)data, n))
		return EXT2_ET_SHORT_WRITE;
	p->stats.bytes_written += n;
	return 0;
}

static errcode_t obd_io_write64(io_channel io, unsigned long long block,
				int count, const void *data)
{
	return write_at(io, block * io->block_size, io_size(io, count), data);
}

static errcode_t obd_io_write(io_channel io, unsigned long block, int count,
			      const void *data)
{
	return obd_io_write64(io, block, count, data);
}

static errcode_t obd_io_write_byte(io_channel io, unsigned long offset,
				   int count, const void *data)
{
	if (count < 0)
		return EXT2_ET_INVALID_ARGUMENT;
	return write_at(io, offset, count, data);
}

static errcode_t obd_io_flush(io_channel io)
{
	struct obd_priv *p = io->private_data;

	return obdGoFlush(p->handle) ? EXT2_ET_SHORT_WRITE : 0;
}

static errcode_t obd_io_set_option(io_channel io, const char *option,
				   const char *arg)
{
	(void)io;
	(void)option;
	(void)arg;
	return EXT2_ET_INVALID_ARGUMENT;
}

static errcode_t obd_io_get_stats(io_channel io, io_stats *stats)
{
	struct obd_priv *p = io->private_data;

	if (stats)
		*stats = &p->stats;
	return 0;
}

static errcode_t obd_io_discard(io_channel io, unsigned long long block,
				unsigned long long count)
{
	struct obd_priv *p = io->private_data;

	switch (obdGoDiscard(p->handle, block * io->block_size,
			     count * io->block_size)) {
	case 0:
		return 0;
	case 1:
		return EXT2_ET_UNIMPLEMENTED;
	default:
		return EXT2_ET_SHORT_WRITE;
	}
}

static errcode_t obd_io_zeroout(io_channel io, unsigned long long block,
				unsigned long long count)
{
	struct obd_priv *p = io->private_data;

	if (obdGoZeroout(p->handle, block * io->block_size,
			 count * io->block_size))
		return EXT2_ET_SHORT_WRITE;
	return 0;
}

static struct struct_io_manager obd_io_manager_struct = {
	.magic = EXT2_ET_MAGIC_IO_MANAGER,
	.name = "obd Go device",
	.open = obd_io_open,
	.close = obd_io_close,
	.set_blksize = obd_io_set_blksize,
	.read_blk = obd_io_read,
	.write_blk = obd_io_write,
	.flush = obd_io_flush,
	.write_byte = obd_io_write_byte,
	.set_option = obd_io_set_option,
	.get_stats = obd_io_get_stats,
	.read_blk64 = obd_io_read64,
	.write_blk64 = obd_io_write64,
	.discard = obd_io_discard,
	.zeroout = obd_io_zeroout,
};

void obd_init(void)
{
	initialize_ext2_error_table();
}

const char *obd_strerror(errcode_t err)
{
	return error_message(err);
}

/* ---------- filesystem ---------- */

// meta_goal is where directory, long symlink, extent tree and extended
// attribute blocks are allocated from: the first block of the last flex
// group, away from file data, which is allocated near its inode from the
// start of the disk. A committed layer holds its blocks in disk order, so a
// layer's metadata then lies together in its file and compresses together:
// a node fetches all of it in a few ranges (a 25,700-file image: 0.7 MiB
// in 7 ranges instead of 23.8 MiB of ZFile blocks shared with file data). It
// falls back to the next free block when the zone is full.
static blk64_t meta_goal(ext2_filsys fs)
{
	dgrp_t flex = 1, g = 0;

	if (ext2fs_has_feature_flex_bg(fs->super) &&
	    fs->super->s_log_groups_per_flex < 31)
		flex = (dgrp_t)1 << fs->super->s_log_groups_per_flex;
	if (fs->group_desc_count > flex)
		g = (fs->group_desc_count - 1) / flex * flex;
	return ext2fs_group_first_block2(fs, g);
}

// alloc_meta is libext2fs's block allocator for the blocks it allocates
// itself (directory growth, extent tree nodes, xattr blocks).
static errcode_t alloc_meta(ext2_filsys fs, blk64_t goal, blk64_t *ret)
{
	(void)goal;
	return ext2fs_new_block2(fs, meta_goal(fs), NULL, ret);
}

errcode_t obd_fs_open(uintptr_t handle, int writable, ext2_filsys *ret)
{
	char name[32];
	ext2_filsys fs = NULL;
	errcode_t err;
	int flags = EXT2_FLAG_64BITS;

	if (writable)
		flags |= EXT2_FLAG_RW;
	snprintf(name, sizeof(name), "obd:%llu", (unsigned long long)handle);
	err = ext2fs_open2(name, NULL, flags, 0, 0, &obd_io_manager_struct,
			   &fs);
	if (err)
		return err;
	if (writable) {
		// Block allocation below assumes one block per cluster and
		// extent-mapped files; a dirty journal would be replayed over
		// our changes by the kernel.
		if (ext2fs_has_feature_bigalloc(fs->super) ||
		    !ext2fs_has_feature_extents(fs->super))
			err = EXT2_ET_UNSUPP_FEATURE;
		else if (ext2fs_has_feature_journal_needs_recovery(fs->super))
			err = EXT2_ET_JOURNAL_UNSUPP_VERSION;
		else
			err = ext2fs_read_bitmaps(fs);
		if (err) {
			ext2fs_free(fs);
			return err;
		}
		ext2fs_set_alloc_block_callback(fs, alloc_meta, NULL);
	}
	// Every time libext2fs stamps on its own (superblock write time,
	// deletion times) is the time of the last write, so that the same
	// edits give the same bytes.
	fs->now = fs->super->s_wtime ? fs->super->s_wtime
				     : fs->super->s_mkfs_time;
	if (!fs->now)
		fs->now = 1;
	*ret = fs;
	return 0;
}

errcode_t obd_fs_close(ext2_filsys fs)
{
	return ext2fs_close_free(&fs);
}

/* ---------- inodes ---------- */

#define HAS_EXTRA(fs, in, field)                                          \
	(EXT2_INODE_SIZE((fs)->super) > EXT2_GOOD_OLD_INODE_SIZE &&          \
	 (in)->i_extra_isize >= offsetof(struct ext2_inode_large, field) +   \
					sizeof((in)->field) -                \
					EXT2_GOOD_OLD_INODE_SIZE)

static void enc_time(__u32 *lo, __u32 *extra, int64_t sec, uint32_t nsec)
{
	*lo = (__u32)(uint64_t)sec;
	if (extra)
		*extra = (nsec << EXT4_EPOCH_BITS) |
			 (__u32)(((sec - (int64_t)(int32_t)sec) >> 32) &
				 EXT4_EPOCH_MASK);
}

static void dec_time(__u32 lo, const __u32 *extra, int64_t *sec,
		     uint32_t *nsec)
{
	*sec = (int32_t)lo;
	*nsec = 0;
	if (extra) {
		*sec += (int64_t)(*extra & EXT4_EPOCH_MASK) << 32;
		*nsec = *extra >> EXT4_EPOCH_BITS;
	}
}

static void put_meta(ext2_filsys fs, struct ext2_inode_large *in,
		     const obd_meta *m, int crtime)
{
	in->i_mode = (in->i_mode & LINUX_S_IFMT) | (m->mode & 07777);
	in->i_uid = m->uid & 0xffff;
	ext2fs_set_i_uid_high(*in, m->uid >> 16);
	in->i_gid = m->gid & 0xffff;
	ext2fs_set_i_gid_high(*in, m->gid >> 16);
	enc_time(&in->i_atime,
		 HAS_EXTRA(fs, in, i_atime_extra) ? &in->i_atime_extra : NULL,
		 m->atime, m->atime_ns);
	enc_time(&in->i_mtime,
		 HAS_EXTRA(fs, in, i_mtime_extra) ? &in->i_mtime_extra : NULL,
		 m->mtime, m->mtime_ns);
	enc_time(&in->i_ctime,
		 HAS_EXTRA(fs, in, i_ctime_extra) ? &in->i_ctime_extra : NULL,
		 m->ctime, m->ctime_ns);
	if (crtime && HAS_EXTRA(fs, in, i_crtime_extra))
		enc_time(&in->i_crtime, &in->i_crtime_extra, m->crtime,
			 m->crtime_ns);
}

static errcode_t read_large(ext2_filsys fs, ext2_ino_t ino,
			    struct ext2_inode_large *in)
{
	memset(in, 0, sizeof(*in));
	return ext2fs_read_inode_full(fs, ino, (struct ext2_inode *)in,
				      sizeof(*in));
}

static errcode_t write_large(ext2_filsys fs, ext2_ino_t ino,
			     struct ext2_inode_large *in)
{
	size_t n = sizeof(*in);

	if (n > EXT2_INODE_SIZE(fs->super))
		n = EXT2_INODE_SIZE(fs->super);
	return ext2fs_write_inode_full(fs, ino, (struct ext2_inode *)in, n);
}

errcode_t obd_stat_ino(ext2_filsys fs, ext2_ino_t ino, obd_stat *st)
{
	struct ext2_inode_large in;
	errcode_t err;

	err = read_large(fs, ino, &in);
	if (err)
		return err;
	memset(st, 0, sizeof(*st));
	st->meta.mode = in.i_mode;
	st->meta.uid = inode_uid(in);
	st->meta.gid = inode_gid(in);
	dec_time(in.i_atime,
		 HAS_EXTRA(fs, &in, i_atime_extra) ? &in.i_atime_extra : NULL,
		 &st->meta.atime, &st->meta.atime_ns);
	dec_time(in.i_mtime,
		 HAS_EXTRA(fs, &in, i_mtime_extra) ? &in.i_mtime_extra : NULL,
		 &st->meta.mtime, &st->meta.mtime_ns);
	dec_time(in.i_ctime,
		 HAS_EXTRA(fs, &in, i_ctime_extra) ? &in.i_ctime_extra : NULL,
		 &st->meta.ctime, &st->meta.ctime_ns);
	if (HAS_EXTRA(fs, &in, i_crtime_extra))
		dec_time(in.i_crtime, &in.i_crtime_extra, &st->meta.crtime,
			 &st->meta.crtime_ns);
	st->nlink = in.i_links_count;
	st->flags = in.i_flags;
	st->size = EXT2_I_SIZE(&in);
	st->blocks = ext2fs_get_stat_i_blocks(fs, (struct ext2_inode *)&in);
	if (LINUX_S_ISCHR(in.i_mode) || LINUX_S_ISBLK(in.i_mode)) {
		if (in.i_block[0]) {
			st->rdev_major = (in.i_block[0] >> 8) & 0xff;
			st->rdev_minor = in.i_block[0] & 0xff;
		} else {
			__u32 d = in.i_block[1];
			st->rdev_major = (d & 0xfff00) >> 8;
			st->rdev_minor = (d & 0xff) | ((d >> 12) & 0xfff00);
		}
	}
	return 0;
}

errcode_t obd_set_meta(ext2_filsys fs, ext2_ino_t ino, const obd_meta *m)
{
	struct ext2_inode_large in;
	errcode_t err;

	err = read_large(fs, ino, &in);
	if (err)
		return err;
	put_meta(fs, &in, m, 0);
	return write_large(fs, ino, &in);
}

errcode_t obd_nlink_add(ext2_filsys fs, ext2_ino_t ino, int delta,
			uint32_t *nlink)
{
	struct ext2_inode in;
	errcode_t err;
	unsigned int n;

	err = ext2fs_read_inode(fs, ino, &in);
	if (err)
		return err;
	n = in.i_links_count;
	if (LINUX_S_ISDIR(in.i_mode)) {
		// A directory link count of 1 means "more than EXT2_LINK_MAX"
		// (dir_nlink) and stays so.
		if (n != 1) {
			n += delta;
			if (n > EXT2_LINK_MAX)
				n = 1;
			if (n < 2)
				n = 2;
		}
	} else {
		if (delta > 0 && n + delta > EXT2_LINK_MAX)
			return EMLINK;
		n = delta < 0 && (unsigned int)-delta > n ? 0 : n + delta;
	}
	in.i_links_count = n;
	err = ext2fs_write_inode(fs, ino, &in);
	if (err)
		return err;
	*nlink = n;
	return 0;
}

static int free_block_cb(ext2_filsys fs, blk64_t *blocknr,
			 e2_blkcnt_t blockcnt, blk64_t ref_blk, int ref_offset,
			 void *priv)
{
	(void)blockcnt;
	(void)ref_blk;
	(void)ref_offset;
	(void)priv;
	ext2fs_block_alloc_stats2(fs, *blocknr, -1);
	return 0;
}

errcode_t obd_release(ext2_filsys fs, ext2_ino_t ino)
{
	struct ext2_inode_large in;
	errcode_t err;

	err = read_large(fs, ino, &in);
	if (err)
		return err;
	in.i_links_count = 0;
	err = write_large(fs, ino, &in);
	if (err)
		return err;
	if (in.i_file_acl) {
		err = ext2fs_free_ext_attr(fs, ino, &in);
		if (err)
			return err;
	}
	if (ext2fs_inode_has_valid_blocks2(fs, (struct ext2_inode *)&in)) {
		// Not ext2fs_punch: in 1.47.0 it refuses to free the last
		// block of the filesystem.
		err = ext2fs_block_iterate3(fs, ino, BLOCK_FLAG_READ_ONLY, NULL,
					    free_block_cb, NULL);
		if (err)
			return err;
		err = read_large(fs, ino, &in);
		if (err)
			return err;
		memset(in.i_block, 0, sizeof(in.i_block));
		in.i_flags &= ~EXT4_EXTENTS_FL;
		ext2fs_iblk_set(fs, (struct ext2_inode *)&in, 0);
		in.i_size = in.i_size_high = 0;
	}
	in.i_dtime = fs->now;
	err = write_large(fs, ino, &in);
	if (err)
		return err;
	ext2fs_inode_alloc_stats2(fs, ino, -1, LINUX_S_ISDIR(in.i_mode));
	return 0;
}

// new_inode allocates an inode near parent and fills *in (not yet written).
static errcode_t new_inode(ext2_filsys fs, ext2_ino_t parent, uint32_t type,
			   const obd_meta *m, struct ext2_inode_large *in,
			   ext2_ino_t *ret)
{
	errcode_t err;
	ext2_ino_t ino;

	err = ext2fs_new_inode(fs, parent, type | 0700, NULL, &ino);
	if (err)
		return err;
	memset(in, 0, sizeof(*in));
	if (EXT2_INODE_SIZE(fs->super) > EXT2_GOOD_OLD_INODE_SIZE)
		in->i_extra_isize =
		    sizeof(*in) - EXT2_GOOD_OLD_INODE_SIZE;
	in->i_mode = type & LINUX_S_IFMT;
	put_meta(fs, in, m, 1);
	in->i_links_count = 1;
	ext2fs_inode_alloc_stats2(fs, ino, +1, LINUX_S_ISDIR(type));
	*ret = ino;
	return 0;
}

static void undo_inode(ext2_filsys fs, ext2_ino_t ino, uint32_t type)
{
	ext2fs_inode_alloc_stats2(fs, ino, -1, LINUX_S_ISDIR(type));
}

// write_new writes a freshly allocated inode, zeroing whatever the on-disk
// slot held (the extra space may hold stale in-inode xattrs).
static errcode_t write_new(ext2_filsys fs, ext2_ino_t ino,
			   struct ext2_inode_large *in)
{
	size_t sz = EXT2_INODE_SIZE(fs->super);
	char *buf;
	errcode_t err;

	buf = calloc(1, sz > sizeof(*in) ? sz : sizeof(*in));
	if (!buf)
		return EXT2_ET_NO_MEMORY;
	memcpy(buf, in, sizeof(*in));
	err = ext2fs_write_inode_full(fs, ino, (struct ext2_inode *)buf, sz);
	free(buf);
	return err;
}

static errcode_t init_extents(ext2_filsys fs, ext2_ino_t ino,
			      struct ext2_inode_large *in)
{
	ext2_extent_handle_t h;
	errcode_t err;

	in->i_flags |= EXT4_EXTENTS_FL;
	err = ext2fs_extent_open2(fs, ino, (struct ext2_inode *)in, &h);
	if (err)
		return err;
	ext2fs_extent_free(h);
	return 0;
}

// map_one maps logical block 0 of a new inode to blk and writes the inode.
static errcode_t map_one(ext2_filsys fs, ext2_ino_t ino,
			 struct ext2_inode_large *in, blk64_t blk)
{
	ext2_extent_handle_t h;
	errcode_t err;

	err = init_extents(fs, ino, in);
	if (err)
		return err;
	ext2fs_iblk_set(fs, (struct ext2_inode *)in, 1);
	err = write_new(fs, ino, in);
	if (err)
		return err;
	err = ext2fs_extent_open2(fs, ino, (struct ext2_inode *)in, &h);
	if (err)
		return err;
	err = ext2fs_extent_set_bmap(h, 0, blk, 0);
	ext2fs_extent_free(h);
	return err;
}

errcode_t obd_mkdir(ext2_filsys fs, ext2_ino_t parent, const obd_meta *m,
		    ext2_ino_t *ret)
{
	struct ext2_inode_large in;
	ext2_ino_t ino;
	blk64_t blk;
	char *block = NULL;
	errcode_t err;
	uint32_t nlink;

	err = new_inode(fs, parent, LINUX_S_IFDIR, m, &in, &ino);
	if (err)
		return err;
	err = ext2fs_new_block2(fs, meta_goal(fs), NULL, &blk);
	if (err)
		goto undo;
	err = ext2fs_new_dir_block(fs, ino, parent, &block);
	if (err)
		goto undo;
	err = ext2fs_write_dir_block4(fs, blk, block, 0, ino);
	ext2fs_free_mem(&block);
	if (err)
		goto undo;
	ext2fs_block_alloc_stats2(fs, blk, +1);
	in.i_links_count = 2;
	in.i_size = fs->blocksize;
	err = map_one(fs, ino, &in, blk);
	if (err)
		return err;
	err = obd_nlink_add(fs, parent, +1, &nlink);
	if (err)
		return err;
	*ret = ino;
	return 0;
undo:
	undo_inode(fs, ino, LINUX_S_IFDIR);
	return err;
}

errcode_t obd_mknod(ext2_filsys fs, ext2_ino_t parent, uint32_t type,
		    const obd_meta *m, uint32_t major, uint32_t minor,
		    ext2_ino_t *ret)
{
	struct ext2_inode_large in;
	ext2_ino_t ino;
	errcode_t err;

	err = new_inode(fs, parent, type, m, &in, &ino);
	if (err)
		return err;
	if (LINUX_S_ISCHR(type) || LINUX_S_ISBLK(type)) {
		if (major < 256 && minor < 256)
			in.i_block[0] = major << 8 | minor;
		else
			in.i_block[1] = (minor & 0xff) | (major << 8) |
					((minor & ~0xffu) << 12);
	}
	err = write_new(fs, ino, &in);
	if (err) {
		undo_inode(fs, ino, type);
		return err;
	}
	*ret = ino;
	return 0;
}

errcode_t obd_symlink(ext2_filsys fs, ext2_ino_t parent, const obd_meta *m,
		      const char *target, size_t len, ext2_ino_t *ret)
{
	struct ext2_inode_large in;
	ext2_ino_t ino;
	blk64_t blk;
	char *block;
	errcode_t err;

	if (len == 0 || len >= fs->blocksize)
		return EXT2_ET_INVALID_ARGUMENT;
	err = new_inode(fs, parent, LINUX_S_IFLNK, m, &in, &ino);
	if (err)
		return err;
	in.i_size = len;
	if (len < sizeof(in.i_block)) {
		memcpy(in.i_block, target, len);
		err = write_new(fs, ino, &in);
		if (err)
			goto undo;
		*ret = ino;
		return 0;
	}
	err = ext2fs_new_block2(fs, meta_goal(fs), NULL, &blk);
	if (err)
		goto undo;
	block = calloc(1, fs->blocksize);
	if (!block) {
		err = EXT2_ET_NO_MEMORY;
		goto undo;
	}
	memcpy(block, target, len);
	err = io_channel_write_blk64(fs->io, blk, 1, block);
	free(block);
	if (err)
		goto undo;
	ext2fs_block_alloc_stats2(fs, blk, +1);
	err = map_one(fs, ino, &in, blk);
	if (err)
		return err;
	*ret = ino;
	return 0;
undo:
	undo_inode(fs, ino, LINUX_S_IFLNK);
	return err;
}

errcode_t obd_readlink(ext2_filsys fs, ext2_ino_t ino, char *buf,
		       size_t bufsize, size_t *len)
{
	struct ext2_inode_large in;
	blk64_t pblk = 0;
	char *block;
	size_t size;
	errcode_t err;

	err = read_large(fs, ino, &in);
	if (err)
		return err;
	if (!LINUX_S_ISLNK(in.i_mode))
		return EXT2_ET_INVALID_ARGUMENT;
	size = EXT2_I_SIZE(&in);
	if (size > bufsize || size > fs->blocksize)
		return EXT2_ET_INVALID_ARGUMENT;
	if (in.i_flags & EXT4_INLINE_DATA_FL) {
		size_t isz;

		err = ext2fs_inline_data_size(fs, ino, &isz);
		if (err)
			return err;
		block = malloc(isz + 1);
		if (!block)
			return EXT2_ET_NO_MEMORY;
		err = ext2fs_inline_data_get(fs, ino, (struct ext2_inode *)&in,
					     block, &isz);
		if (!err && isz < size)
			err = EXT2_ET_INLINE_DATA_CANT_ITERATE;
		if (!err)
			memcpy(buf, block, size);
		free(block);
		if (err)
			return err;
	} else if (ext2fs_is_fast_symlink((struct ext2_inode *)&in)) {
		memcpy(buf, in.i_block, size);
	} else {
		err = ext2fs_bmap2(fs, ino, (struct ext2_inode *)&in, NULL, 0,
				   0, NULL, &pblk);
		if (err)
			return err;
		if (!pblk)
			return EXT2_ET_INVALID_ARGUMENT;
		block = malloc(fs->blocksize);
		if (!block)
			return EXT2_ET_NO_MEMORY;
		err = io_channel_read_blk64(fs->io, pblk, 1, block);
		if (!err)
			memcpy(buf, block, size);
		free(block);
		if (err)
			return err;
	}
	*len = size;
	return 0;
}

/* ---------- regular file data ---------- */

struct obd_wfile {
	ext2_filsys fs;
	ext2_ino_t ino;
	struct ext2_inode_large inode;
	ext2_extent_handle_t handle;
	blk64_t goal;
};

errcode_t obd_wfile_new(ext2_filsys fs, ext2_ino_t parent, const obd_meta *m,
			obd_wfile **ret, ext2_ino_t *ino)
{
	obd_wfile *f;
	errcode_t err;

	f = calloc(1, sizeof(*f));
	if (!f)
		return EXT2_ET_NO_MEMORY;
	f->fs = fs;
	err = new_inode(fs, parent, LINUX_S_IFREG, m, &f->inode, &f->ino);
	if (err)
		goto out;
	err = init_extents(fs, f->ino, &f->inode);
	if (!err)
		err = write_new(fs, f->ino, &f->inode);
	if (!err)
		err = ext2fs_extent_open2(fs, f->ino,
					  (struct ext2_inode *)&f->inode,
					  &f->handle);
	if (err) {
		undo_inode(fs, f->ino, LINUX_S_IFREG);
		goto out;
	}
	f->goal = ext2fs_find_inode_goal(fs, f->ino,
					 (struct ext2_inode *)&f->inode, 0);
	*ret = f;
	*ino = f->ino;
	return 0;
out:
	free(f);
	return err;
}

// append_extent maps [lblk, lblk+len) to [pblk, pblk+len) after the last
// extent of the file, merging with it when contiguous.
static errcode_t append_extent(obd_wfile *f, blk64_t lblk, blk64_t pblk,
			       __u32 len)
{
	struct ext2_extent_info info;
	struct ext2fs_extent ex, last;
	errcode_t err;

	ex.e_lblk = lblk;
	ex.e_pblk = pblk;
	ex.e_len = len;
	ex.e_flags = 0;
	err = ext2fs_extent_get_info(f->handle, &info);
	if (err)
		return err;
	if (info.max_depth == 0 && info.num_entries == 0)
		return ext2fs_extent_insert(f->handle, 0, &ex);
	err = ext2fs_extent_get(f->handle, EXT2_EXTENT_LAST_LEAF, &last);
	if (err)
		return err;
	if (last.e_lblk + last.e_len > lblk)
		return EXT2_ET_INVALID_ARGUMENT;
	if (!(last.e_flags & EXT2_EXTENT_FLAGS_UNINIT) &&
	    last.e_lblk + last.e_len == lblk &&
	    last.e_pblk + last.e_len == pblk &&
	    last.e_len + len <= EXT_INIT_MAX_LEN) {
		last.e_len += len;
		err = ext2fs_extent_replace(f->handle, 0, &last);
	} else {
		err = ext2fs_extent_insert(f->handle, EXT2_EXTENT_INSERT_AFTER,
					   &ex);
	}
	if (err)
		return err;
	return ext2fs_extent_fix_parents(f->handle);
}

errcode_t obd_wfile_alloc(obd_wfile *f, uint64_t lblk, uint64_t count,
			  uint64_t *segs, int maxsegs, int *nsegs)
{
	ext2_filsys fs = f->fs;
	blk64_t pblk, plen;
	errcode_t err;

	*nsegs = 0;
	while (count > 0 && *nsegs < maxsegs) {
		blk64_t want = count > EXT_INIT_MAX_LEN ? EXT_INIT_MAX_LEN
							: count;

		err = ext2fs_new_range(fs, 0, f->goal, want, NULL, &pblk,
				       &plen);
		if (err)
			return err;
		if (plen > want)
			plen = want;
		// libext2fs 1.47.0 can return a run that crosses the end of the
		// filesystem when the free space reaches it.
		if (pblk >= ext2fs_blocks_count(fs->super))
			return EXT2_ET_BLOCK_ALLOC_FAIL;
		if (pblk + plen > ext2fs_blocks_count(fs->super))
			plen = ext2fs_blocks_count(fs->super) - pblk;
		ext2fs_block_alloc_stats_range(fs, pblk, plen, +1);
		err = append_extent(f, lblk, pblk, plen);
		if (err) {
			ext2fs_block_alloc_stats_range(fs, pblk, plen, -1);
			return err;
		}
		ext2fs_iblk_add_blocks(fs, (struct ext2_inode *)&f->inode,
				       plen);
		segs[3 * *nsegs] = lblk;
		segs[3 * *nsegs + 1] = pblk;
		segs[3 * *nsegs + 2] = plen;
		(*nsegs)++;
		f->goal = pblk + plen;
		lblk += plen;
		count -= plen;
	}
	return 0;
}

errcode_t obd_wfile_finish(obd_wfile *f, uint64_t size)
{
	errcode_t err;

	ext2fs_extent_free(f->handle);
	err = ext2fs_inode_size_set(f->fs, (struct ext2_inode *)&f->inode,
				    size);
	if (!err)
		err = write_large(f->fs, f->ino, &f->inode);
	free(f);
	return err;
}

void obd_wfile_abort(obd_wfile *f)
{
	ext2fs_extent_free(f->handle);
	if (write_large(f->fs, f->ino, &f->inode) == 0)
		obd_release(f->fs, f->ino);
	free(f);
}

/* ---------- directories ---------- */

// Directories that libext2fs must handle itself: hash-indexed, inline,
// casefolded or encrypted ones. Plain linear directories get O(1)
// insertion and removal below; ext2fs_link/unlink scan the whole directory.
#define OBD_SLOW_DIR_FL \
	(EXT2_INDEX_FL | EXT4_INLINE_DATA_FL | EXT4_CASEFOLD_FL | EXT4_ENCRYPT_FL)

struct dbuf {
	ext2_filsys fs;
	ext2_ino_t dir;
	char *p;
	size_t len, cap;
	char *block;
	errcode_t err;
};

/* dbuf_reserve makes room for need more bytes (a first buffer holds at least
 * first bytes); it returns -1 and records the error when memory runs out. */
static int dbuf_reserve(struct dbuf *b, size_t need, size_t first)
{
	size_t cap;
	char *p;

	if (b->len + need <= b->cap)
		return 0;
	cap = b->cap ? b->cap * 2 : first;
	while (cap < b->len + need)
		cap *= 2;
	p = realloc(b->p, cap);
	if (!p) {
		b->err = EXT2_ET_NO_MEMORY;
		return -1;
	}
	b->p = p;
	b->cap = cap;
	return 0;
}

/* dbuf_finish hands the buffer to the caller, or frees it on an error (err, or
 * one recorded while filling it). */
static errcode_t dbuf_finish(struct dbuf *b, errcode_t err, char **buf, size_t *len)
{
	if (!err)
		err = b->err;
	if (err) {
		free(b->p);
		return err;
	}
	*buf = b->p;
	*len = b->len;
	return 0;
}

static int dbuf_put(struct dbuf *b, ext2_ino_t ino, uint32_t lblk, int ft,
		    const char *name, int namelen)
{
	size_t need = 10 + namelen;

	if (namelen == 1 && name[0] == '.')
		return 0;
	if (namelen == 2 && name[0] == '.' && name[1] == '.')
		return 0;
	if (dbuf_reserve(b, need, 4096))
		return -1;
	memcpy(b->p + b->len, &ino, 4);
	memcpy(b->p + b->len + 4, &lblk, 4);
	b->p[b->len + 8] = (char)ft;
	b->p[b->len + 9] = (char)namelen;
	memcpy(b->p + b->len + 10, name, namelen);
	b->len += need;
	return 0;
}

static int list_slow_cb(ext2_ino_t dir, int entry,
			struct ext2_dir_entry *de, int offset, int blocksize,
			char *buf, void *priv)
{
	struct dbuf *b = priv;

	(void)dir;
	(void)entry;
	(void)offset;
	(void)blocksize;
	(void)buf;
	if (!de->inode)
		return 0;
	if (dbuf_put(b, de->inode, OBD_NO_LBLK, ext2fs_dirent_file_type(de),
		     de->name, ext2fs_dirent_name_len(de)))
		return DIRENT_ABORT;
	return 0;
}

static unsigned int dir_end(ext2_filsys fs)
{
	return fs->blocksize - (ext2fs_has_feature_metadata_csum(fs->super)
					? sizeof(struct ext2_dir_entry_tail)
					: 0);
}

static int list_block_cb(ext2_filsys fs, blk64_t *blocknr,
			 e2_blkcnt_t blockcnt, blk64_t ref_blk, int ref_offset,
			 void *priv)
{
	struct dbuf *b = priv;
	unsigned int off = 0, end = dir_end(fs), rec_len;
	struct ext2_dir_entry *de;

	(void)ref_blk;
	(void)ref_offset;
	if (blockcnt < 0)
		return 0;
	b->err = ext2fs_read_dir_block4(fs, *blocknr, b->block, 0, b->dir);
	if (b->err)
		return BLOCK_ABORT;
	while (off + 8 <= end) {
		de = (struct ext2_dir_entry *)(b->block + off);
		if (ext2fs_get_rec_len(fs, de, &rec_len) || rec_len < 8 ||
		    (rec_len & 3) || off + rec_len > end ||
		    ext2fs_dirent_name_len(de) + 8 > (int)rec_len) {
			b->err = EXT2_ET_DIR_CORRUPTED;
			return BLOCK_ABORT;
		}
		if (de->inode &&
		    dbuf_put(b, de->inode, (uint32_t)blockcnt,
			     ext2fs_dirent_file_type(de), de->name,
			     ext2fs_dirent_name_len(de)))
			return BLOCK_ABORT;
		off += rec_len;
	}
	return 0;
}

errcode_t obd_dir_list(ext2_filsys fs, ext2_ino_t dir, char **buf,
		       size_t *len, int *slow)
{
	struct ext2_inode in;
	struct dbuf b;
	errcode_t err;

	err = ext2fs_read_inode(fs, dir, &in);
	if (err)
		return err;
	if (!LINUX_S_ISDIR(in.i_mode))
		return EXT2_ET_NO_DIRECTORY;
	memset(&b, 0, sizeof(b));
	b.fs = fs;
	b.dir = dir;
	*slow = (in.i_flags & OBD_SLOW_DIR_FL) != 0;
	if (*slow) {
		err = ext2fs_dir_iterate2(fs, dir, 0, NULL, list_slow_cb, &b);
	} else {
		b.block = malloc(fs->blocksize);
		if (!b.block)
			return EXT2_ET_NO_MEMORY;
		err = ext2fs_block_iterate3(fs, dir,
					    BLOCK_FLAG_READ_ONLY |
						BLOCK_FLAG_DATA_ONLY,
					    NULL, list_block_cb, &b);
		free(b.block);
	}
	return dbuf_finish(&b, err, buf, len);
}

// insert_entry puts a new entry into the dir block in buf if it has room.
static int insert_entry(ext2_filsys fs, char *buf, const char *name,
			int namelen, ext2_ino_t ino, int ftype)
{
	unsigned int off = 0, end = dir_end(fs), rec_len, used;
	unsigned int need = EXT2_DIR_REC_LEN(namelen);
	struct ext2_dir_entry *de;

	while (off + 8 <= end) {
		de = (struct ext2_dir_entry *)(buf + off);
		if (ext2fs_get_rec_len(fs, de, &rec_len) || rec_len < 8 ||
		    (rec_len & 3) || off + rec_len > end)
			return -1;
		used = de->inode ? EXT2_DIR_REC_LEN(ext2fs_dirent_name_len(de))
				 : 0;
		if (rec_len >= used + need) {
			if (used) {
				ext2fs_set_rec_len(fs, used, de);
				de = (struct ext2_dir_entry *)(buf + off +
							       used);
				rec_len -= used;
			}
			de->inode = ino;
			ext2fs_dirent_set_name_len(de, namelen);
			ext2fs_dirent_set_file_type(
			    de, ext2fs_has_feature_filetype(fs->super) ? ftype
								       : 0);
			memcpy(de->name, name, namelen);
			ext2fs_set_rec_len(fs, rec_len, de);
			return 1;
		}
		off += rec_len;
	}
	return 0;
}

static errcode_t try_insert(ext2_filsys fs, ext2_ino_t dir, blk64_t lblk,
			    char *buf, const char *name, int namelen,
			    ext2_ino_t ino, int ftype, int *done)
{
	blk64_t pblk = 0;
	errcode_t err;
	int r;

	*done = 0;
	err = ext2fs_bmap2(fs, dir, NULL, NULL, 0, lblk, NULL, &pblk);
	if (err || !pblk)
		return err;
	err = ext2fs_read_dir_block4(fs, pblk, buf, 0, dir);
	if (err)
		return err;
	r = insert_entry(fs, buf, name, namelen, ino, ftype);
	if (r < 0)
		return EXT2_ET_DIR_CORRUPTED;
	if (r == 0)
		return 0;
	*done = 1;
	return ext2fs_write_dir_block4(fs, pblk, buf, 0, dir);
}

errcode_t obd_dir_add(ext2_filsys fs, ext2_ino_t dir, const char *name,
		      int namelen, ext2_ino_t ino, int ftype, uint32_t *lblk)
{
	struct ext2_inode in;
	blk64_t nblocks;
	char *buf;
	errcode_t err;
	int done = 0;

	err = ext2fs_read_inode(fs, dir, &in);
	if (err)
		return err;
	if (in.i_flags & OBD_SLOW_DIR_FL) {
		*lblk = OBD_NO_LBLK;
		err = ext2fs_link(fs, dir, name, ino, ftype);
		if (err == EXT2_ET_DIR_NO_SPACE) {
			err = ext2fs_expand_dir(fs, dir);
			if (!err)
				err = ext2fs_link(fs, dir, name, ino, ftype);
		}
		return err;
	}
	nblocks = EXT2_I_SIZE(&in) / fs->blocksize;
	if (nblocks == 0)
		return EXT2_ET_DIR_CORRUPTED;
	buf = malloc(fs->blocksize);
	if (!buf)
		return EXT2_ET_NO_MEMORY;
	if (*lblk < nblocks) {
		err = try_insert(fs, dir, *lblk, buf, name, namelen, ino, ftype,
				 &done);
		if (err || done)
			goto out;
	}
	if (*lblk != nblocks - 1) {
		*lblk = nblocks - 1;
		err = try_insert(fs, dir, *lblk, buf, name, namelen, ino, ftype,
				 &done);
		if (err || done)
			goto out;
	}
	err = ext2fs_expand_dir(fs, dir);
	if (!err)
		err = ext2fs_read_inode(fs, dir, &in);
	if (err)
		goto out;
	*lblk = EXT2_I_SIZE(&in) / fs->blocksize - 1;
	err = try_insert(fs, dir, *lblk, buf, name, namelen, ino, ftype, &done);
	if (!err && !done)
		err = EXT2_ET_DIR_NO_SPACE;
out:
	free(buf);
	return err;
}

errcode_t obd_dir_del(ext2_filsys fs, ext2_ino_t dir, const char *name,
		      int namelen, uint32_t lblk)
{
	struct ext2_dir_entry *de, *prev = NULL;
	unsigned int off = 0, end = dir_end(fs), rec_len, prev_len = 0;
	blk64_t pblk = 0;
	char *buf;
	errcode_t err;

	if (lblk != OBD_NO_LBLK) {
		err = ext2fs_bmap2(fs, dir, NULL, NULL, 0, lblk, NULL, &pblk);
		if (err)
			return err;
	}
	if (!pblk)
		return ext2fs_unlink(fs, dir, name, 0, 0);
	buf = malloc(fs->blocksize);
	if (!buf)
		return EXT2_ET_NO_MEMORY;
	err = ext2fs_read_dir_block4(fs, pblk, buf, 0, dir);
	if (err)
		goto out;
	while (off + 8 <= end) {
		de = (struct ext2_dir_entry *)(buf + off);
		if (ext2fs_get_rec_len(fs, de, &rec_len) || rec_len < 8 ||
		    (rec_len & 3) || off + rec_len > end) {
			err = EXT2_ET_DIR_CORRUPTED;
			goto out;
		}
		if (de->inode && ext2fs_dirent_name_len(de) == namelen &&
		    memcmp(de->name, name, namelen) == 0) {
			if (prev)
				err = ext2fs_set_rec_len(fs, prev_len + rec_len,
							 prev);
			else
				de->inode = 0;
			if (!err)
				err = ext2fs_write_dir_block4(fs, pblk, buf, 0,
							      dir);
			goto out;
		}
		prev = de;
		prev_len = rec_len;
		off += rec_len;
	}
	free(buf);
	return ext2fs_unlink(fs, dir, name, 0, 0);
out:
	free(buf);
	return err;
}

/* ---------- extended attributes ---------- */

errcode_t obd_xattr_set(ext2_filsys fs, ext2_ino_t ino, const char *name,
			const void *value, size_t len)
{
	struct ext2_xattr_handle *h;
	errcode_t err, err2;

	err = ext2fs_xattrs_open(fs, ino, &h);
	if (err)
		return err;
	err = ext2fs_xattrs_read(h);
	if (!err)
		err = ext2fs_xattr_set(h, name, value, len);
	err2 = ext2fs_xattrs_close(&h);
	return err ? err : err2;
}

errcode_t obd_xattr_get(ext2_filsys fs, ext2_ino_t ino, const char *name,
			void **value, size_t *len)
{
	struct ext2_xattr_handle *h;
	errcode_t err;

	err = ext2fs_xattrs_open(fs, ino, &h);
	if (err)
		return err;
	err = ext2fs_xattrs_read(h);
	if (!err)
		err = ext2fs_xattr_get(h, name, value, len);
	ext2fs_xattrs_close(&h);
	return err;
}

static int xattr_list_cb(char *name, char *value, size_t value_len,
			 void *data)
{
	struct dbuf *b = data;
	size_t n = strlen(name) + 1;

	(void)value;
	(void)value_len;
	if (dbuf_reserve(b, n, 256))
		return XATTR_ABORT;
	memcpy(b->p + b->len, name, n);
	b->len += n;
	return 0;
}

errcode_t obd_xattr_list(ext2_filsys fs, ext2_ino_t ino, char **buf,
			 size_t *len)
{
	struct ext2_xattr_handle *h;
	struct dbuf b;
	errcode_t err;

	memset(&b, 0, sizeof(b));
	err = ext2fs_xattrs_open(fs, ino, &h);
	if (err)
		return err;
	err = ext2fs_xattrs_read(h);
	if (!err)
		err = ext2fs_xattrs_iterate(h, xattr_list_cb, &b);
	ext2fs_xattrs_close(&h);
	return dbuf_finish(&b, err, buf, len);
}

errcode_t obd_xattr_remove(ext2_filsys fs, ext2_ino_t ino, const char *name)
{
	struct ext2_xattr_handle *h;
	errcode_t err, err2;

	err = ext2fs_xattrs_open(fs, ino, &h);
	if (err)
		return err;
	err = ext2fs_xattrs_read(h);
	if (!err)
		err = ext2fs_xattr_remove(h, name);
	err2 = ext2fs_xattrs_close(&h);
	return err ? err : err2;
}
