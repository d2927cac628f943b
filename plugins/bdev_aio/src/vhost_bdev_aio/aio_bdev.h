/* bdev_aio native API, also the cffi cdef (preprocessor lines are stripped). */
#ifndef VHOST_BDEV_AIO_H
#define VHOST_BDEV_AIO_H

/* aio_bdev_new flags: what the control plane found out about the file. */
enum {
    AIO_F_READONLY = 1,         /* opened O_RDONLY */
    AIO_F_DIRECT = 2,           /* opened O_DIRECT: buffers must be aligned (else bounced) */
    AIO_F_UNMAP_PUNCH = 4,      /* unmap = fallocate(PUNCH_HOLE | KEEP_SIZE) */
    AIO_F_UNMAP_DISCARD = 8,    /* unmap = ioctl(BLKDISCARD) (block device without write-zeroes) */
    AIO_F_WRITE_ZEROES = 16,    /* offer write_zeroes */
    AIO_F_ZERO_RANGE = 32,      /* try fallocate(ZERO_RANGE) before writing zeros */
    AIO_F_FSYNC_ON_HELPER = 64  /* fdatasync on the helper thread, not IOCB_CMD_FDSYNC */
};

enum {
    AIO_ENGINE_AIO = 0,         /* Linux AIO: io_submit, completions reaped from the ring */
    AIO_ENGINE_URING = 1        /* io_uring */
};

/* Counters of one bdev over all its channels.  ops/errors are indexed by enum vn_io_type. */
struct aio_bdev_stats {
    uint64_t ops[6];
    uint64_t errors[6];
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t bounced;           /* requests copied through a bounce buffer (unaligned) */
    uint64_t queued_full;       /* requests that waited in the channel for a kernel queue slot */
    uint64_t uring_fallbacks;   /* channels that could not set up io_uring and use AIO */
    uint64_t helper_ops;        /* operations run on a channel's helper thread */
    int32_t first_errno;        /* negative errno of the first failed request, 0 if none */
    uint32_t first_type;
    uint64_t first_offset;      /* blocks */
    uint64_t first_blocks;
    int32_t last_errno;
    uint32_t last_type;
    uint64_t last_offset;
    uint64_t last_blocks;
};

/* Takes ownership of fd (closed by aio_bdev_free).  NULL on allocation failure. */
void *aio_bdev_new(int fd, uint32_t block_size, uint64_t num_blocks, uint32_t align,
                   int engine, uint32_t flags);
/* Only once no channel exists any more. */
void aio_bdev_free(void *bdev);
void aio_bdev_get_stats(void *bdev, struct aio_bdev_stats *out);

/* Probes, run by the control plane; 0 or a negative errno. */
int aio_probe_kaio(void);
int aio_probe_uring(void);
int aio_probe_punch(int fd, uint64_t offset, uint64_t len);
int aio_dio_align(int fd, uint32_t *mem_align, uint32_t *offset_align);

#endif
