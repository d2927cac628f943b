/* dev_blk native API, also the cffi cdef (preprocessor lines are stripped). */
struct blk_dev;
struct blk_dev_stats {
    uint64_t reads, writes, flushes, unmaps;
    uint64_t bytes_read, bytes_written;
    uint64_t errors, invalid, unsupported, removed_io;
};
const void *blk_device_ops(void);
struct blk_dev *blk_dev_new(void *bdev, int readonly, const char *id, uint32_t max_discard_sectors);
void blk_dev_free(struct blk_dev *d);
int blk_dev_remove_bdev(void *arg);
void *blk_dev_remove_bdev_ptr(void);
void blk_dev_get_stats(struct blk_dev *d, struct blk_dev_stats *out);
/* The bdev's struct vn_iostat, as VN_IOSTAT_WORDS (25) uint64 words. */
void blk_dev_get_iostat(struct blk_dev *d, uint64_t *out);
void blk_dev_reset_iostat_maxmin(struct blk_dev *d);
