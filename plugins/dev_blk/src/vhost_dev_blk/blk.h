/* dev_blk native API, also the cffi cdef (preprocessor lines are stripped). */
struct blk_dev;
struct blk_dev_stats {
    uint64_t reads, writes, flushes, unmaps;
    uint64_t bytes_read, bytes_written;
    uint64_t errors, invalid, unsupported, removed_io;
};
const void *blk_device_ops(void);
/* desc: the struct vn_bdev_desc the controller opened its bdev with. */
struct blk_dev *blk_dev_new(void *desc, int readonly, const char *id, uint32_t max_discard_sectors);
void blk_dev_free(struct blk_dev *d);
void blk_dev_get_stats(struct blk_dev *d, struct blk_dev_stats *out);
