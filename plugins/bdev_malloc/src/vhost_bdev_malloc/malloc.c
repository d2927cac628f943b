/*
 * RAM-backed bdevs.  malloc: a zeroed anonymous mapping, copied to and from on the
 * reactor, completing inline.  null: SPDK's zero-cost bdev (reads return whatever
 * the buffer held, writes are dropped), for measuring the target itself.
 *
 * Whatever a guest asks, one call costs the reactor at most VN_MAX_TRANSFER bytes
 * of memcpy or memset: READ and WRITE above it fail (no device advertises more),
 * and a larger UNMAP or WRITE ZEROES, which devices do advertise (gigabytes, as
 * one fallocate on a file bdev), is zeroed a VN_MAX_TRANSFER chunk per reactor
 * iteration by the channel poller and completes from there.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "vhost_core/vhost_native.h"
#include "malloc_bdev.h"

struct ram_bdev {
    vn_bdev bdev;               /* first: &ram_bdev == &ram_bdev.bdev */
    uint8_t *buf;
    size_t len;
    int is_null;
};

/* Zeroing in progress, inside vn_bdev_io.driver_ctx. */
struct ram_zero {
    vn_bdev_io *next;
    uint64_t done;              /* bytes zeroed so far */
};

_Static_assert(sizeof(struct ram_zero) <= sizeof(((vn_bdev_io *)0)->driver_ctx),
               "struct ram_zero must fit in vn_bdev_io.driver_ctx");

/* Per reactor: the zeroing queue. */
struct ram_chan {
    vn_bdev_io *head, *tail;
};

static struct ram_zero *zero_of(vn_bdev_io *io) { return (struct ram_zero *)io->driver_ctx; }

static void ram_submit(void *ctx, void *chan, vn_bdev_io *io)
{
    struct ram_bdev *m = ctx;
    struct ram_chan *c = chan;
    uint64_t bs = m->bdev.block_size;
    /* Devices check bounds; a bdev still refuses what would leave its buffer. */
    if (io->type != VN_IO_FLUSH &&
        (io->offset_blocks > m->bdev.num_blocks || io->num_blocks > m->bdev.num_blocks - io->offset_blocks)) {
        io->cb(io, -EINVAL);
        return;
    }
    if (m->is_null) {           /* moves no byte: nothing to bound */
        io->cb(io, 0);
        return;
    }
    uint64_t off = io->offset_blocks * bs, len = io->num_blocks * bs;
    if ((io->type == VN_IO_READ || io->type == VN_IO_WRITE) && len > VN_MAX_TRANSFER) {
        io->cb(io, -E2BIG);
        return;
    }
    switch (io->type) {
    case VN_IO_READ:
        vn_iov_copy_to(io->iov, io->iovcnt, 0, m->buf + off, len);
        break;
    case VN_IO_WRITE:
        vn_iov_copy_from(io->iov, io->iovcnt, 0, m->buf + off, len);
        break;
    case VN_IO_UNMAP:
    case VN_IO_WRITE_ZEROES:
        if (len > VN_MAX_TRANSFER && c) {
            struct ram_zero *z = zero_of(io);
            z->next = NULL;
            z->done = 0;
            if (c->tail) zero_of(c->tail)->next = io;
            else c->head = io;
            c->tail = io;
            return;
        }
        memset(m->buf + off, 0, len);
        break;
    case VN_IO_FLUSH:
    case VN_IO_RESET:
        break;
    default:
        io->cb(io, -ENOTSUP);
        return;
    }
    io->cb(io, 0);
}

static void *ram_chan_create(void *ctx)
{
    (void)ctx;
    return calloc(1, sizeof(struct ram_chan));
}

static void ram_chan_destroy(void *ctx, void *chan)
{
    (void)ctx;
    free(chan);
}

/* One chunk per call: the reactor calls this once per iteration. */
static int ram_chan_poll(void *ctx, void *chan)
{
    struct ram_bdev *m = ctx;
    struct ram_chan *c = chan;
    vn_bdev_io *io = c->head;
    if (!io) return 0;
    struct ram_zero *z = zero_of(io);
    uint64_t len = io->num_blocks * m->bdev.block_size;
    uint64_t n = len - z->done < VN_MAX_TRANSFER ? len - z->done : VN_MAX_TRANSFER;
    memset(m->buf + io->offset_blocks * m->bdev.block_size + z->done, 0, n);
    z->done += n;
    if (z->done == len) {
        c->head = z->next;
        if (!c->head) c->tail = NULL;
        io->cb(io, 0);
    }
    return 1;
}

static const struct vn_bdev_ops ram_ops = {
    .abi_version = VN_ABI_VERSION,
    .submit = ram_submit,
    .channel_create = ram_chan_create,
    .channel_destroy = ram_chan_destroy,
    .channel_poll = ram_chan_poll,
};

/* null never copies or zeroes: no channel, nothing for a device to poll. */
static const struct vn_bdev_ops null_ops = {
    .abi_version = VN_ABI_VERSION,
    .submit = ram_submit,
};

void *ram_bdev_new(uint64_t num_blocks, uint32_t block_size, int is_null)
{
    struct ram_bdev *m = calloc(1, sizeof(*m));
    if (!m) return NULL;
    m->is_null = is_null;
    /* Populated up front, as SPDK's hugepage-backed malloc is: the guest's first
     * write to a block must not pay for a page fault on the reactor. */
    if (!is_null) {
        m->len = (size_t)num_blocks * block_size;
        m->buf = mmap(NULL, m->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (m->buf == MAP_FAILED) { free(m); return NULL; }
    }
    m->bdev.ops = is_null ? &null_ops : &ram_ops;
    m->bdev.ctx = m;
    m->bdev.block_size = block_size;
    m->bdev.num_blocks = num_blocks;
    m->bdev.io_types = (1u << VN_IO_READ) | (1u << VN_IO_WRITE) | (1u << VN_IO_FLUSH)
                     | (1u << VN_IO_UNMAP) | (1u << VN_IO_WRITE_ZEROES) | (1u << VN_IO_RESET);
    return m;
}

void ram_bdev_free(void *p)
{
    struct ram_bdev *m = p;
    if (!m) return;
    if (m->buf) munmap(m->buf, m->len);
    free(m);
}
