/*
 * Python-bdev adapter: the vn_bdev half of vhost_core.bdev.python_adapter.
 *
 * Two queues, both linked through the I/Os' driver_ctx:
 *   submissions: reactor threads -> the bdev's Python worker (sub_fd wakes it),
 *                under a mutex: the worker is Python, never the bottleneck;
 *   completions: the worker -> the reactor channel that submitted, through the
 *                channel's struct vn_xq (vhost_native.h), whose fd wakes an
 *                interrupt-mode reactor; channel_poll calls io->cb there.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vhost_core/vhost_native.h"
#include "pybdev.h"

struct pyb_chan {
    struct pyb_bdev *b;
    struct vn_xq done;
};

/* Per-I/O state, in vn_bdev_io.driver_ctx. */
struct pyb_io {
    vn_bdev_io *next;           /* submission queue */
    struct vn_xq_node node;     /* completion queue */
    struct pyb_chan *chan;
    int status;
};

_Static_assert(sizeof(struct pyb_io) <= sizeof(((vn_bdev_io *)0)->driver_ctx),
               "pyb_io must fit in driver_ctx");

struct pyb_bdev {
    vn_bdev bdev;               /* first: Bdev.native points here */
    pthread_mutex_t lock;
    vn_bdev_io *head, *tail;
    int sub_fd;
    int shutdown;
    atomic_ulong queued;
};

static inline struct pyb_io *pio(vn_bdev_io *io) { return (struct pyb_io *)io->driver_ctx; }

static inline vn_bdev_io *io_of_node(struct vn_xq_node *n)
{
    struct pyb_io *p = (struct pyb_io *)((char *)n - offsetof(struct pyb_io, node));
    return (vn_bdev_io *)((char *)p - offsetof(vn_bdev_io, driver_ctx));
}

static void wake(int fd)
{
    uint64_t one = 1;
    if (write(fd, &one, sizeof(one)) < 0) { /* saturated counter: already readable */ }
}

static void pyb_submit(void *ctx, void *chan, vn_bdev_io *io)
{
    struct pyb_bdev *b = ctx;
    struct pyb_chan *c = chan;
    if (!c) { io->cb(io, -ENXIO); return; }
    pio(io)->next = NULL;
    pio(io)->chan = c;
    pio(io)->status = 0;
    pthread_mutex_lock(&b->lock);
    if (b->shutdown) {
        pthread_mutex_unlock(&b->lock);
        io->cb(io, -ENODEV);
        return;
    }
    if (b->tail) pio(b->tail)->next = io; else b->head = io;
    b->tail = io;
    atomic_fetch_add(&b->queued, 1);
    pthread_mutex_unlock(&b->lock);
    wake(b->sub_fd);
}

static void *pyb_channel_create(void *ctx)
{
    struct pyb_chan *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    c->b = ctx;
    if (vn_xq_init(&c->done, -1) < 0) { free(c); return NULL; }
    return c;
}

static void pyb_channel_destroy(void *ctx, void *chan)
{
    struct pyb_chan *c = chan;
    (void)ctx;
    if (!c) return;
    vn_xq_destroy(&c->done);
    free(c);
}

static int pyb_channel_poll(void *ctx, void *chan)
{
    struct pyb_chan *c = chan;
    (void)ctx;
    int n = 0;
    struct vn_xq_node *node = vn_xq_take(&c->done);
    while (node) {
        struct vn_xq_node *next = node->next;
        vn_bdev_io *io = io_of_node(node);
        io->cb(io, pio(io)->status);
        node = next;
        n++;
    }
    return n;
}

static int pyb_channel_fd(void *ctx, void *chan)
{
    (void)ctx;
    return chan ? ((struct pyb_chan *)chan)->done.fd : -1;
}

static const struct vn_bdev_ops pyb_ops = {
    .abi_version = VN_ABI_VERSION,
    .submit = pyb_submit,
    .channel_create = pyb_channel_create,
    .channel_destroy = pyb_channel_destroy,
    .channel_poll = pyb_channel_poll,
    .channel_fd = pyb_channel_fd,
};

struct pyb_bdev *pyb_bdev_new(uint32_t block_size, uint64_t num_blocks, uint32_t io_types)
{
    struct pyb_bdev *b = calloc(1, sizeof(*b));
    if (!b) return NULL;
    b->sub_fd = eventfd(0, EFD_CLOEXEC);        /* blocking: the worker sleeps in read() */
    if (b->sub_fd < 0) { free(b); return NULL; }
    pthread_mutex_init(&b->lock, NULL);
    b->bdev.ops = &pyb_ops;
    b->bdev.ctx = b;
    b->bdev.block_size = block_size;
    b->bdev.num_blocks = num_blocks;
    b->bdev.io_types = io_types;
    return b;
}

void pyb_bdev_free(struct pyb_bdev *b)
{
    if (!b) return;
    close(b->sub_fd);
    pthread_mutex_destroy(&b->lock);
    free(b);
}

void *pyb_bdev_vn(struct pyb_bdev *b) { return &b->bdev; }
int pyb_bdev_submit_fd(struct pyb_bdev *b) { return b->sub_fd; }
uint64_t pyb_bdev_queued(struct pyb_bdev *b) { return atomic_load(&b->queued); }

int pyb_bdev_take(struct pyb_bdev *b, struct pyb_req *out, int max)
{
    int n = 0;
    pthread_mutex_lock(&b->lock);
    while (b->head && n < max) {
        vn_bdev_io *io = b->head;
        b->head = pio(io)->next;
        if (!b->head) b->tail = NULL;
        out[n].handle = (uint64_t)(uintptr_t)io;
        out[n].type = io->type;
        out[n].iovcnt = io->iovcnt;
        out[n].offset_blocks = io->offset_blocks;
        out[n].num_blocks = io->num_blocks;
        out[n].iov = io->iov;
        n++;
    }
    pthread_mutex_unlock(&b->lock);
    return n;
}

void pyb_bdev_complete(struct pyb_bdev *b, uint64_t handle, int status)
{
    vn_bdev_io *io = (vn_bdev_io *)(uintptr_t)handle;
    struct pyb_chan *c = pio(io)->chan;
    pio(io)->status = status;
    atomic_fetch_sub(&b->queued, 1);
    vn_xq_push(&c->done, &pio(io)->node);
}

void pyb_bdev_shutdown(struct pyb_bdev *b)
{
    pthread_mutex_lock(&b->lock);
    b->shutdown = 1;
    pthread_mutex_unlock(&b->lock);
    wake(b->sub_fd);
}
