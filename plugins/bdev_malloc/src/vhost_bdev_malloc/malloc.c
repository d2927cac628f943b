/*
 * RAM-backed bdevs.  malloc: a zeroed anonymous mapping, copied to and from on the
 * reactor, completing inline.  null: SPDK's zero-cost bdev (reads return whatever
 * the buffer held, writes are dropped), for measuring the target itself.
 */
#define _GNU_SOURCE
#include <errno.h>
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

static void ram_submit(void *ctx, void *chan, vn_bdev_io *io)
{
    struct ram_bdev *m = ctx;
    uint64_t bs = m->bdev.block_size;
    (void)chan;
    /* Devices check bounds; a bdev still refuses what would leave its buffer. */
    if (io->type != VN_IO_FLUSH &&
        (io->offset_blocks > m->bdev.num_blocks || io->num_blocks > m->bdev.num_blocks - io->offset_blocks)) {
        io->cb(io, -EINVAL);
        return;
    }
    uint64_t off = io->offset_blocks * bs, len = io->num_blocks * bs;
    if (m->is_null) {
        io->cb(io, 0);
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

static const struct vn_bdev_ops ram_ops = {
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
    m->bdev.ops = &ram_ops;
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
