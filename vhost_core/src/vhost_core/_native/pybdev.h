/*
 * The Python-bdev adapter's native half (internal to vhost-core, like core.h; the
 * same text, minus preprocessor lines, is part of the cffi cdef).
 *
 * A `struct pyb_bdev` is a vn_bdev whose submit() queues the I/O and signals an
 * eventfd; a Python worker thread takes batches (pyb_bdev_take), serves them with
 * the Python bdev object, and hands each back (pyb_bdev_complete) to the reactor
 * channel that submitted it, whose channel_poll calls io->cb on the reactor thread.
 */

/* One queued I/O as the worker sees it. */
struct pyb_req {
    uint64_t handle;            /* the vn_bdev_io (opaque to Python) */
    uint32_t type;              /* enum vn_io_type */
    uint32_t iovcnt;
    uint64_t offset_blocks;
    uint64_t num_blocks;
    struct iovec *iov;          /* valid until pyb_bdev_complete(handle) */
};

struct pyb_bdev;

struct pyb_bdev *pyb_bdev_new(uint32_t block_size, uint64_t num_blocks, uint32_t io_types);
/* The worker must have stopped; no I/O may be outstanding. */
void pyb_bdev_free(struct pyb_bdev *b);
/* Address of the embedded struct vn_bdev (Bdev.native). */
void *pyb_bdev_vn(struct pyb_bdev *b);
/* Blocking eventfd the worker reads to wait for submissions (or shutdown). */
int pyb_bdev_submit_fd(struct pyb_bdev *b);
/* Move up to `max` queued I/Os into `out`; returns how many. */
int pyb_bdev_take(struct pyb_bdev *b, struct pyb_req *out, int max);
/* Finish one I/O (status 0 or -errno); its reactor runs the callback. */
void pyb_bdev_complete(struct pyb_bdev *b, uint64_t handle, int status);
/* From now on submit() fails new I/O with -ENODEV; wakes the worker. */
void pyb_bdev_shutdown(struct pyb_bdev *b);
/* I/Os submitted and not yet handed back by the worker. */
uint64_t pyb_bdev_queued(struct pyb_bdev *b);
