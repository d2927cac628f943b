/* bdev_rbd native API, also the cffi cdef (preprocessor lines are stripped). */
#ifndef VHOST_BDEV_RBD_H
#define VHOST_BDEV_RBD_H

/* Counters of one bdev over all its channels.  ops/errors are indexed by enum vn_io_type. */
struct rbdn_stats {
    uint64_t ops[6];
    uint64_t errors[6];
    uint64_t bytes_read;
    uint64_t bytes_written;
    int32_t last_errno;         /* negative errno of the latest failed request, 0 if none */
    uint32_t last_type;
    uint64_t last_offset;       /* blocks */
    uint64_t last_blocks;
    uint64_t updates;           /* header updates librbd reported (resize, snapshot, ...) */
};

/* A cluster connection of the data path (librados), shared by every image of that cluster. */
/* keys/vals: rados_conf_set pairs, applied after config_file (NULL: none) is read. */
/* 0 and *out, or a negative errno (err gets librados' words for it). */
int rbdn_cluster_connect(const char *user_id, const char *config_file, const char **keys,
                         const char **vals, int n, void **out, char *err, size_t errlen);
void rbdn_cluster_shutdown(void *cluster);
/* Whether the reactors call into librbd themselves (rbd_non_blocking_aio off, no writeback */
/* cache) and, then, the budget of requests in librbd they share: object requests, bytes. */
int rbdn_cluster_reactor_submit(void *cluster, int64_t *ops_cap, int64_t *bytes_cap);

/* Open pool/image (at snapshot `snap` when not NULL, then read-only) on `cluster` and make a */
/* bdev of it.  notify_fd: an eventfd written when librbd reports a header update (resize, */
/* removal); rbdn_bdev_updated() tells which bdev.  0 and *out, or a negative errno. */
int rbdn_bdev_open(void *cluster, const char *pool, const char *image, const char *snap, int read_only,
                   uint32_t block_size, int notify_fd, void **out);
/* Only once no channel exists any more: unwatches, closes the image. */
void rbdn_bdev_free(void *bdev);
/* The vn_bdev inside (what the core's Bdev.native carries). */
void *rbdn_bdev_native(void *bdev);
/* Whether an update was reported since the last call (and clears it). */
int rbdn_bdev_updated(void *bdev);
/* Have the next rbdn_bdev_updated() say yes (a periodic look at the image). */
void rbdn_bdev_mark_updated(void *bdev);
/* Image size in bytes as librbd knows it now (refreshes the header); negative errno on failure. */
int64_t rbdn_bdev_image_size(void *bdev);
int rbdn_bdev_resize(void *bdev, uint64_t bytes);
void rbdn_bdev_get_stats(void *bdev, struct rbdn_stats *out);

#endif
