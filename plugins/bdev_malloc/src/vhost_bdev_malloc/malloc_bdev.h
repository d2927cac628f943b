/* bdev_malloc native API, also the cffi cdef (preprocessor lines are stripped). */
void *ram_bdev_new(uint64_t num_blocks, uint32_t block_size, int is_null);
void ram_bdev_free(void *bdev);
